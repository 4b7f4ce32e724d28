"""Octavius: Mitigating Task Interference in MLLMs via LoRA-MoE (Chen et al., ICLR 2024; arXiv 2311.02684).

Instruction-tuning one LoRA on many multimodal tasks makes them pull against each other. Octavius replaces
it by E LoRA experts on the decoder's attention projections and lets **one gate per model** pick, for each
*sample*, the experts its instruction calls for. With X_n ∈ R^{T_n×d} the frozen word embeddings of sample
n's instruction tokens and W_g ∈ R^{E×d}:

    s_n = softmax(W_g · mean_t X_{n,t}),   S_n = top-k(s_n),   g_{n,e} = s_{n,e} / Σ_{j∈S_n} s_{n,j} (e ∈ S_n, else 0)
    y = W_0 x + Σ_e g_{n,e} (α/r) B_e A_e drop(x)          for every token x of sample n, in every adapted linear

(softmax is monotone, so mean-then-project equals the code's mean of per-token logits). All tokens of a
sample — instruction, response, every generation step — use the same g_n; routing never depends on the
other samples of a batch. B = 0 at init, so the model starts as the frozen one; W_g ~ N(0, 1) gets its
gradient through the values g_{e1}, g_{e2} (top-k itself has none; with k = 1, g = 1 and W_g never trains).

Where the gate reads (⚠ pinned): the model's own input-embedding lookup, replaced by a thin layer that
computes g_n from the looked-up embeddings before the first block runs. The tokens it averages are marked by
the ``instruction_mask`` side input (B × T, 1 on the instruction/question tokens of ``input_ids``; the code
uses the first human turn); without it, every real token of the input (the attention mask). Padding is
always left out — the release averages over pad tokens too, which would make a sample's route depend on
how long the other samples of its batch are. A forward that passes ``inputs_embeds`` instead of
``input_ids`` skips the lookup and raises: feeding a gate from precomputed embeddings is not supported.
For generation, :func:`hold_gate` keeps the prompt's g_n for the decoding steps.

Other readings (source: the released ``OpenGVLab/LAMM`` Octavius code, via the book's spec sheet; the
paper's text beyond its abstract was not readable here):

* top-k = 2 of E = 4 (images), renormalised (ε = 1e-9 in the code, left out here); the random
  second-expert policy is dead code in the release and is not implemented.
* No load-balancing loss in the released training loss: ``router_aux_loss_coef`` defaults to 0; a positive
  weight adds a Switch term over the batch's samples (an ablation, not the paper).
* Scale α/r (peft's LoRA); the release applies none, which is the same at its α = r = 32.
* A init: ``init_a="octavius"`` is the release's Kaiming-uniform on the stacked (E, d_in, r) tensor, bound
  1/√(d_in·r), √r below LoRA's; ``"lora"`` gives each expert LoRA's 1/√d_in. B = 0 either way.
* Targets: q, k, v, o projections of every decoder layer; dropout 0.1; r = α = 32.

Out of scope: the paper's 3-D side (the Object-As-Scene point-cloud encoder and its resampler) and the 2-D
visual projection — this module is the LoRA-MoE decoder with its instance gate.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterContext, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Route, \
    Site, require_positive_ints, site_of, target_module_names
from ..registry import register_method
from .layers import PATHS, MixtureBudget, MoELoRALinear, PooledLoadBalance
from .routers import Routing, TopKRouter, router_dtype

__all__ = ["GATE_KEY", "OctaviusConfig", "OctaviusEmbedding", "OctaviusGate", "OctaviusLinear", "gate_of",
           "hold_gate"]

GATE_KEY = "octavius_gate"  # the model's one gate in its AdapterScope
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
A_INITS = ("octavius", "lora")


class OctaviusGate(nn.Module):
    """The model's instance gate: ``router`` holds W_g (E × d, N(0, std²), in at least float32) and the top-k
    rule; ``routing`` is the current forward's decision, one row per sample, which every adapted linear reads.
    ``held``: keep the decision across forwards (generation, see :func:`hold_gate`)."""

    def __init__(self, d: int, num_experts: int, k: int, init_std: float = 1.0, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.router = TopKRouter(d, num_experts, k, init_std=init_std, dtype=dtype, device=device)
        self.routing: Routing | None = None
        self.decided_in: list[Route] | None = None  # the context.routes list of the forward that decided
        self.held = False

    def decide(self, embeds: Tensor, mask: Tensor, context: AdapterContext, name: str) -> None:
        """Route each row of ``embeds`` (B, T, d) on the mean of its ``mask``-ed (B, T) embeddings."""
        rows = embeds.shape[0]
        if not (self.held and self.routing is not None and self.routing.probs.shape[0] == rows):
            weight = mask.to(self.router.weight.dtype)[..., None]
            pooled = (embeds.to(weight.dtype) * weight).sum(1) / weight.sum(1)
            self.routing = self.router(pooled)
            r = self.routing
            # One route per sample (its row index), for the recorder and a model-level balance term.
            context.routes.append(Route(name, r.logits, r.probs, r.selected, torch.arange(rows, device=embeds.device)))
            context.recorder.record(name, r.probs, r.selected)
        self.decided_in = context.routes

    def current(self, rows: int, context: AdapterContext, site: str) -> Routing:
        if self.routing is None or self.decided_in is not context.routes:
            raise ValueError(f"{site}: Octavius routes on the input embeddings of input_ids, which this forward did "
                             "not look up (inputs_embeds are not supported)")
        if self.routing.probs.shape[0] != rows:
            raise ValueError(f"{site} sees {rows} rows but the gate routed {self.routing.probs.shape[0]} samples")
        return self.routing

    def extra_repr(self) -> str:
        return f"held={self.held}"


class OctaviusEmbedding(AdapterLayer):
    """The frozen input-embedding table, unchanged, plus the gate's decision on what it looked up."""

    def __init__(self, base_layer: nn.Embedding, gate: OctaviusGate) -> None:
        super().__init__(base_layer)
        self.gate = gate  # a submodule for .to(); saved once, by the scope

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"Octavius expects (batch, tokens) input_ids, got shape {tuple(input_ids.shape)}")
        embeds = self.base_layer(input_ids)
        self.gate.decide(embeds, self.instruction_tokens(input_ids), self.context, self.site)
        return embeds

    def instruction_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, T) bool: the tokens the gate averages (``instruction_mask`` and not padding)."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        if self.context.token_mask is not None and self.context.token_mask.shape == input_ids.shape:
            keep = self.context.token_mask.to(input_ids.device).bool()
        given = self.context.side.get("instruction_mask")
        if given is not None:
            given = torch.as_tensor(given, device=input_ids.device)
            if given.shape != input_ids.shape:
                raise ValueError(f"instruction_mask has shape {tuple(given.shape)}; it must match input_ids "
                                 f"{tuple(input_ids.shape)} (1 on each sample's instruction tokens)")
            keep = keep & given.bool()
        empty = (~keep.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} have no (non-padding) instruction token for the Octavius gate to read")
        return keep

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in super().adapter_state_dict().items() if not k.startswith("gate.")}


