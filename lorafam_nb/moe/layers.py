"""A mixture of LoRA experts on one frozen linear, the layer LoRAMoE, MoLA and MoRAL share:

    h = W_0 x + b_0 + Σ_e g_e(x) · s B_e A_e drop(x)

with g from the layer's own router on the linear's input x (a dense softmax, or top-k renormalised).
The layer reports every routing decision to the model's context (the recorder and the model-level
losses read it); the method's config decides what those losses are. A method that changes the routing
before the experts run (SiRA's capacity and expert dropout) or reads it (MoELoRA's contrastive loss on the
experts' outputs) overrides the layer's :meth:`~MoELoRALinear.route` step. :class:`LayerwiseTopKConfig`
lets the expert count vary by layer (MoLA's allocation; the budget knob of the top-k mixtures).

Task-routed layers (MOELoRA, Polytropon) mix by the row's task id alone, so for a fixed task their
update is one weight ΔW_t: :class:`TaskRoutedLayer` holds what they share (reading the ``task_ids``
side input, merging for one task at a time) and :func:`merge_task` merges a whole model for task t.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import BUDGET_TOLERANCE, AdapterConfig, AdapterContext, AdapterLayer, AdapterModel, AdapterScope, Route, Site
from .experts import Dispatch, LoRAExperts
from .losses import pooled_load_balance
from .routers import DenseRouter, Routing, TopKRouter, router_dtype

__all__ = ["MoELinearConfig", "MoELoRALinear", "LayerwiseTopKConfig", "PooledLoadBalance", "TaskRoutedLayer", "TopKLinearConfig", "merge_task",
           "mixture_budget_candidates", "mixture_budget_order", "spread"]

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
        routing = self.route(flat, x)  # the router reads the clean input; dropout is on the LoRA branch only
        delta = self.mix(self.lora_dropout(flat), routing)
        return h + delta.view(h.shape).to(h.dtype)

    def route(self, flat: Tensor, x: Tensor) -> Routing:
        """Route the (T, d_in) tokens ``flat`` of ``x`` and report it to the context. A method that changes the
        routing before the experts run (capacity, expert dropout) or reads it (a loss on the experts' outputs)
        overrides this; the weights it returns are what :meth:`mix` uses."""
        routing = self.router(flat)
        self.context.route(self.site, routing.logits, routing.probs, routing.selected, x)
        return routing

    def mix(self, branch: Tensor, routing: Routing) -> Tensor:
        """``Σ_e g_e · s B_e A_e branch`` -> (T, d_out): the experts on the (dropped-out) tokens, weighted."""
        if routing.selected is None:
            return self.experts.dense(branch, routing.weights)
        if self.path == "dense":
            gates = routing.probs.new_zeros(routing.probs.shape).scatter(1, routing.selected, routing.weights)
            return self.experts.dense(branch, gates)
        return self.experts.sparse(branch, Dispatch.build(routing.selected, routing.weights,
                                                          self.experts.num_experts))

    def extra_repr(self) -> str:
        return f"path={self.path}"


class TaskRoutedLayer(AdapterLayer):
    """An adapter layer whose update depends on each row's task id only (the ``task_ids`` side input, one
    id per row in ``[0, num_tasks)``; a forward without it treats every row as ``default_task``, so that a
    single-task run works unchanged). For a fixed task t the update is one weight ``task_delta(t)``, so the
    layer merges one task at a time: :meth:`merge` takes the task (default: ``default_task``, what a plain
    forward would use), :meth:`unmerge` subtracts the same task's update. A merged layer refuses rows of
    another task rather than silently answering with the merged task's weight."""

    def __init__(self, base_layer: nn.Module, num_tasks: int, default_task: int = 0) -> None:
        super().__init__(base_layer)
        if not 0 <= default_task < num_tasks:
            raise ValueError(f"default_task must be a task id in [0, {num_tasks}), got {default_task}")
        self.num_tasks, self.default_task = num_tasks, default_task
        self.merged_task: int | None = None

    def task_delta(self, task: int) -> Tensor:
        """ΔW_t, the dense d_out × d_in update this layer adds for rows of task ``task``."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        return self.task_delta(self.default_task if self.merged_task is None else self.merged_task)

    def row_tasks(self, x: Tensor) -> Tensor:
        """(rows,) task ids of the rows of ``x`` (rows, …, d), checked against ``num_tasks``."""
        side = self.context.side.get("task_ids")
        if side is None:
            return torch.full((x.shape[0],), self.default_task, dtype=torch.long, device=x.device)
        ids = torch.as_tensor(side, device=x.device).long().reshape(-1)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"task_ids has {ids.shape[0]} entries but the layer sees {x.shape[0]} rows: give one "
                             "task id per row (per example × choice for flattened multiple-choice batches)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise ValueError(f"task ids must lie in [0, {self.num_tasks}) (num_tasks={self.num_tasks}); got "
                             f"{sorted(set(ids.tolist()))}")
        return ids

    def check_merged_rows(self, x: Tensor) -> None:
        """A merged layer serves only its merged task: rows of another task raise."""
        if "task_ids" in self.context.side:
            other = sorted(set(self.row_tasks(x).tolist()) - {self.merged_task})
            if other:
                raise ValueError(f"{self.site or type(self).__name__} is merged for task {self.merged_task}; the "
                                 f"batch holds task ids {other}: unmerge() first, or merge_task(model, t) for them")

    @torch.no_grad()
    def merge(self, task: int | None = None) -> None:
        """Fold ΔW_task into the base weight (``task`` None: ``default_task``, or the task already merged)."""
        if task is not None and not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an id in [0, {self.num_tasks}), got {task}")
        if self.merged:
            if task is not None and task != self.merged_task:
                raise ValueError(f"already merged for task {self.merged_task}; unmerge() before merging task {task}")
            return
        task = self.default_task if task is None else task
        self.base_layer.weight += self.task_delta(task).to(self.base_layer.weight.dtype)
        self.merged, self.merged_task = True, task

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.task_delta(self.merged_task).to(self.base_layer.weight.dtype)
            self.merged, self.merged_task = False, None


def merge_task(model: AdapterModel, task: int) -> None:
    """Fold every task-routed layer's update for task ``task`` into its base weight: the model then computes
    what the unmerged one computes for rows of that task, as a plain network (``model.unmerge()`` undoes it;
    ``model.merge_and_unload()`` afterwards returns the plain model). Task-agnostic layers merge as usual."""
    model.check_mergeable()
    layers = model.adapter_layers()
    merged = {n: l.merged_task for n, l in layers.items() if isinstance(l, TaskRoutedLayer) and l.merged}
    if any(t != task for t in merged.values()):
        raise ValueError(f"the model is merged for task(s) {sorted(set(merged.values()))}; unmerge() first")
    for layer in layers.values():
        layer.merge(task) if isinstance(layer, TaskRoutedLayer) else layer.merge()


def mixture_budget_candidates(cls: type[AdapterConfig], max_rank: int = 32, max_experts: int = 16,
                              expert_step: int = 1, experts: str = "num_experts") -> list[dict[str, int]]:
    """A mixture's size settings for budget matching: expert rank r (the config's ``budget_knob``; an adapter
    mixture's bottleneck) and expert count E together (at a fixed
    E the count moves in steps of a whole LoRA per expert, too coarse to match a budget within ±5 %).
    E starts at the config's default ``top_k`` (a top-k router needs E ≥ k). ``experts`` names the config's
    expert-count field (Polytropon's ``n_skills``)."""
    fields = cls.__dataclass_fields__
    least = fields["top_k"].default if "top_k" in fields else expert_step
    return [{cls.budget_knob: r, experts: e} for r in range(1, max_rank + 1)
            for e in range(least, max_experts + 1) if e % expert_step == 0]


def mixture_budget_order(cls: type[AdapterConfig], values: dict[str, int], count: int,
                         target: int, experts: str = "num_experts") -> tuple[float, ...]:
    """Among budget candidates: matched ones first, and among those the expert count (field ``experts``)
    nearest the paper's default E; then the nearest count; ties to the larger rank."""
    default = cls.__dataclass_fields__[experts].default
    unmatched = abs(count / target - 1) > BUDGET_TOLERANCE
    return (unmatched, 0 if unmatched else abs(values[experts] - default), abs(count - target),
            -values[cls.budget_knob])


class MixtureBudget:
    """Mixin for a mixture's config (put first among its bases): sized for a budget by expert rank and expert
    count together (:func:`mixture_budget_candidates`, :func:`mixture_budget_order`)."""

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, int]]:
        return mixture_budget_candidates(cls)

    @classmethod
    def budget_order(cls, values: dict[str, int], count: int, target: int) -> tuple[float, ...]:
        return mixture_budget_order(cls, values, count, target)


