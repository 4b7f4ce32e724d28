"""Conditional MixLoRA: Multimodal Instruction Tuning with Conditional Mixture of LoRA
(Shen, Xu, Wang, Cheng, Yin, Huang; ACL 2024; arXiv 2402.15896). Not the token-routed FFN mixture of Li et
al. (:mod:`.mixlora`): here the experts are the rank-one *factors* of one LoRA, chosen once per instance.

A LoRA update is a sum of rank-one terms, :math:`s\\,BA = s\\sum_{k=1}^r b_k a_k^\\top`. A single static set of r
terms shared by many instruction tasks lets the tasks interfere; MixLoRA keeps larger pools of E candidate
rows of A and E candidate columns of B for each frozen :math:`W_0 \\in \\mathbb{R}^{d_{out}\\times d_{in}}`
and lets every input instance pick its own r of each (Dynamic Factor Selection):

    x̄       = mean of the instance's tokens entering this linear                 (padding left out)
    S_A      = TopK(R_A x̄, r)                                  IFS-A, R_A ∈ R^{E×d_in}
    S_B      = TopK(R_B x̄, r)                                  IFS-B (cond_type "input")
    S_B      = TopK(softmax(R_B x̄) + λ Σ_k softmax(U_kᵀ a_{S_A[k]}), r)        + CFS ("input_lora_a_param")
    A(x)     = [a_{S_A[1]}; …; a_{S_A[r]}] ∈ R^{r×d_in},   B(x) = [b_{S_B[1]}, …, b_{S_B[r]}] ∈ R^{d_out×r}
    y_t      = W_0 x_t + b_0 + (α/r) · B(x) A(x) drop(x_t)       for every token t of the instance

* Factors are paired by rank slot: the k-th best A factor with the k-th best B factor (TopK in descending
  score order). Every token of an instance uses the same rank-r LoRA, so the active cost is a rank-r LoRA;
  the pools store E/r times more factors.
* CFS (conditional factor selection) makes B's choice depend on the *parameters* of the A factors just
  chosen, through one projection U_k ∈ R^{d_in×E} per rank slot (stored as one (E, r·d_in) matrix, the
  authors' ``Linear(r·d_in → E)``); λ = ``ifs_weight`` = 1.
* Init: each a_j Kaiming-uniform (a = √5, bound 1/√d_in), each b_j = 0 (so y = W_0 x + b_0 at step 0); routers
  as a bias-free ``nn.Linear`` (Kaiming-uniform a = √5), kept in at least float32.
* Router training. With the released scripts (``used_scored_weight=False``) only TopK *indices* leave the
  routers, so R_A, R_B and U get no gradient and stay at their random init: the routing is a fixed random
  projection of x̄ (it still drifts as x̄ changes with the earlier layers' adapters). ``router_training="frozen"``
  (default) is that form, with the routers' ``requires_grad`` off so that the trainable count is honest.
  ``"scored"`` scales each selected factor by its renormalised top-r softmax score (a_k by w^A_k, b_k by w^B_k),
  which the code's flag intends but applies to the first forward only; then the routers train. CFS reads the
  selected A factors' raw (unscored) parameters in both modes.
* Instance summary: the mean over the tokens that reach the linear. The authors average over every position
  (padding and image tokens included); here padding is left out when the forward has an attention mask
  (``mask_padding``; False reproduces the code). For a causal LM trained on whole sequences the summary sees
  the answer tokens too, and in cached decoding the linear sees only the new token, so the selection would
  change every step; classifying from one forward over the prompt (next-token logits) avoids both.
* No auxiliary or balancing loss. ΔW depends on the instance: no global merge (:meth:`CondMixLoRALinear.
  instance_delta` gives one instance's ΔW, which a single fixed request could merge).
* ``cond_type="random"``: r factors of each pool drawn uniformly per instance and forward (the authors'
  ablation; no routers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterLayer, AdapterScope, MethodCard, Site, register_method, require_positive_ints
from .routers import Routing, TopKRouter, router_dtype, softmax, top_k

__all__ = ["COND_TYPES", "ROUTER_TRAINING", "CondMixLoRALinear", "CondMixLoraConfig"]

INPUT, CFS, RANDOM = "input", "input_lora_a_param", "random"
COND_TYPES = (INPUT, CFS, RANDOM)  # the authors' ``cond_type`` values this module implements
ROUTER_TRAINING = ("frozen", "scored")


class CondMixLoRALinear(AdapterLayer):
    """``nn.Linear`` plus pools of E rank-one factors, r of each chosen per instance (row of the input).

    ``lora_A`` (E, d_in) holds the candidate rows a_j, ``lora_B`` (d_out, E) the candidate columns b_j (the
    paper's orientation: a rank-E LoRA whose terms are picked r at a time and re-paired). ``router_A`` and
    ``router_B`` are R_A and R_B; ``cfs_weight`` (E, r·d_in) stacks the CFS projections U_kᵀ side by side.
    """

    def __init__(self, base_layer: nn.Linear, num_factors: int, r: int, scaling: float, lora_dropout: float = 0.0,
                 cond_type: str = INPUT, ifs_weight: float = 1.0, router_training: str = "frozen",
                 mask_padding: bool = True) -> None:
        super().__init__(base_layer)
        require_positive_ints(num_factors=num_factors, r=r)
        if r > num_factors:
            raise ValueError(f"r={r} factors cannot be selected from a pool of num_factors={num_factors}")
        if cond_type not in COND_TYPES:
            raise ValueError(f"cond_type must be one of {COND_TYPES}, got {cond_type!r}")
        if router_training not in ROUTER_TRAINING:
            raise ValueError(f"router_training must be one of {ROUTER_TRAINING}, got {router_training!r}")
        w = base_layer.weight
        d_out, d_in = w.shape
        self.num_factors, self.r, self.scaling = num_factors, r, scaling
        self.cond_type, self.ifs_weight = cond_type, ifs_weight
        self.router_training, self.mask_padding = router_training, mask_padding
        self.lora_A = nn.Parameter(torch.empty(num_factors, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, num_factors, dtype=w.dtype, device=w.device))
        # Row by row as the authors draw each (1, d_in) factor: the bound 1/√d_in is the same for the whole block.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.router_A = self.router_B = self.cfs_weight = None
        if cond_type != RANDOM:
            rdt = router_dtype(w.dtype)
            self.router_A = TopKRouter(d_in, num_factors, r, dtype=rdt, device=w.device)
            self.router_B = TopKRouter(d_in, num_factors, r, dtype=rdt, device=w.device)
            if cond_type == CFS:
                self.cfs_weight = nn.Parameter(torch.empty(num_factors, r * d_in, dtype=rdt, device=w.device))
                nn.init.kaiming_uniform_(self.cfs_weight, a=math.sqrt(5))  # nn.Linear(r·d_in, E)'s default
            if router_training == "frozen":
                # Indices carry no gradient: the released code's routers never move, so they are not trainable.
                for p in self.router_parameters():
                    p.requires_grad_(False)

    def router_parameters(self) -> list[nn.Parameter]:
        """R_A, R_B and (with CFS) U: what routes, as opposed to the factor pools."""
        routers = [m for m in (self.router_A, self.router_B) if m is not None]
        return [p for m in routers for p in m.parameters()] + ([self.cfs_weight] if self.cfs_weight is not None else [])

    # --- selection -------------------------------------------------------------------------------
    def summary(self, tokens: Tensor, keep: Tensor | None) -> Tensor:
        """x̄: (rows, T, d_in) -> (rows, d_in), the mean over each row's real tokens (``keep`` (rows·T,) bool, or
        None: all tokens), in the routers' dtype. A row without real tokens gets x̄ = 0."""
        rdt = router_dtype(tokens.dtype)
        if keep is None:
            return tokens.to(rdt).mean(1)
        m = keep.view(tokens.shape[0], -1, 1).to(rdt)
        return (tokens.to(rdt) * m).sum(1) / m.sum(1).clamp_min(1.0)

    def select(self, x_bar: Tensor) -> tuple[Routing, Routing]:
        """(A's routing, B's routing) for instance summaries x̄ (rows, d_in): ``selected`` (rows, r) factor indices
        in slot order (descending score), ``weights`` (rows, r) their renormalised top-r softmax scores."""
        if self.cond_type == RANDOM:
            return self._random(x_bar), self._random(x_bar)
        routing_A = self.router_A(x_bar)
        ifs_B = self.router_B(x_bar)
        if self.cond_type == INPUT:
            return routing_A, ifs_B
        # CFS: slot k's chosen A factor, projected by U_k, votes for B factors; the votes are added to B's own
        # input route in probability space and B's top r is taken over the sum (softmax of it for the scores).
        a_sel = self.lora_A[routing_A.selected].to(self.cfs_weight.dtype)  # (rows, r, d_in)
        U = self.cfs_weight.view(self.num_factors, self.r, -1)  # U[:, k] = U_kᵀ
        votes = softmax(torch.einsum("nkd,ekd->nke", a_sel, U)).sum(1)  # (rows, E)
        return routing_A, top_k(ifs_B.probs + self.ifs_weight * votes, self.r)

    def _random(self, x_bar: Tensor) -> Routing:
        rows, E = x_bar.shape[0], self.num_factors
        selected = torch.rand(rows, E, device=x_bar.device).argsort(-1)[:, : self.r]
        logits = x_bar.new_zeros(rows, E)
        return Routing(logits, softmax(logits), x_bar.new_full((rows, self.r), 1.0 / self.r), selected)

    def factors(self, routing_A: Routing, routing_B: Routing) -> tuple[Tensor, Tensor]:
        """(A(x) (rows, r, d_in), B(x)ᵀ (rows, r, d_out)): each instance's selected factors, slot by slot; scaled
        by their scores when ``router_training="scored"`` (how the routers get a gradient)."""
        A = self.lora_A[routing_A.selected]
        Bt = self.lora_B.t()[routing_B.selected]
        if self.router_training == "scored":
            A = A * routing_A.weights.to(A.dtype)[..., None]
            Bt = Bt * routing_B.weights.to(Bt.dtype)[..., None]
        return A, Bt

    # --- forward ---------------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} needs inputs of shape (instances, ..., d_in) to know which tokens "
                             f"form an instance; got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, T, d_in): one instance per row

    def selection(self, x: Tensor) -> tuple[Routing, Routing]:
        """Each row's factor selections from its clean input x (dropout is on the LoRA branch only)."""
        keep = self.context.real_tokens(x) if self.mask_padding else None
        return self.select(self.summary(self._rows(x), keep))

    def route(self, x: Tensor) -> tuple[Routing, Routing]:
        """:meth:`selection`, reported to the context for both pools (``<site>:A``, ``<site>:B``), repeated over each
        row's tokens (the recorder counts tokens; model-level analyses read ``Route.rows``)."""
        routing_A, routing_B = self.selection(x)
        T = self._rows(x).shape[1]
        for pool, routing in (("A", routing_A), ("B", routing_B)):
            per_token = [t.repeat_interleave(T, 0) for t in (routing.logits, routing.probs, routing.selected)]
            self.context.route(f"{self.site}:{pool}", *per_token, x)
        return routing_A, routing_B

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        A, Bt = self.factors(*self.route(x))
        # (x Aᵀ) Bᵀ per instance: two thin batched products, never the d_out × d_in ΔW the authors' code builds.
        z = torch.bmm(self._rows(self.lora_dropout(x)).to(A.dtype), A.transpose(1, 2))
        return h + (torch.bmm(z, Bt) * self.scaling).view(h.shape).to(h.dtype)

    @torch.no_grad()
    def instance_delta(self, x: Tensor) -> Tensor:
        """(rows, d_out, d_in): each row's ΔW = s · B(x) A(x) (for inspection, or to merge one fixed request)."""
        A, Bt = self.factors(*self.selection(x))
        return self.scaling * Bt.transpose(1, 2) @ A

    def extra_repr(self) -> str:
        return (f"num_factors={self.num_factors}, r={self.r}, scaling={self.scaling:g}, cond_type={self.cond_type}, "
                f"router_training={self.router_training}")


