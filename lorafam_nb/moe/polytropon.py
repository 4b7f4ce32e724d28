"""Polytropon (Poly): Combining Parameter-efficient Modules for Task-level Generalisation (Ponti, Sordoni,
Bengio and Reddy, EACL 2023; arXiv 2202.13914, first titled "Combining Modular Skills in Multitask Learning").

Fully shared adapters entangle tasks and per-task adapters share nothing. Polytropon keeps, in every adapted
linear, an inventory of |S| LoRA *skills* and learns for each task t a soft binary allocation over them:

    ẑ_{t,s} = σ((Z_{t,s} + log u − log(1 − u)) / τ),  u ~ U(0, 1)    (training: Gumbel-sigmoid, τ = 1)
    ẑ_{t,s} = σ(Z_{t,s})                                            (evaluation: no noise)
    w_{t,s} = ẑ_{t,s} / (Σ_{s'} ẑ_{t,s'} + 10⁻¹²)                     (a normalised subset, not a softmax)
    A^{(t)} = Σ_s w_{t,s} A_s,   B^{(t)} = Σ_s w_{t,s} B_s,   h = W_0 x + b_0 + (1/r) B^{(t)} A^{(t)} x

* Z ∈ R^{|T|×|S|} (``module_logits``) and the skills are **per adapted linear** ("Z and Φ are
  layer-specific"; peft's ``poly`` tuner and the authors' code do the same). Z ~ U(−10⁻³, 10⁻³).
* A and B are averaged *separately* and then multiplied (the product of averages, a rank-r update), as
  both reference codes do; the scale is 1/r, with no α.
* Multi-Head Routing (``n_splits`` h > 1, peft's extension): d_in and d_out are cut into h blocks, each with
  its own allocation, so Z has h·|S| columns per task.
* Storage follows peft's ``poly`` layout (so that adapters move to and from peft by renaming keys only):
  ``lora_A`` (h, |S|, d_in/h, r) holds A_sᵀ block by block, ``lora_B`` (h, |S|, r, d_out/h) holds B_sᵀ.
  Init as peft with ``init_weights=True``: each A_s Kaiming-uniform (a = √5) on its (r, d_in/h) shape,
  B_s = 0, so the model starts as the base model.
* Two-speed learning (the paper's main inductive bias): Z trains at ``allocation_lr_ratio`` × the skills'
  LR, without weight decay. The optional Indian-Buffet-Process prior on Z is not implemented.
* Few-shot transfer: a new task gets its own row of every Z (here: an id of the setting no training example
  carried, its row still at init) and learns it; :func:`train_allocation_only` freezes everything else.
* Task ids: 0-based, the ``task_ids`` side input (one per row); a forward without them is task
  ``default_task`` (peft raises instead). For a fixed task the update is one matrix, merged per task by
  :func:`~lorafam_nb.moe.layers.merge_task`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterModel, AdapterScope, MethodCard, Site, register_method, require_positive_ints
from ..multitask import MULTITASK_TASKS
from .layers import TaskRoutedLayer, merge_task, mixture_budget_candidates, mixture_budget_order
from .routers import router_dtype

__all__ = ["EPS", "PolyLinear", "PolytroponConfig", "allocation", "allocation_entropy", "merge_task",
           "train_allocation_only"]

EPS = 1e-12  # the row normalisation's ε (peft and the authors' code)


class PolyLinear(TaskRoutedLayer):
    """``nn.Linear`` plus |S| LoRA skills combined per row by the task's allocation (one Z per layer)."""

    def __init__(self, base_layer: nn.Linear, r: int, n_skills: int, n_splits: int, n_tasks: int,
                 temperature: float = 1.0, default_task: int = 0) -> None:
        super().__init__(base_layer, n_tasks, default_task)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        if d_in % n_splits or d_out % n_splits:
            raise ValueError(f"n_splits={n_splits} must divide both widths of the linear ({d_in} in, {d_out} out)")
        w = base_layer.weight
        self.r, self.n_skills, self.n_splits, self.temperature = r, n_skills, n_splits, temperature
        self.lora_A = nn.Parameter(torch.empty(n_splits, n_skills, d_in // n_splits, r, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(n_splits, n_skills, r, d_out // n_splits, dtype=w.dtype, device=w.device))
        # Kaiming-uniform (a = √5) on each skill's (r, d_in/h) A draws from U(±1/√(d_in/h)).
        bound = 1 / math.sqrt(d_in // n_splits)
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, dtype=router_dtype(w.dtype),
                                                      device=w.device))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)
        # Set by train_allocation_only: the one task whose row of Z receives gradient (None: every row).
        self.trainable_task: int | None = None

    def allocation_weights(self, tasks: Tensor) -> Tensor:
        """(rows, h, |S|) normalised allocation w of each row's task: a relaxed Bernoulli sample in training,
        σ(Z) in evaluation."""
        logits = self.module_logits[tasks]
        if self.trainable_task is not None:  # other rows of Z stay out of the graph: exactly zero gradient
            logits = torch.where((tasks == self.trainable_task)[:, None], logits, logits.detach())
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:
            tiny = torch.finfo(logits.dtype).eps
            u = torch.rand_like(logits).clamp(tiny, 1 - tiny)
            z = torch.sigmoid((logits + u.log() - (-u).log1p()) / self.temperature)
        else:
            z = torch.sigmoid(logits)
        return z / (z.sum(-1, keepdim=True) + EPS)

    def task_factors(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """A^{(t)} as (rows, d_in, r) and B^{(t)} as (rows, r, d_out) from (rows, h, |S|) weights."""
        rows = weights.shape[0]
        A = torch.einsum("bqs,qsdr->bqdr", weights, self.lora_A).reshape(rows, -1, self.r)
        B = torch.einsum("bqs,qsrd->bqrd", weights, self.lora_B).transpose(1, 2).reshape(rows, self.r, -1)
        return A, B

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        if self.merged:
            self.check_merged_rows(x)
            return h
        tasks = self.row_tasks(x)
        weights = self.allocation_weights(tasks)  # (rows, h, |S|)
        per_row = x.shape[:-1].numel() // x.shape[0]
        # Reported per token: each skill's logit and share of the row's task, averaged over the splits.
        logits = self.module_logits[tasks].view(-1, self.n_splits, self.n_skills).mean(1)
        self.context.route(self.site, logits.repeat_interleave(per_row, 0),
                           weights.mean(1).repeat_interleave(per_row, 0), None, x)
        A, B = self.task_factors(weights.to(x.dtype))
        delta = x.reshape(x.shape[0], per_row, -1).bmm(A).bmm(B) / self.r
        return h + delta.view(h.shape)

    def task_delta(self, task: int) -> Tensor:
        was = self.training
        self.eval()  # the merged weight is the deterministic σ(Z) one
        weights = self.allocation_weights(torch.tensor([task], device=self.module_logits.device))
        self.train(was)
        A, B = self.task_factors(weights.to(self.lora_A.dtype))
        return (A[0] @ B[0]).t() / self.r

    def extra_repr(self) -> str:
        return f"r={self.r}, n_skills={self.n_skills}, n_splits={self.n_splits}, n_tasks={self.num_tasks}"


@register_method
@dataclass
class PolytroponConfig(AdapterConfig):
    """Polytropon's hyperparameters, peft's names: rank ``r`` of every skill, ``n_skills`` |S|, ``n_tasks``
    |T|, ``n_splits`` h (1: Poly; > 1: Multi-Head Routing), the Gumbel-sigmoid ``temperature`` τ,
    ``allocation_lr_ratio`` (Z's LR over the skills') and ``default_task`` (rows without a task id)."""

    r: int = 2
    n_skills: int = 4
    n_tasks: int = len(MULTITASK_TASKS)
    n_splits: int = 1
    temperature: float = 1.0
    allocation_lr_ratio: float = 10.0
    default_task: int = 0

    method = "polytropon"
    side_inputs = ("task_ids",)
    peft_type = "POLY"
    peft_keys = {"lora_A": "poly_lora_A", "lora_B": "poly_lora_B", "module_logits": "poly_router.module_logits"}
    card = MethodCard(
        title="Polytropon", paper="Ponti et al., EACL 2023", arxiv="2202.13914", date="2022-02",
        idea=r"an inventory of LoRA skills per layer; each task learns a soft binary allocation over them "
             r"(Gumbel-sigmoid) and averages its skills; new tasks learn only a new allocation",
        trains=r"skills $A_s$, $B_s$ and allocation logits $Z$ per linear", frozen=r"$W_0$", mergeable=True,
        params=r"S\,r(d_{in}+d_{out})+T\,S", chapter="polytropon", bibkey="ponti2023polytropon",
        params_note=r"$S$ skills, $T$ tasks; with $h$ splits (MHR) the logits are $T\,h\,S$",
        merge_note=r"per task: $\Delta W_t=\frac1r B^{(t)}A^{(t)}$ with $w=\sigma(Z_t)$ normalised (merge_task)",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, n_skills=self.n_skills, n_tasks=self.n_tasks, n_splits=self.n_splits)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.allocation_lr_ratio <= 0:
            raise ValueError(f"allocation_lr_ratio must be positive, got {self.allocation_lr_ratio}")
        if not 0 <= self.default_task < self.n_tasks:
            raise ValueError(f"default_task must be a task id in [0, n_tasks={self.n_tasks}), got {self.default_task}")

    def build_layer(self, site: Site, scope: AdapterScope) -> PolyLinear:
        return PolyLinear(site.module, self.r, self.n_skills, self.n_splits, self.n_tasks, self.temperature,
                          self.default_task)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """|S| r (d_in + d_out) skill parameters plus |T| h |S| allocation logits per adapted linear."""
        return self.n_skills * self.r * (d_in + d_out) + self.n_tasks * self.n_splits * self.n_skills

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, int]]:
        """Skill rank r and skill count |S| together (at a fixed |S| the count moves by r(d_in + d_out) per skill)."""
        return mixture_budget_candidates(cls, experts="n_skills")

    @classmethod
    def budget_order(cls, values: dict[str, int], count: int, target: int) -> tuple[float, ...]:
        """Matched first, then the skill count nearest the default |S|, the nearest count, the larger rank."""
        return mixture_budget_order(cls, values, count, target, experts="n_skills")

    def param_groups(self, model: AdapterModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Two speeds: the allocation logits at ``allocation_lr_ratio`` × lr and no weight decay (a decayed
        logit drifts to σ = ½, a change of allocation), everything else at lr."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        logits = [p for n, p in named if n.endswith(".module_logits")]
        rest = [p for n, p in named if not n.endswith(".module_logits")]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                  {"params": logits, "lr": lr * self.allocation_lr_ratio, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        if self.temperature != 1.0:
            raise ValueError(f"peft's poly samples at temperature 1; this adapter uses {self.temperature}")
        return {"peft_type": self.peft_type, "poly_type": "poly", "r": self.r, "n_tasks": self.n_tasks,
                "n_skills": self.n_skills, "n_splits": self.n_splits, "target_modules": target_modules,
                "exclude_modules": None, "modules_to_save": self.modules_to_save or None, "init_weights": True}

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # Modules excluded by peft's exclude_modules would be adapted here: such files are not read.
        return (super().peft_matches(peft_config) and peft_config.get("poly_type", "poly") == "poly"
                and not peft_config.get("exclude_modules"))

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> PolytroponConfig:
        targets = peft_config["target_modules"]
        return cls(r=peft_config["r"], n_tasks=peft_config["n_tasks"], n_skills=peft_config["n_skills"],
                   n_splits=peft_config.get("n_splits", 1), default_task=0,
                   target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
                   modules_to_save=list(peft_config.get("modules_to_save") or []))


def _poly_layers(model: AdapterModel) -> dict[str, PolyLinear]:
    layers = {n: l for n, l in model.adapter_layers().items() if isinstance(l, PolyLinear)}
    if not layers:
        raise ValueError(f"the model has no Polytropon layers (adapter {model.adapter_config.method!r})")
    return layers


def train_allocation_only(model: AdapterModel, task: int) -> AdapterModel:
    """Few-shot transfer by allocation alone: freeze every parameter (skills, task head, everything) except
    the allocation logits, and let gradient reach only row ``task`` of every Z. In place; returns ``model``.
    The other rows get an exactly zero gradient, and :meth:`PolytroponConfig.param_groups` gives Z no weight
    decay, so AdamW leaves them unchanged."""
    layers = _poly_layers(model)
    n_tasks = next(iter(layers.values())).num_tasks
    if not 0 <= task < n_tasks:
        raise ValueError(f"task must be an id in [0, {n_tasks}), got {task}")
    model.requires_grad_(False)
    for layer in layers.values():
        layer.module_logits.requires_grad_(True)
        layer.trainable_task = task
    return model


@torch.no_grad()
def allocation(model: AdapterModel) -> Tensor:
    """(|T|, |S|) σ(Z) averaged over the adapted linears (and splits): the allocation heatmap's rows."""
    layers = _poly_layers(model).values()
    return torch.stack([torch.sigmoid(l.module_logits.float()).view(l.num_tasks, l.n_splits, l.n_skills).mean(1)
                        for l in layers]).mean(0).cpu()


def allocation_entropy(probs: Tensor) -> Tensor:
    """Mean binary entropy of σ(Z) entries per task row, over log 2 (the paper's discreteness measure:
    1 = every skill at ½, 0 = a hard subset)."""
    xlogy = torch.special.xlogy  # 0 · log 0 = 0
    return (-(xlogy(probs, probs) + xlogy(1 - probs, 1 - probs)) / math.log(2)).mean(-1)
