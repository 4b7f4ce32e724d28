"""LoRAMoE: Alleviating World Knowledge Forgetting in Large Language Models via MoE-Style Plugin
(Dou et al., ACL 2024, arXiv 2312.09979).

Fine-tuning on much downstream data erodes the world knowledge stored in the frozen backbone. LoRAMoE
replaces the single LoRA of each FFN linear by N LoRA experts mixed *densely* by a router on that
linear's own input (no top-k), and splits the experts into two fixed groups with a *localized*
balancing loss, so that one group serves world-knowledge data and the other the downstream tasks:

    o = W_0 x + b_0 + (α/r) Σ_i G(x)_i B_i A_i drop(x),       G(x) = softmax(W_g x / τ)

* One router per adapted linear, fed with that linear's input (for down_proj / BERT's output.dense the
  d_ff-wide activation). τ = 1 as in the authors' code.
* Expert types: the first N/2 experts are type 1 (downstream), the last N/2 type 0 (world knowledge),
  as the order of the authors' ``torch.concat``. Each sample carries ``task_types`` (0/1), a side input.
* Importance Q_{n,m} = Σ_{tokens j of sample m} G(x_j)_n (padding left out, which the authors' code
  does not do); I_{n,m} = 1 + δ where the expert's type equals the sample's, else 1 − δ;
  L_lbc = cv²(I ∘ Q) = Var/mean², the code's form (the paper prints σ²/μ: see the chapter), one term per
  adapted linear, summed over linears and layers; weight β (``blc_weight``).
* Init: A Kaiming-uniform, B = 0, W_g Kaiming-uniform: the model starts as the base model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core import AdapterContext, MethodCard, Site, register_method
from .layers import MoELinearConfig
from .losses import localized_balance
from .routers import DenseRouter, router_dtype

__all__ = ["LoraMoEConfig", "expert_types"]


def expert_types(num_experts: int, device: torch.device | None = None) -> Tensor:
    """(N,) expert types: the first half 1 (downstream data), the second half 0 (world knowledge)."""
    return (torch.arange(num_experts, device=device) < num_experts // 2).long()


@register_method
@dataclass
class LoraMoEConfig(MoELinearConfig):
    """LoRAMoE's hyperparameters (the authors' names where they have one): ``num_experts`` N (even),
    rank ``r``, ``lora_alpha``, ``lora_dropout``, router ``temperature`` τ, ``blc_alpha`` δ and
    ``blc_weight`` β of the localized balancing loss (β = 0: LoRAMoE without it)."""

    r: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    num_experts: int = 6
    temperature: float = 1.0
    blc_alpha: float = 0.1
    blc_weight: float = 0.1
    target_modules: list[str] | str = "all-linear"
    # Optional: the type of each task id (``task_type_by_id[task_id]``), for multi-task mixes whose
    # examples carry only ``task_id`` (``RunSpec.mix``). Explicit ``task_types`` take precedence.
    task_type_by_id: list[int] = field(default_factory=list)
    # The type of samples that carry neither: 1 (downstream data, what an ordinary fine-tuning run holds),
    # or None to require a type for every sample.
    default_task_type: int | None = 1

    method = "loramoe"
    side_inputs = ("task_types", "task_ids")
    expert_step = 2  # two equal expert groups
    card = MethodCard(
        title="LoRAMoE", paper="Dou et al., ACL 2024", arxiv="2312.09979", date="2023-12",
        idea=r"a dense softmax mixture of LoRA experts per FFN linear, with a localized balancing loss that "
             r"lets one expert group keep world knowledge and the other learn the tasks",
        trains=r"$A_i$, $B_i$ per expert; router $W_g$ per linear", frozen=r"$W_0$", mergeable=False,
        params=r"N\,r(d_{in}+d_{out})+N\,d_{in}", chapter="loramoe", bibkey="dou2024loramoe",
        params_note=r"the router $W_g\in\mathbb{R}^{N\times d_{in}}$ is counted",
        merge_note="the gate depends on each token, so the mixture is no single weight",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts % 2:
            raise ValueError(f"LoRAMoE splits its experts into two equal groups: num_experts must be even, "
                             f"got {self.num_experts}")
        if self.default_task_type not in (0, 1, None):
            raise ValueError(f"default_task_type is 0 (world knowledge), 1 (downstream) or None, got "
                             f"{self.default_task_type}")
        if any(t not in (0, 1) for t in self.task_type_by_id):
            raise ValueError(f"task_type_by_id holds 0 (world knowledge) or 1 (downstream) per task id, "
                             f"got {self.task_type_by_id}")
        if not 0 <= self.blc_alpha < 1:
            raise ValueError(f"blc_alpha (δ) must be in [0, 1), got {self.blc_alpha}")

    def router(self, site: Site, num_experts: int) -> DenseRouter:
        w = site.module.weight
        return DenseRouter(site.d_in, num_experts, self.temperature, dtype=router_dtype(w.dtype), device=w.device)

    def aux_loss_weights(self) -> dict[str, float]:
        return {"localized_balance": self.blc_weight}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        """Σ over adapted linears of cv²(I ∘ Q); samples are the forward's rows (example × choice)."""
        if self.blc_weight == 0 or not context.routes:
            return {}
        sample_types = context.side.get("task_types")
        if sample_types is None and self.task_type_by_id and "task_ids" in context.side:
            ids = context.side["task_ids"]
            sample_types = torch.tensor(self.task_type_by_id, device=ids.device)[ids]
        if sample_types is None and self.default_task_type is not None:
            rows = int(context.routes[0].rows.max()) + 1 if context.routes[0].rows.numel() else 0
            sample_types = torch.full((rows,), self.default_task_type, device=context.routes[0].rows.device)
        if sample_types is None:
            raise ValueError("LoRAMoE's localized balancing loss needs task_types (0 = world knowledge, 1 = "
                             "downstream) per example in the forward call (or task_ids with task_type_by_id, "
                             "or a default_task_type), or blc_weight=0")
        total = None
        for route in context.routes:
            n = route.probs.shape[1]
            types = sample_types.to(route.probs.device)
            importance = route.probs.new_zeros(n, types.shape[0]).index_add(1, route.rows, route.probs.t())
            term = localized_balance(importance, expert_types(n, route.probs.device), types, self.blc_alpha)
            total = term if total is None else total + term
        return {"localized_balance": total}
