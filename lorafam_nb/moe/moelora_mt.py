"""MOELoRA: When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task Medical Applications
(Liu et al., SIGIR 2024; arXiv 2310.18339).

One LoRA shared by heterogeneous tasks lets them interfere; one LoRA per task shares nothing. MOELoRA
splits a LoRA of total rank N·r into N experts of rank r and mixes them, per sample, by weights that come
from the sample's **task identity alone**:

    ω_t = softmax(W_T e_t),   e_t = E_T[t]                           (one gate for the whole model)
    h = W_0 x + b_0 + (α / (N r)) Σ_{i=1}^{N} ω_{t,i} B_i A_i drop(x)

* Experts: A_i ∈ R^{r×d_in}, B_i ∈ R^{d_out×r}; the scale uses the *total* rank N·r (the paper's r = 16 with
  N = 8 experts of rank 2 is ``r=2, num_experts=8`` here: ``r`` is the expert rank, as in every mixture of
  the package, and the parameter count equals one LoRA of rank N·r).
* The gate: a task embedding table E_T ∈ R^{|T|×d_T} and W_T ∈ R^{N×d_T} (no bias), dense softmax, no
  top-k, no noise, no auxiliary loss. It never sees x. The variant the authors' training script uses
  (``MMOELoraConfigS``) computes ω_t once per forward from **one model-level** (E_T, W_T) and hands it to
  every layer; here that gate lives in the model's :class:`~lorafam_nb.core.AdapterScope` (saved once) and
  every layer evaluates it on its rows' task ids, so gradients from every layer sum into the one gate.
* Task ids: 0-based indices (``task_ids`` side input, one per row; the book's multi-task setting indexes
  :data:`lorafam_nb.multitask.MULTITASK_TASKS`). The authors' table has |T|+1 rows with an unused row 0 for
  1-based ids; we drop that row (it never receives a gradient). A forward without ``task_ids`` is task
  ``default_task`` (0), which is what a single-task run trains.
* Init (authors' code): A_i ~ N(0, 0.01²), B_i = 0 (the model starts as the base model), E_T ~ N(0, 1)
  (``nn.Embedding``), W_T Kaiming-uniform (``nn.Linear``).
* Merging: for a fixed task t, ΔW_t = (α/(N r)) Σ_i ω_{t,i} B_i A_i is one matrix
  (:func:`~lorafam_nb.moe.layers.merge_task`; ``model.merge()`` merges ``default_task``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterModel, AdapterScope, MethodCard, Site, register_method, require_positive_ints
from ..multitask import MULTITASK_TASKS
from .experts import LoRAExperts
from .layers import MixtureBudget, TaskRoutedLayer, merge_task
from .routers import TaskRouter, router_dtype

__all__ = ["GATE_KEY", "MOELoRAConfig", "MOELoRALinear", "gate_entropy", "merge_task", "shared_gate", "task_gates"]

GATE_KEY = "moelora_task_gate"  # the shared gate's key in the model's AdapterScope


class MOELoRALinear(TaskRoutedLayer):
    """``nn.Linear`` plus N LoRA experts of rank r, weighted per row by the model's shared task gate."""

    def __init__(self, base_layer: nn.Linear, gate: TaskRouter, num_experts: int, r: int, lora_alpha: float,
                 lora_dropout: float, num_tasks: int, default_task: int = 0, init_std: float | None = 0.01) -> None:
        super().__init__(base_layer, num_tasks, default_task)
        w = base_layer.weight
        # α over the total rank N·r: the paper's scaling (α / lora_r, with lora_r split into the experts).
        self.experts = LoRAExperts(num_experts, r, base_layer.in_features, base_layer.out_features,
                                   lora_alpha / (num_experts * r), dtype=w.dtype, device=w.device)
        if init_std is not None:  # None keeps LoRA's Kaiming-uniform A
            nn.init.normal_(self.experts.lora_A, std=init_std)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # A submodule so that .to() reaches it; the scope saves it once (see adapter_state_dict).
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        if self.merged:
            self.check_merged_rows(x)
            return h
        routing = self.gate(self.row_tasks(x))  # (rows, N): ω_t of each row's task
        per_row = x.shape[:-1].numel() // x.shape[0]
        omega = routing.weights.repeat_interleave(per_row, 0)  # every token of a row shares its row's ω_t
        self.context.route(self.site, routing.logits.repeat_interleave(per_row, 0), omega, None, x)
        delta = self.experts.dense(self.lora_dropout(x.reshape(-1, x.shape[-1])), omega)
        return h + delta.view(h.shape).to(h.dtype)

    def task_delta(self, task: int) -> Tensor:
        omega = self.gate(torch.tensor([task], device=self.gate.weight.device)).weights[0]  # (N,)
        A, B = self.experts.lora_A, self.experts.lora_B
        # Σ_i ω_i B_i A_i = [B_1 … B_N] diag(ω ⊗ 1_r) [A_1; …; A_N], without forming N dense products.
        scaled = (B * omega.to(B.dtype)[:, None, None]).permute(1, 0, 2).reshape(B.shape[1], -1)
        return self.experts.scaling * scaled @ A.reshape(-1, A.shape[-1])

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The experts: the shared gate is the scope's to save (once per model)."""
        return {k: v for k, v in super().adapter_state_dict().items() if not k.startswith("gate.")}