class PooledLoadBalance:
    """Mixin for a token-routed mixture's config (put first among its bases): one Switch load-balance term,
    weighted by the config's ``router_aux_loss_coef``, over the routing of every routed layer of a forward
    pass at once (padding left out). A method that pools otherwise overrides :meth:`load_balance`."""

    def aux_loss_weights(self) -> dict[str, float]:
        return {"load_balance": self.router_aux_loss_coef}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        routes = [r for r in context.routes if r.probs.shape[0]]
        if not routes or self.router_aux_loss_coef == 0:
            return {}
        return {"load_balance": self.load_balance(routes)}

    def load_balance(self, routes: list[Route]) -> Tensor:
        return pooled_load_balance(routes)


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
class TopKLinearConfig(PooledLoadBalance, MoELinearConfig):
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



def spread(total: int, num_layers: int) -> list[int]:
    """``total`` experts over ``num_layers`` layers as evenly as integers allow, the extra ones in the
    highest layers (MoLA's finding: higher layers use more experts)."""
    base, extra = divmod(total, num_layers)
    return [base + (j >= num_layers - extra) for j in range(num_layers)]


@dataclass
class LayerwiseTopKConfig(TopKLinearConfig):
    """A top-k mixture on single linears whose expert count may vary by layer: ``experts_per_layer`` N_j per
    block index (empty: ``num_experts`` in every layer). MoLA's allocation, and the budget knob of every
    mixture built on it: with a router on each linear, one expert count N and rank r everywhere give
    N (r Σ(d_in + d_out) + Σ d_in), which moves in steps of a whole expert per linear and cannot match a
    LoRA budget within ±5 % on MiniLM (there it is 20,736·N(2r + 1) against LoRA r=8's 20,736·16); a total of
    experts spread over the layers (:func:`spread`) moves in steps of one expert in one layer."""

    experts_per_layer: list[int] = field(default_factory=list)

    def expert_counts(self) -> list[int]:
        return self.experts_per_layer or [self.num_experts]

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, Any]]:
        """Expert rank r with a *total* of experts spread over the layers (:func:`spread`), at least ``top_k``
        in every layer."""
        layers = len({s.block for s in sites})
        least = cls.__dataclass_fields__["top_k"].default
        return [{"r": r, "experts_per_layer": spread(total, layers)}
                for r in range(1, 17) for total in range(least * layers, 16 * layers + 1)]

    @classmethod
    def budget_order(cls, values: dict[str, Any], count: int, target: int) -> tuple[float, ...]:
        """A mixture's order (:func:`mixture_budget_order`) with the mean expert count."""
        counts = values["experts_per_layer"]
        return mixture_budget_order(cls, {"r": values["r"], "num_experts": sum(counts) / len(counts)}, count, target)

    def load_balance(self, routes: list[Route]) -> Tensor:
        """The pooled Switch term over the linears that share an expert count, averaged over those groups:
        layers of unequal counts cannot pool their routing (with one count everywhere this is the pooled term)."""
        groups: dict[int, list[Route]] = {}
        for route in routes:
            groups.setdefault(route.probs.shape[1], []).append(route)
        return torch.stack([pooled_load_balance(group) for group in groups.values()]).mean()

    def experts_at(self, site: Site) -> int:
        if not self.experts_per_layer:
            return self.num_experts
        if site.block is None or site.block >= len(self.experts_per_layer):
            raise ValueError(f"experts_per_layer has {len(self.experts_per_layer)} entries; {site.name} is in "
                             f"block {site.block}")
        return self.experts_per_layer[site.block]
