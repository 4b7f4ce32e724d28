"""A mixture of LoRA experts on one frozen linear, the layer LoRAMoE, MoLA and MoRAL share:

    h = W_0 x + b_0 + Σ_e g_e(x) · s B_e A_e drop(x)

with g from the layer's own router on the linear's input x (a dense softmax, or top-k renormalised).
The layer reports every routing decision to the model's context (the recorder and the model-level
losses read it); the method's config decides what those losses are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn


from ..core import BUDGET_TOLERANCE, AdapterConfig, AdapterContext, AdapterLayer, AdapterScope, Route, Site
from .experts import Dispatch, LoRAExperts
from .losses import pooled_load_balance
from .routers import DenseRouter, TopKRouter, router_dtype

__all__ = ["MoELinearConfig", "MoELoRALinear", "TopKLinearConfig", "mixture_budget_candidates", "mixture_budget_order"]

PATHS = ("sparse", "dense")


class MoELoRALinear(AdapterLayer):
    """``nn.Linear`` plus E LoRA experts mixed by ``router``. ``path`` picks how a top-k mixture runs:
    ``"sparse"`` (dispatch each token to its k experts, grouped by expert) or ``"dense"`` (every expert's
    LoRA on every token, weight 0 off the top k); both give the same output. Here only the thin LoRA
    products are routed (the frozen W_0 x runs once per token either way), so the dense path's extra
    arithmetic is (E − k)·r·(d_in + d_out) per token: on a 2-core CPU it was faster than the dispatch for
    every shape tried (E ≤ 16, r ≤ 32, d up to 1536), and it is the default. A dense router always runs
    dense."""

    def __init__(self, base_layer: nn.Linear, router: TopKRouter | DenseRouter, num_experts: int, r: int,
                 scaling: float, lora_dropout: float = 0.0, path: str = "dense") -> None:
        super().__init__(base_layer)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        w = base_layer.weight
        self.router, self.path = router, path
        self.experts = LoRAExperts(num_experts, r, base_layer.in_features, base_layer.out_features, scaling,
                                   dtype=w.dtype, device=w.device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)  # the router reads the clean input; dropout is on the LoRA branch only
        self.context.route(self.site, routing.logits, routing.probs, routing.selected, x)
        branch = self.lora_dropout(flat)
        if routing.selected is None:
            delta = self.experts.dense(branch, routing.weights)
        elif self.path == "dense":
            gates = routing.probs.new_zeros(routing.probs.shape).scatter(1, routing.selected, routing.weights)
            delta = self.experts.dense(branch, gates)
        else:
            delta = self.experts.sparse(branch, Dispatch.build(routing.selected, routing.weights,
                                                               self.experts.num_experts))
        return h + delta.view(h.shape).to(h.dtype)

    def extra_repr(self) -> str:
        return f"path={self.path}"


def mixture_budget_candidates(cls: type[AdapterConfig], max_rank: int = 32, max_experts: int = 16,
                              expert_step: int = 1) -> list[dict[str, int]]:
    """A mixture's size settings for budget matching: expert rank r and expert count E together (at a fixed
    E the count moves in steps of a whole LoRA per expert, too coarse to match a budget within ±5 %).
    E starts at the config's default ``top_k`` (a top-k router needs E ≥ k)."""
    fields = cls.__dataclass_fields__
    least = fields["top_k"].default if "top_k" in fields else expert_step
    return [{"r": r, "num_experts": e} for r in range(1, max_rank + 1)
            for e in range(least, max_experts + 1) if e % expert_step == 0]


def mixture_budget_order(cls: type[AdapterConfig], values: dict[str, int], count: int,
                         target: int) -> tuple[float, ...]:
    """Among budget candidates: matched ones first, and among those the expert count nearest the paper's
    default E; then the nearest count; ties to the larger rank."""
    default = cls.__dataclass_fields__["num_experts"].default
    unmatched = abs(count / target - 1) > BUDGET_TOLERANCE
    return (unmatched, 0 if unmatched else abs(values["num_experts"] - default), abs(count - target), -values["r"])


@dataclass
class MoELinearConfig(AdapterConfig):
    """What every mixture of LoRA experts on single linears shares (not a method itself): the experts'
    rank ``r``, ``lora_alpha`` (scale α/r), ``lora_dropout`` on the expert input and ``num_experts``.
    A method sets its router (:meth:`router`), may vary the expert count by site (:meth:`experts_at`),
    and defines its auxiliary losses. ``path``: how a top-k mixture runs (see :class:`MoELoRALinear`)."""

    r: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    num_experts: int = 4
    path: str = "dense"

    budget_knob: ClassVar[str] = "r"
    expert_step: ClassVar[int] = 1  # expert counts a budget may pick are multiples of this

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"expert rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")

    def experts_at(self, site: Site) -> int:
        return self.num_experts

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, int]]:
        return mixture_budget_candidates(cls, expert_step=cls.expert_step)

    @classmethod
    def budget_order(cls, values: dict[str, int], count: int, target: int) -> tuple[float, ...]:
        return mixture_budget_order(cls, values, count, target)

    def router(self, site: Site, num_experts: int) -> TopKRouter | DenseRouter:
        raise NotImplementedError

    def build_layer(self, site: Site, scope: AdapterScope) -> MoELoRALinear:
        n = self.experts_at(site)
        return MoELoRALinear(site.module, self.router(site, n), n, self.r, self.lora_alpha / self.r,
                             self.lora_dropout, self.path)

    def site_parameters(self, site: Site) -> int:
        """N r (d_in + d_out) for the experts plus N d_in for the site's router."""
        n = self.experts_at(site)
        return n * self.r * (site.d_in + site.d_out) + n * site.d_in

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Per adapted d_out × d_in linear at the default expert count: N r (d_in + d_out) + N d_in."""
        return self.num_experts * (self.r * (d_in + d_out) + d_in)


@dataclass
class TopKLinearConfig(MoELinearConfig):
    """A token-routed mixture on single linears (MoLA, MoRAL): each token's ``top_k`` experts by a router
    on the linear's input, and a Switch load-balance term weighted by ``router_aux_loss_coef``, over the
    routing of all adapted linears at once (:meth:`load_balance`; a method may pool it otherwise)."""

    top_k: int = 2
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if any(not isinstance(n, int) or n < self.top_k for n in self.expert_counts()):
            raise ValueError(f"every layer needs at least top_k={self.top_k} experts; got {self.expert_counts()}")

    def expert_counts(self) -> list[int]:
        """The expert counts the config's layers use."""
        return [self.num_experts]

    def router(self, site: Site, num_experts: int) -> TopKRouter:
        w = site.module.weight
        return TopKRouter(site.d_in, num_experts, self.top_k, dtype=router_dtype(w.dtype), device=w.device)

    def aux_loss_weights(self) -> dict[str, float]:
        return {"load_balance": self.router_aux_loss_coef}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        routes = [r for r in context.routes if r.probs.shape[0]]
        if not routes or self.router_aux_loss_coef == 0:
            return {}
        return {"load_balance": self.load_balance(routes)}

    def load_balance(self, routes: list[Route]) -> Tensor:
        return pooled_load_balance(routes)