@register_method
@dataclass
class CondMixLoraConfig(AdapterConfig):
    """Conditional MixLoRA (peft-style names; the authors' in brackets): ``r`` the rank each instance gets, i.e.
    the top-k of both selections [``n_selected``], ``num_factors`` E per pool [``n_experts``], ``lora_alpha``
    (scale α/r; the scripts set α = 2E), ``lora_dropout``, ``cond_type`` ("input": IFS for A and B;
    "input_lora_a_param": IFS for A, IFS + CFS for B; "random"), ``ifs_weight`` λ, ``router_training``
    ("frozen": the released code's routing, indices only; "scored": factors weighted by their scores, routers
    trained) and ``mask_padding`` (leave padding out of x̄; the code does not)."""

    r: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    num_factors: int = 16
    cond_type: str = INPUT
    ifs_weight: float = 1.0
    router_training: str = "frozen"
    mask_padding: bool = True

    method = "cond_mixlora"
    modality: ClassVar[str] = "multimodal"  # its chapter and comparison run on the toy VLM
    # The pool size sets the trainable count (E(d_in + d_out) with frozen routers, whatever r); sized() then gives
    # α = 2 × knob = 2E, the scripts' choice.
    budget_knob: ClassVar[str] = "num_factors"
    card = MethodCard(
        title="Conditional MixLoRA", paper="Shen et al., ACL 2024", arxiv="2402.15896", date="2024-02",
        idea=r"pools of $E$ rank-one factors per linear; each instance picks $r$ rows of $A$ and $r$ columns of $B$ "
             r"(independent routers on the mean input, $B$'s optionally conditioned on the chosen $A$ factors)",
        trains=r"factor pools $\{a_j\}$, $\{b_j\}$ (routers stay at init, as in the released code)",
        frozen=r"$W_0$; routers $R_A$, $R_B$ (and $U$) at their random init", mergeable=False,
        params=r"E\,(d_{in}+d_{out})", chapter="cond_mixlora", bibkey="shen2024multimodal",
        params_note=r"plus the routers, stored but not trained: $2E\,d_{in}$, and $r\,d_{in}E$ more with CFS "
                    r"(trained, and counted, with score weighting)",
        merge_note="ΔW depends on the factors each instance selects",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, num_factors=self.num_factors)
        if self.r > self.num_factors:
            raise ValueError(f"r={self.r} factors cannot be selected from a pool of num_factors={self.num_factors}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.cond_type not in COND_TYPES:
            raise ValueError(f"cond_type must be one of {COND_TYPES}, got {self.cond_type!r} (the authors' "
                             "'lora_a_choice' and instruction/task conditionings are not implemented)")
        if self.router_training not in ROUTER_TRAINING:
            raise ValueError(f"router_training must be one of {ROUTER_TRAINING}, got {self.router_training!r}")
        if self.cond_type == RANDOM and self.router_training == "scored":
            raise ValueError("cond_type='random' has no router whose scores could weight the factors")
        if not isinstance(self.ifs_weight, (int, float)) or not math.isfinite(self.ifs_weight) or self.ifs_weight < 0:
            raise ValueError(f"ifs_weight must be a finite number >= 0, got {self.ifs_weight!r}")

    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def build_layer(self, site: Site, scope: AdapterScope) -> CondMixLoRALinear:
        return CondMixLoRALinear(site.module, self.num_factors, self.r, self.scaling(), self.lora_dropout,
                                 self.cond_type, self.ifs_weight, self.router_training, self.mask_padding)

    def router_parameters(self, d_in: int) -> int:
        """Router entries at one linear: R_A and R_B (E d_in each), plus U (r d_in E) with CFS; none for random."""
        if self.cond_type == RANDOM:
            return 0
        return 2 * self.num_factors * d_in + (self.r * d_in * self.num_factors if self.cond_type == CFS else 0)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters at one d_out × d_in linear: the pools E (d_in + d_out), plus the routers
        (:meth:`router_parameters`) when they are trained (``router_training="scored"``)."""
        routers = self.router_parameters(d_in) if self.router_training == "scored" else 0
        return self.num_factors * (d_in + d_out) + routers

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, Any]]:
        """Pool sizes E from the default r (a pool must hold the r factors it selects) up to the widest linear."""
        least = cls.__dataclass_fields__["r"].default
        top = max(min(s.d_in, s.d_out) for s in sites)
        return [{cls.budget_knob: e} for e in range(least, max(top, least) + 1)]
