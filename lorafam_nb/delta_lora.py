"""Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices (Zi et al., 2023,
arXiv 2309.02411).

LoRA trains :math:`A \\in \\mathbb{R}^{r \\times d_{in}}`, :math:`B \\in \\mathbb{R}^{d_{out} \\times r}` and
never touches the pretrained :math:`W`. Delta-LoRA also moves :math:`W`, without a gradient or an optimizer
state for it: after the optimizer has turned :math:`(A^{(t)}, B^{(t)})` into :math:`(A^{(t+1)}, B^{(t+1)})`,

    Δ_AB^(t) = s · (B^(t+1) A^(t+1) − B^(t) A^(t)),        s = α / r
    W^(t+1)  = W^(t) + λ · Δ_AB^(t)    if t > K,    W^(t+1) = W^(t) otherwise

with update ratio λ and start step K, for optimizer steps t = 0, 1, … as in the paper's Algorithm 1 (the
first write follows step t = K + 1). The forward pass is LoRA's without dropout,
``h = W^(t) x + b + s · B^(t) A^(t) x``: because :math:`W` and :math:`sBA` then see the same input,
:math:`\\partial L/\\partial W = \\partial L/\\partial (sBA)`, and the change of the product is a free
surrogate for :math:`W`'s own update. Dropout on the branch would break that identity, so it is refused.

* The paper writes the product as :math:`AB` (factors swapped); only the product matters. Whether the
  delta carries :math:`s` is not explicit in every place; we include it, so the delta is the change of
  the branch's effective weight (as the LoRAFactory implementation does).
* Only whole optimizer steps count (after gradient accumulation): the hook snapshots :math:`A, B` in
  ``on_after_backward`` and writes :math:`W` in ``on_step_end``.
* The write is one GEMM of rank :math:`2r`, :math:`W \\mathrel{+}= λs\\,[B^{(t+1)}, B^{(t)}]
  [A^{(t+1)}; -A^{(t)}]`, in :math:`W`'s own fp32 storage: no dense temporary, no gradient buffer.

Because :math:`W` changes, it belongs to the adapter's saved state (and so to every trainer checkpoint,
which holds the whole adapter state). The pieces that any method writing into the frozen backbone
needs (the layer that saves its :math:`W`, the in-place write) live here and PeriodicLoRA
(``plora.py``) reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .core import AdapterModel, MethodCard, register_method
from .lora import LoraConfig, LoRALinear
from .trainer import Callback, Trainer

__all__ = ["BackboneLoRALinear", "DeltaLoRAUpdate", "DeltaLoraConfig", "add_to_backbone"]


@torch.no_grad()
def add_to_backbone(layer: LoRALinear, B: Tensor, A: Tensor, alpha: float) -> None:
    """``W ← W + alpha · B A`` in place, in W's own storage: no autograd, no dense temporary."""
    W = layer.base_layer.weight
    W.addmm_(B.to(W.dtype), A.to(W.dtype), alpha=alpha)


class BackboneLoRALinear(LoRALinear):
    """A LoRA layer whose backbone weight ``W`` is rewritten during training (Delta-LoRA, PLoRA).

    ``W`` stays a frozen parameter (``requires_grad=False``: no gradient, no optimizer state), but since
    training changes it, it is part of what the adapter saves: ``adapter_state_dict`` adds
    ``base_layer.weight``, so loading the adapter into a fresh pretrained model reproduces the trained one.
    ``merge`` and ``unmerge`` add and subtract ``sBA`` from the *current* ``W``, as for LoRA.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, scaling: float) -> None:
        if base_layer.weight.dtype not in (torch.float32, torch.float64):
            # Per-step deltas are ~1e-4 of W; in bf16/fp16 (8/11-bit mantissa) most would round away.
            raise ValueError(f"this method writes small updates into W, which must be float32 or float64; "
                             f"got {base_layer.weight.dtype}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, scaling)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        if self.merged:
            raise ValueError("the saved W must not contain sBA: unmerge() before saving or loading the adapter")
        return {**super().adapter_state_dict(), "base_layer.weight": self.base_layer.weight}


class DeltaLoRAUpdate(Callback):
    """After each optimizer step t > K (Algorithm 1): ``W ← W + λ s (B^(t+1) A^(t+1) − B^(t) A^(t))``."""

    def __init__(self, model: AdapterModel, update_ratio: float, start_step: int) -> None:
        self.layers: dict[str, BackboneLoRALinear] = model.adapter_layers()
        self.update_ratio, self.start_step = update_ratio, start_step
        # (A^(t), B^(t)) per layer, held only between backward and the end of the step: r(d_in + d_out) numbers.
        self._before: dict[str, tuple[Tensor, Tensor]] = {}

    def on_after_backward(self, trainer: Trainer) -> None:
        if trainer.step > self.start_step:  # trainer.step = t, the number of optimizer steps done
            self._before = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in self.layers.items()}

    def on_step_end(self, trainer: Trainer) -> None:
        for name, (A_t, B_t) in self._before.items():
            layer = self.layers[name]
            # B'A' − BA as a single rank-2r product [B', B] [A'; −A]: one GEMM, rounded once.
            B = torch.cat([layer.lora_B.detach(), B_t], dim=1)
            A = torch.cat([layer.lora_A.detach(), -A_t], dim=0)
            add_to_backbone(layer, B, A, self.update_ratio * layer.scaling)
        self._before = {}


@register_method
@dataclass
class DeltaLoraConfig(LoraConfig):
    """Delta-LoRA: LoRA (peft's names) plus ``update_ratio`` λ and ``start_step`` K; ``lora_dropout`` must be 0.

    Defaults λ = 2, K = 500: the paper's GPT-2/E2E setting as our specification recalls it (not re-verified);
    the paper tunes both per task.
    """

    update_ratio: float = 2.0
    start_step: int = 500

    method = "delta_lora"
    card = MethodCard(
        title="Delta-LoRA", paper="Zi et al., arXiv 2023", arxiv="2309.02411", date="2023-09",
        idea=r"LoRA, and after every step the change of $sBA$, times $\lambda$, is also added to $W$",
        trains=r"$A$, $B$; $W$ moves by $\lambda\,\Delta(sBA)$ without gradient or optimizer state",
        frozen="nothing for good: $W$ gets no gradient, but is written", mergeable=True,
        params=r"r(d_{in}+d_{out})", chapter="delta_lora", bibkey="zi2023deltalora",
        params_note=r"in the optimizer; $W$ changes too and is saved with the adapter",
        merge_note="into the updated $W$: the result is a dense weight, not a small adapter",
    )
    peft_type = None  # W is modified: no peft LoRA file can describe the result

    @classmethod
    def run_settings(cls, knob: int, steps: int, lr: float) -> dict[str, Any]:
        """The W update starts after the first tenth of the run (the paper's K = 500 assumes thousands)."""
        return {"start_step": steps // 10}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_dropout > 0:
            raise ValueError(f"Delta-LoRA removes dropout from the LoRA branch (the W update is the gradient "
                             f"surrogate only when W and sBA see the same input); got lora_dropout={self.lora_dropout}")
        if self.update_ratio < 0:
            raise ValueError(f"update_ratio (λ) must be >= 0, got {self.update_ratio}")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"start_step (K) must be a non-negative integer, got {self.start_step!r}")

    def make_layer(self, name: str, module: nn.Module) -> BackboneLoRALinear:
        return BackboneLoRALinear(module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        return [DeltaLoRAUpdate(model, self.update_ratio, self.start_step)]
