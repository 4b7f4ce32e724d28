"""MoA: Mixture-of-LoRAs: An Efficient Multitask Tuning for Large Language Models (Feng, Hao, Zhang, Han,
Wang; LREC-COLING 2024; arXiv 2403.03432).

Multi-task tuning of one LoRA lets the tasks interfere and makes the data mix a delicate balance. MoA first
trains one LoRA per domain k = 1..K on that domain's data alone (stage 1), then plugs all K into the model
as experts behind an explicit router that is supervised with each sample's domain label c and sends a
whole sequence to one LoRA (stage 2). For an adapted linear W_0 with domain LoRAs (A_k, B_k), scale α/r:

    h̄ = mean_t x_t            π = softmax(W_R h̄ + b_R) ∈ Δ^{K−1}            k̂ = argmax_k π_k
    h_t = W_0 x_t + b_0 + (α/r) B_{k*} A_{k*} drop(x_t),     k* = c in training (teacher forcing), k̂ at inference
    L = L_task + λ L_R,      L_R = −log π_c

Only the abstract was verified; the rest is the reconstruction of the book's spec sheet, and the choices
where it is silent (⚠) are:

* **One router for the whole network** (K(d+1) parameters), reading the mean over the real tokens of the
  input of the model's first adapted linear (the embeddings as that linear sees them: the prompt only, no
  answer token under the label-token protocol); its decision is used by every adapted linear of the
  forward. The per-linear routers of a third-party re-implementation would cost K(d_in+1) per linear.
* Stage 2 trains the router (and the task head) only; the K LoRAs stay frozen. Training routes by the gold
  label (teacher forcing), so each LoRA only ever sees its own domain; λ = 1.
* Stage 1 is :mod:`.separate`'s: one plain LoRA per task of the run's mix, trained with the run's settings;
  a single-task run (no domains) splits its training set into K k-means clusters of the router's input and
  uses the cluster of each sequence as its label, so that the router is supervised there too.
* Rows without a domain (a task no LoRA was trained on) are routed by the router and add no loss. A model
  injected without stage 1 (no tasks, no clusters) has one domain: every row is labelled LoRA 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterContext, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Site, register_method
from .routers import router_dtype
from .separate import RankedLoRAs, SeparateLoRAsConfig, StageOne, pool_rows

__all__ = ["MoAConfig", "MoALinear", "MoARouter", "oracle_routing", "router_of"]

ROUTER_KEY = "moa_router"


class MoARouter(nn.Module):
    """The sequence-level router ``W_R ∈ R^{K×d}``, ``b_R ∈ R^K`` (nn.Linear's init), in at least float32.

    It also holds how a row's domain label is found: ``expert_of_task`` maps the ``task_ids`` side input to
    a LoRA (-1: none) in a multi-task run; a single-task run labels each row with its nearest k-means
    ``centroids`` (stage 1's pseudo-domains; ``has_centroids`` once stage 1 set them); a model that had
    neither (injected without stage 1) has one domain, LoRA 0. ``selected`` is the
    current forward's decision, one LoRA per row, read by every adapted linear after the first; ``oracle``
    routes by the label at inference too (the upper bound a perfect router would reach)."""

    def __init__(self, d: int, num_experts: int, expert_of_task: list[int], teacher_forcing: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(d), 1 / math.sqrt(d))
        self.register_buffer("centroids", torch.zeros(num_experts, d, dtype=dtype, device=device))
        self.register_buffer("has_centroids", torch.zeros((), dtype=torch.bool, device=device))
        mapping = torch.tensor(expert_of_task, dtype=torch.long, device=device) if expert_of_task else None
        self.register_buffer("expert_of_task", mapping, persistent=False)
        self.teacher_forcing, self.oracle = teacher_forcing, False
        self.selected: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def labels(self, h: Tensor, context: AdapterContext) -> Tensor | None:
        """(rows,) the LoRA each row's domain label names (-1: no domain), or None when there is no label."""
        if self.expert_of_task is not None:
            ids = context.side.get("task_ids")
            if ids is None:
                return None
            ids = torch.as_tensor(ids, device=h.device).long().reshape(-1)
            if ids.shape[0] != h.shape[0]:
                raise ValueError(f"task_ids has {ids.shape[0]} entries but the model sees {h.shape[0]} rows: give one "
                                 "task id per row (per example × choice for flattened multiple-choice batches)")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.expert_of_task.numel()):
                raise ValueError(f"task ids must lie in [0, {self.expert_of_task.numel()}), got {sorted(set(ids.tolist()))}")
            return self.expert_of_task.to(h.device)[ids]
        if bool(self.has_centroids):
            return torch.cdist(h.to(self.centroids.dtype), self.centroids).argmin(1)
        return torch.zeros(h.shape[0], dtype=torch.long, device=h.device)

    def decide(self, x: Tensor, context: AdapterContext) -> Tensor:
        """Route the rows of ``x`` (rows, …, d): one LoRA per row. Adds the router loss −log π_c (mean over
        labelled rows) in training and reports each domain's routing to the recorder."""
        h = pool_rows(x, context).to(self.weight.dtype)
        logits = F.linear(h, self.weight, self.bias)
        probs = torch.softmax(logits, -1)
        choice = probs.argmax(-1)
        labels = self.labels(h, context)
        if labels is None:
            if self.training:
                raise ValueError("MoA trains its router on domain labels: this model's LoRAs belong to tasks, so "
                                 "pass task_ids (the examples' task_id) in the forward call")
            selected = choice
            context.recorder.record("unlabelled", probs, choice[:, None])
        else:
            known = labels >= 0
            if self.training and known.any():
                context.add_aux_loss("router", F.cross_entropy(logits[known], labels[known]))
            by_label = self.teacher_forcing if self.training else self.oracle
            selected = torch.where(known, labels, choice) if by_label else choice
            for k in labels.unique().tolist():
                rows = labels == k
                context.recorder.record(f"domain {k}" if k >= 0 else "no domain", probs[rows], choice[rows][:, None])
        self.selected = selected
        return selected

    def extra_repr(self) -> str:
        return f"d={self.weight.shape[1]}, num_experts={self.num_experts}"


class MoALinear(AdapterLayer):
    """``nn.Linear`` plus K frozen domain LoRAs, one per row: ``h = W_0 x + b_0 + s B_k A_k drop(x)`` with k the
    router's decision for the row. The model's first adapted linear (``reads_router``) asks the router;
    the others use its decision of the same forward."""

    def __init__(self, base_layer: nn.Linear, experts: RankedLoRAs, router: MoARouter, reads_router: bool,
                 lora_dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        self.experts, self.reads_router = experts, reads_router
        # A submodule, so that model.to(...) reaches it; its tensors are saved once, by the scope.
        self.router = router
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        rows = x.shape[0]
        if self.reads_router:
            selected = self.router.decide(x, self.context)
        else:
            selected = self.router.selected
            if selected is None or selected.shape[0] != rows:
                raise ValueError(f"{self.site}: the router decides on the model's first adapted linear, which did not run "
                                 f"for this forward ({rows} rows here)")
        flat = x.reshape(-1, x.shape[-1])
        gates = F.one_hot(selected, self.experts.num_experts).repeat_interleave(flat.shape[0] // rows, 0)
        delta = self.experts.mix(self.lora_dropout(flat), gates)
        return h + delta.view(h.shape).to(h.dtype)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The LoRAs: the router is the scope's to save (once per model)."""
        return {k: v for k, v in super().adapter_state_dict().items() if not k.startswith("router.")}


@register_method
@dataclass
class MoAConfig(SeparateLoRAsConfig):
    """MoA's hyperparameters: ``num_experts`` K domain LoRAs of rank ``r`` (or ``ranks``), ``lora_alpha``,
    ``lora_dropout``, the router-loss weight λ ``router_loss_weight`` and ``teacher_forcing`` (route training
    rows by their label). ``domains``/``task_names`` are set from the run (see :class:`SeparateLoRAsConfig`)."""

    router_loss_weight: float = 1.0
    teacher_forcing: bool = True

    method = "moa"
    side_inputs = ("task_ids",)
    card = MethodCard(
        title="MoA", paper="Feng et al., LREC-COLING 2024", arxiv="2403.03432", date="2024-03",
        idea=r"train one LoRA per domain separately, then send each whole sequence to one of them with a "
             r"router supervised by the domain labels",
        trains=r"$A_k$, $B_k$ per domain (stage 1, each on its own data); the router $W_R$ (stage 2)",
        frozen=r"$W_0$; the domain LoRAs in stage 2", mergeable=False,
        params=r"N\,r(d_{in}+d_{out})", chapter="moa", bibkey="feng2024moa",
        params_note=r"N domain LoRAs (stage 1); plus the router $N(d+1)$, which a model has once, on the input "
                    r"of its first adapted linear; stage 2 trains only the router",
        merge_note="each sequence uses one LoRA: after the router's decision, one merged copy per domain",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router_loss_weight < 0:
            raise ValueError(f"router_loss_weight λ must be non-negative, got {self.router_loss_weight}")

    def build_layer(self, site: Site, scope: AdapterScope) -> MoALinear:
        first = ROUTER_KEY not in scope.entries
        w = site.module.weight
        router = scope.shared(ROUTER_KEY, lambda: MoARouter(site.d_in, self.num_experts, self.expert_of_task(),
                                                            self.teacher_forcing, dtype=router_dtype(w.dtype),
                                                            device=w.device))
        return MoALinear(site.module, self.make_experts(site), router, first, self.lora_dropout)

    def model_parameters(self, sites: list[Site]) -> int:
        """The K LoRAs on every site, plus the one router K (d + 1) on the first site's input."""
        return super().model_parameters(sites) + self.num_experts * (sites[0].d_in + 1)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """One adapted d_out × d_in linear: the K LoRAs, Σ_k r_k (d_in + d_out) (the router is the model's)."""
        return sum(self.expert_ranks()) * (d_in + d_out)

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, Any]]:
        return cls.expert_candidates()

    @classmethod
    def budget_order(cls, values: dict[str, Any], count: int, target: int) -> tuple[float, ...]:
        """Matched first, then the number of LoRAs nearest the default, then the nearest count."""
        return (*cls.expert_order(values, count, target), abs(count - target), -values["r"])

    def aux_loss_weights(self) -> dict[str, float]:
        return {"router": self.router_loss_weight}

    def load_stage_one(self, model: AdapterModel, stage: StageOne) -> None:
        """A single-task run keeps stage 1's cluster centroids: they label the rows for the router."""
        if stage.centroids is not None:
            router = router_of(model)
            router.centroids.copy_(stage.centroids)
            router.has_centroids.fill_(True)


def router_of(model: AdapterModel) -> MoARouter:
    return model.adapter_scope.entries[ROUTER_KEY]


def oracle_routing(model: AdapterModel, enabled: bool = True) -> None:
    """Route by the rows' domain labels at inference as well (a perfect router): the upper bound MoA reaches
    with its LoRAs when routing makes no mistake."""
    router_of(model).oracle = enabled