@register_method
@dataclass
class MOELoRAConfig(MixtureBudget, AdapterConfig):
    """MOELoRA's hyperparameters: ``num_experts`` N, expert rank ``r`` (total rank N·r), ``lora_alpha`` α
    (scale α/(N·r)), ``lora_dropout`` on the expert input, ``num_tasks`` |T|, ``task_dim`` d_T of the task
    embedding, ``default_task`` (the id of rows that carry none) and ``init_std`` of the experts' A (None:
    LoRA's Kaiming-uniform A instead of the authors' N(0, 0.01²)).
    Defaults: the paper's N = 8, total rank 16, α = 32, dropout 0.1, d_T = 64; |T| is the book's setting."""

    r: int = 2
    num_experts: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    num_tasks: int = len(MULTITASK_TASKS)
    task_dim: int = 64
    default_task: int = 0
    init_std: float | None = 0.01

    method = "moelora_mt"
    side_inputs = ("task_ids",)
    card = MethodCard(
        title="MOELoRA (multi-task)", paper="Liu et al., SIGIR 2024", arxiv="2310.18339", date="2023-10",
        idea=r"a rank-$Nr$ LoRA split into $N$ experts, mixed per sample by a softmax gate that sees only the "
             r"task's embedding; one gate for the whole model, mergeable per task",
        trains=r"$A_i$, $B_i$ per expert; one task embedding $E_T$ and gate $W_T$ per model", frozen=r"$W_0$",
        mergeable=True, params=r"N\,r(d_{in}+d_{out})", chapter="moelora_mt", bibkey="liu2024moelora",
        params_note=r"plus the model's one gate, $(|T|+N)\,d_T$",
        merge_note=r"per task: $\Delta W_t=\frac{\alpha}{Nr}\sum_i\omega_{t,i}B_iA_i$ (merge_task)",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, num_experts=self.num_experts, num_tasks=self.num_tasks, task_dim=self.task_dim)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.default_task < self.num_tasks:
            raise ValueError(f"default_task must be a task id in [0, num_tasks={self.num_tasks}), got {self.default_task}")
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std must be positive (or None: LoRA's Kaiming-uniform A), got {self.init_std}")

    def gate(self, site: Site) -> TaskRouter:
        w = site.module.weight
        return TaskRouter(self.num_tasks, self.num_experts, self.task_dim, dtype=router_dtype(w.dtype), device=w.device)

    def build_layer(self, site: Site, scope: AdapterScope) -> MOELoRALinear:
        gate = scope.shared(GATE_KEY, lambda: self.gate(site))
        return MOELoRALinear(site.module, gate, self.num_experts, self.r, self.lora_alpha, self.lora_dropout,
                             self.num_tasks, self.default_task, self.init_std)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Experts on one d_out × d_in linear: N r (d_in + d_out), one rank-N·r LoRA's count."""
        return self.num_experts * self.r * (d_in + d_out)

    def gate_parameters(self) -> int:
        """The model's one gate: |T| d_T (task embeddings) + N d_T (W_T)."""
        return (self.num_tasks + self.num_experts) * self.task_dim

    def model_parameters(self, sites: list[Site]) -> int:
        return sum(self.site_parameters(s) for s in sites) + (self.gate_parameters() if sites else 0)

    @classmethod
    def sized(cls, values: dict[str, Any] | int, target_modules: list[str] | str, steps: int = 1,
              lr: float = 1e-3, **fields: Any) -> AdapterConfig:
        """As every method, with α = 2 × the *total* rank N·r: the scale α/(N·r) is then LoRA's 2."""
        values = values if isinstance(values, dict) else {cls.budget_knob: values}
        experts = values.get("num_experts", cls.__dataclass_fields__["num_experts"].default)
        fields.setdefault("lora_alpha", 2.0 * values[cls.budget_knob] * experts)
        return super().sized(values, target_modules, steps, lr, **fields)


def shared_gate(model: AdapterModel) -> TaskRouter:
    """The model's one task gate (E_T, W_T)."""
    if GATE_KEY not in model.adapter_scope.entries:
        raise ValueError(f"the model has no MOELoRA gate (adapter {model.adapter_config.method!r})")
    return model.adapter_scope.entries[GATE_KEY]


@torch.no_grad()
def task_gates(model: AdapterModel) -> Tensor:
    """(|T|, N) ω_t for every task id: the rows of the gate heatmap."""
    gate = shared_gate(model)
    return gate(torch.arange(gate.task_embedding.num_embeddings, device=gate.weight.device)).weights.cpu()


def gate_entropy(omega: Tensor, normalised: bool = True) -> Tensor:
    """Entropy of each row of ω (nats); divided by log N when ``normalised`` (1 = uniform, 0 = one expert)."""
    h = -(omega * omega.clamp_min(1e-12).log()).sum(-1)
    return h / torch.log(torch.tensor(float(omega.shape[-1]))) if normalised else h

