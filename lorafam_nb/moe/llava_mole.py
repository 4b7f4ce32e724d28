"""LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data Conflicts in Instruction Finetuning MLLMs
(Chen, Jie, Ma; arXiv 2401.16160, 2024).

Instruction data from distinct domains (general VQA, documents, medicine) put into one LoRA pull its
weights in conflicting directions. LLaVA-MoLE keeps a plain LoRA on the attention projections and turns
the LoRA of every feed-forward block into K experts, one of which each token picks. For a Llama-style FFN
with frozen G (gate), U (up), D (down) and per-layer router (W_r, b_r) on the FFN input x:

    p = softmax(W_r x + b_r),   e* = argmax_e p_e                         (per token, one router per layer)
    ΔM_e(v) = (α/r) B^M_e A^M_e drop(v)                                   (M ∈ {G, U, D}, expert e)
    h = SiLU(G x + ΔG_{e*}(x)) ⊙ (U x + ΔU_{e*}(x)),   FFN(x) = D h + ΔD_{e*}(h)

The one route e* drives all three matrices. Since B = 0 at init, FFN(x) is the frozen FFN at step 0. An
ungated FFN (BERT, the book's MiniLM) is handled the same way: D act(U x + ΔU_{e*}(x)) + ΔD_{e*}(·).
Balance (the authors' code): per sample i, over the real tokens of *all* layers pooled,
P_i = mean p, F_i = mean one-hot(e*) (no gradient), and

    L_bal = (1/B) Σ_i Σ_e P_{i,e} F_{i,e},     L = L_LM + w · L_bal      (w = ``router_aux_loss_coef``)

Readings pinned here (⚠ in the spec sheet; source: the released ``moe.py``/``model.py`` of
forwchen/LLaVA-MoLE, the paper's text beyond the abstract was not readable):

* **The gate value is not applied** (``scale_by_gate=False``): the selected expert's deltas enter with
  weight 1, as in the code's sparse mode. So the LM loss sends no gradient to the router (argmax has
  none); it is trained by the balance loss alone. ``scale_by_gate=True`` multiplies the selected expert's
  deltas by p_{e*} (Switch style), so that the LM loss reaches the router too: not the paper, an ablation.
* **Sparse, not dense**: ``dense_moe=True`` is the code's other mode, Σ_e p_e ΔM_e on each matrix (every
  expert on every token, the router trained by the LM loss); the released inference script sets it, the
  paper's design is the sparse one. Train and evaluate in the same mode: they compute different functions.
* Router: ``nn.Linear(d, K)`` *with* bias, PyTorch's default init, in at least float32 (the release casts it
  to bf16; the softmax here is in float32 whatever the model's dtype).
* Balance term without Switch's factor K, per sample, pooled over layers, padding masked; w is not in the
  release (0.01: a third-party reimplementation's value). Defaults r = 16, α = 32 (the released checkpoint's
  name and README; its inference script says 32/64), dropout 0.05, K = 3.

Routing is recorded per layer (the model's :class:`~lorafam_nb.core.RoutingRecorder`), and every forward's
``context.routes`` keeps each real token's expert with the row (sample) it belongs to:
:func:`route_table` and :func:`mutual_information` turn them into the chapter's domain × expert tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterContext, AdapterLayer, AdapterScope, MethodCard, Route, Site, \
    require_positive_ints
from ..lora import LoRALinear
from ..models import FeedForward
from ..registry import register_method
from .experts import Dispatch
from .layers import PATHS, MixtureBudget
from .mixlora import MixLoraConfig, MixLoRAFFN
from .routers import Routing, TopKRouter, router_dtype, top_k

__all__ = ["BiasedTopKRouter", "LLaVAMoLEConfig", "LLaVAMoLEFFN", "mole_balance", "mutual_information", "route_table"]

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class BiasedTopKRouter(TopKRouter):
    """``softmax(W_r x + b_r)`` then the top k: :class:`~lorafam_nb.moe.routers.TopKRouter` with a bias, as an
    ``nn.Linear(d, E)`` (Kaiming-uniform W_r, b_r ~ U(±1/√d): PyTorch's default init)."""

    def __init__(self, d: int, num_experts: int, k: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(d, num_experts, k, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device))
        nn.init.uniform_(self.bias, -1 / math.sqrt(d), 1 / math.sqrt(d))

    def forward(self, x: Tensor) -> Routing:
        return top_k(torch.addmm(self.bias, x.to(self.weight.dtype), self.weight.t()), self.k)


class LLaVAMoLEFFN(MixLoRAFFN):
    """A frozen FFN whose gate/up/down LoRAs are K experts, one route per token for all three matrices.

    MixLoRA's layer supplies the pieces (experts on each FFN matrix, LoRA dropout, ``path``); what differs is
    the combination: LLaVA-MoLE adds the selected expert's *deltas* inside the FFN, weighted 1 (or p_{e*},
    or p_e for every expert in dense mode), where MixLoRA averages whole expert FFNs by renormalised gates.
    """

    def __init__(self, base_layer: FeedForward, num_experts: int, top_k: int, r: int, scaling: float,
                 lora_dropout: float = 0.0, path: str = "dense", scale_by_gate: bool = False,
                 dense_moe: bool = False) -> None:
        super().__init__(base_layer, num_experts, top_k, r, scaling, lora_dropout, path=path)
        w = base_layer.up.weight
        self.router = BiasedTopKRouter(base_layer.up.in_features, num_experts, top_k,
                                       dtype=router_dtype(w.dtype), device=w.device)
        self.scale_by_gate, self.dense_moe = scale_by_gate, dense_moe

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)  # the router reads the clean FFN input (dropout is on the LoRA branch only)
        # Dense mode records the argmax too: what the release's balance loss counts as F in both modes.
        self.context.route(self.site, routing.logits, routing.probs, routing.selected, x)
        delta = self._deltas(routing)
        ffn, drop = self.base_layer, self.lora_dropout
        # One dropout mask per LoRA input, as the release (each expert LoRA owns its dropout).
        up = ffn.up(flat) + delta("up", drop(flat))
        # An ungated FFN (BERT's GELU MLP, the book's MiniLM) has experts on up and down only.
        h = ffn.act(up) if ffn.gate is None else ffn.act(ffn.gate(flat) + delta("gate", drop(flat))) * up
        out = ffn.down(h) + delta("down", drop(h))
        return out.view(x.shape).to(x.dtype)

    def gates(self, routing: Routing) -> Tensor:
        """(T, K) weight of each expert's deltas per token: p (dense mode), else p_{e*} or 1 on the selected."""
        if self.dense_moe:
            return routing.probs
        chosen = routing.probs.gather(1, routing.selected) if self.scale_by_gate else \
            torch.ones_like(routing.selected, dtype=routing.probs.dtype)
        return routing.probs.new_zeros(routing.probs.shape).scatter(1, routing.selected, chosen)

    def _deltas(self, routing: Routing):
        """``delta(matrix, v)`` -> Σ_e g_e ΔM_e(v), on every expert (dense) or through the token dispatch."""
        gates = self.gates(routing)
        if self.path == "sparse" and not self.dense_moe:
            dispatch = Dispatch.build(routing.selected, gates.gather(1, routing.selected), gates.shape[1])
            return lambda name, v: self.experts[name].sparse(v, dispatch)
        return lambda name, v: self.experts[name].dense(v, gates)

    def extra_repr(self) -> str:
        return f"path={self.path}, scale_by_gate={self.scale_by_gate}, dense_moe={self.dense_moe}"