class OctaviusLinear(MoELoRALinear):
    """``nn.Linear`` plus E LoRA experts mixed by the sample's gate weights g_n: the mixture layer with its
    routing step taken from the model's gate instead of a router of its own (nothing is recorded here: the
    gate records its one decision per forward)."""

    def __init__(self, base_layer: nn.Linear, gate: OctaviusGate, num_experts: int, r: int, scaling: float,
                 lora_dropout: float = 0.0, path: str = "dense", init_a: str = "octavius") -> None:
        super().__init__(base_layer, gate, num_experts, r, scaling, lora_dropout, path)
        if init_a == "octavius":  # kaiming_uniform_(a=√5) on (E, d_in, r): fan-in d_in·r
            bound = 1 / math.sqrt(base_layer.in_features * r)
            nn.init.uniform_(self.experts.lora_A, -bound, bound)

    def route(self, flat: Tensor, x: Tensor) -> Routing:
        g = self.router.current(x.shape[0], self.context, self.site)
        per_row = flat.shape[0] // x.shape[0]  # every token of a row takes its sample's route
        return Routing(*(t.repeat_interleave(per_row, 0) for t in (g.logits, g.probs, g.weights, g.selected)))

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in super().adapter_state_dict().items() if not k.startswith("router.")}


@register_method
@dataclass
class OctaviusConfig(MixtureBudget, PooledLoadBalance, AdapterConfig):
    """Octavius's hyperparameters: ``num_experts`` E, ``top_k`` k of them per sample, the experts' rank ``r``,
    ``lora_alpha`` (scale α/r), ``lora_dropout``; ``target_modules`` the linears that get the experts;
    ``gate_init_std`` (W_g ~ N(0, std²)), ``init_a`` (``"octavius"``/``"lora"``, see the module),
    ``router_aux_loss_coef`` (0: the release; > 0 a Switch term over samples), ``path`` how the mixture runs.
    Side input ``instruction_mask``: which tokens of ``input_ids`` the gate reads."""

    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION))
    r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    num_experts: int = 4
    top_k: int = 2
    gate_init_std: float = 1.0
    init_a: str = "octavius"
    router_aux_loss_coef: float = 0.0
    path: str = "dense"

    method = "octavius"
    side_inputs = ("instruction_mask",)
    modality: ClassVar[str] = "multimodal"  # compared on the toy VLM in its chapter, not in the text grid
    card = MethodCard(
        title="Octavius", paper="Chen et al., ICLR 2024", arxiv="2311.02684", date="2023-11",
        idea=r"LoRA experts on the decoder's attention; one gate per model reads the mean word embedding of each "
             r"sample's instruction and gives all its tokens the same top-2 mixture",
        trains=r"$A_e$, $B_e$ per expert and adapted linear; the model's gate $W_g$", frozen=r"$W_0$, the embeddings",
        mergeable=False, params=r"E\,r(d_{in}+d_{out})", chapter="octavius", bibkey="chen2024octavius",
        params_note=r"plus the model's one gate, $E\,d$",
        merge_note=r"the update depends on the sample's gate; for one request "
                   r"$\Delta W_n=\frac{\alpha}{r}\sum_e g_{n,e}B_eA_e$ could be merged",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, num_experts=self.num_experts, top_k=self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.gate_init_std > 0:
            raise ValueError(f"gate_init_std must be positive, got {self.gate_init_std}")
        if self.init_a not in A_INITS:
            raise ValueError(f"init_a must be one of {A_INITS}, got {self.init_a!r}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be non-negative, got {self.router_aux_loss_coef}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")

    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def sites(self, model: nn.Module) -> list[Site]:
        """The input-embedding table (where the gate reads) first, then the adapted linears."""
        table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(table, nn.Embedding):
            raise ValueError(f"Octavius's gate reads the input word embeddings; {type(model).__name__} has no "
                             "nn.Embedding as get_input_embeddings()")
        name = next(n for n, m in model.named_modules() if m is table)
        d = table.embedding_dim
        return [site_of(model, name, module=table, d_in=d, d_out=d, kind="embedding")] + \
            [site_of(model, n) for n in target_module_names(model, self)]

    def build_layer(self, site: Site, scope: AdapterScope) -> AdapterLayer:
        if site.kind == "embedding":
            w = site.module.weight
            gate = scope.shared(GATE_KEY, lambda: OctaviusGate(site.d_in, self.num_experts, self.top_k,
                                                               self.gate_init_std, router_dtype(w.dtype), w.device))
            return OctaviusEmbedding(site.module, gate)
        if GATE_KEY not in scope.entries:
            raise ValueError("build the embedding site first: the linears share its gate")
        return OctaviusLinear(site.module, scope.entries[GATE_KEY], self.num_experts, self.r, self.scaling(),
                              self.lora_dropout, self.path, self.init_a)

    def site_parameters(self, site: Site) -> int:
        """The gate E·d at the embedding site; E r (d_in + d_out) at an adapted linear."""
        if site.kind == "embedding":
            return self.num_experts * site.d_in
        return self.num_parameters(site.d_in, site.d_out)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """The experts on one adapted d_out × d_in linear: E r (d_in + d_out)."""
        return self.num_experts * self.r * (d_in + d_out)


def gate_of(model: AdapterModel) -> OctaviusGate:
    """The model's one Octavius gate."""
    if GATE_KEY not in model.adapter_scope.entries:
        raise ValueError(f"the model has no Octavius gate (adapter {model.adapter_config.method!r})")
    return model.adapter_scope.entries[GATE_KEY]


@contextmanager
def hold_gate(model: AdapterModel) -> Iterator[OctaviusGate]:
    """Inside, the gate decides on the first forward (the prompt) and keeps that decision for the following
    ones (decoding steps that look up only the new tokens), as the release does at generation."""
    gate = gate_of(model)
    gate.routing, gate.held = None, True
    try:
        yield gate
    finally:
        gate.held = False