def mole_balance(routes: list[Route]) -> Tensor:
    """The release's balance term: (1/B) Σ_i Σ_e P_{i,e} F_{i,e}, P_i the mean router probability and F_i the
    share of routes to e over sample i's real tokens of every layer (F without gradient). Rows with no real
    token do not count."""
    probs = torch.cat([r.probs for r in routes])
    rows = torch.cat([r.rows for r in routes])
    one_hot = torch.zeros_like(probs).scatter(1, torch.cat([r.selected for r in routes]), 1.0)
    n_rows = int(rows.max()) + 1
    P = probs.new_zeros(n_rows, probs.shape[1]).index_add(0, rows, probs)
    F = probs.new_zeros(n_rows, probs.shape[1]).index_add(0, rows, one_hot)
    count = torch.bincount(rows, minlength=n_rows).to(probs.dtype)
    seen = count > 0
    per_row = (P[seen] * F[seen]).sum(1) / count[seen] ** 2
    return per_row.mean()


@register_method
@dataclass
class LLaVAMoLEConfig(MixtureBudget, AdapterConfig):
    """LLaVA-MoLE's hyperparameters: ``num_experts`` K, ``top_k`` (1: the paper), the experts' and attention
    LoRAs' rank ``r``, ``lora_alpha`` (scale α/r), ``lora_dropout``, balance weight ``router_aux_loss_coef`` w
    (the release's ``moe_balance_w``). ``target_modules`` get a plain LoRA (the attention projections; ``[]``:
    none; never the FFN's own linears, which carry the experts). ``scale_by_gate``: weight the selected
    expert by p_{e*} (not the paper); ``dense_moe``: the release's soft mode; ``path``: how the sparse
    mixture runs (``"dense"``: every expert, weight 0 off the selected; ``"sparse"``: token dispatch), same
    output."""

    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION))
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    num_experts: int = 3
    top_k: int = 1
    router_aux_loss_coef: float = 0.01
    scale_by_gate: bool = False
    dense_moe: bool = False
    path: str = "dense"

    method = "llava_mole"
    modality: ClassVar[str] = "multimodal"
    card = MethodCard(
        title="LLaVA-MoLE", paper="Chen et al., arXiv 2024", arxiv="2401.16160", date="2024-01",
        idea=r"the FFN's LoRA becomes $K$ experts; a per-layer router sends each token to one expert, whose "
             r"deltas on gate, up and down enter unweighted; plain LoRA on attention; per-sample balance loss",
        trains=r"$A^M_e$, $B^M_e$ per expert and FFN matrix; router $W_r$, $b_r$ per layer; attention $A$, $B$",
        frozen=r"all base weights", mergeable=False, params=r"K\,r(d_{in}+d_{out})", chapter="llava_mole",
        bibkey="chen2024llavamole",
        params_note=r"per FFN linear; plus each layer's router $K(d+1)$ and $r(d_{in}+d_{out})$ per attention linear",
        merge_note="routing is per token and SiLU sits between adapted matrices; only the attention LoRAs merge",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, num_experts=self.num_experts, top_k=self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be non-negative, got {self.router_aux_loss_coef}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.dense_moe and self.scale_by_gate:
            raise ValueError("dense_moe weighs every expert by p already; scale_by_gate applies to the sparse mode")

    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def sites(self, model: nn.Module) -> list[Site]:
        """Every FFN block, then the plain-LoRA linears of ``target_modules`` outside the FFNs: MixLoRA's rule."""
        return MixLoraConfig.sites(self, model)

    def build_layer(self, site: Site, scope: AdapterScope) -> AdapterLayer:
        if site.kind == "ffn":
            return LLaVAMoLEFFN(site.module, self.num_experts, self.top_k, self.r, self.scaling(), self.lora_dropout,
                                self.path, self.scale_by_gate, self.dense_moe)
        return LoRALinear(site.module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    def site_parameters(self, site: Site) -> int:
        """An FFN: K r Σ_M (d_in_M + d_out_M) over its matrices plus the router K (d + 1); a linear: r (d_in + d_out)."""
        if site.kind != "ffn":
            return self.r * (site.d_in + site.d_out)
        matrices = [m for m in (site.module.gate, site.module.up, site.module.down) if m is not None]
        return self.num_experts * (self.r * sum(m.in_features + m.out_features for m in matrices) + site.d_in + 1)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """The experts on one d_out × d_in FFN linear: K r (d_in + d_out)."""
        return self.num_experts * self.r * (d_in + d_out)

    def aux_loss_weights(self) -> dict[str, float]:
        return {"load_balance": self.router_aux_loss_coef}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        routes = [r for r in context.routes if r.probs.shape[0]]
        if not routes or self.router_aux_loss_coef == 0:
            return {}
        return {"load_balance": mole_balance(routes)}


@torch.no_grad()
def route_table(routes: list[Route], labels: Tensor, num_labels: int) -> dict[str, Tensor]:
    """Per routed layer, a (num_labels × E) count of real tokens by their row's label (e.g. the sample's
    domain) and the expert they were routed to (all k choices counted); ``labels`` (rows,) labels the rows of
    the forward that produced ``routes`` (``model.context.routes`` right after it). Sum the tables of
    several batches before :func:`mutual_information`."""
    out = {}
    for route in routes:
        if route.selected is None:
            raise ValueError(f"{route.layer} recorded no expert choice (a dense mixture's route)")
        E = route.probs.shape[1]
        k = route.selected.shape[1]
        label = labels.to(route.rows.device)[route.rows].repeat_interleave(k)
        expert = route.selected.reshape(-1)
        keep = expert >= 0
        flat = label[keep] * E + expert[keep]
        out[route.layer] = torch.bincount(flat, minlength=num_labels * E).view(num_labels, E).cpu()
    return out


def mutual_information(counts: Tensor) -> float:
    """I(label; expert) in nats of the joint distribution a count table gives (0: the expert tells nothing
    about the label; at most min(log rows, log columns))."""
    joint = counts.double() / counts.sum().clamp_min(1)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / outer[nz]).log()).sum())
