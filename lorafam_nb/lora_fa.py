"""LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning
(Zhang et al., 2023, arXiv 2308.03303).

LoRA with a *frozen* down-projection. For a batch of tokens :math:`X \\in \\mathbb{R}^{N \\times d_{in}}`
(rows), the frozen :math:`W_0 \\in \\mathbb{R}^{d_{out} \\times d_{in}}`, the frozen random
:math:`A \\in \\mathbb{R}^{r \\times d_{in}}` and the trained :math:`B \\in \\mathbb{R}^{d_{out} \\times r}`:

    H = X W_0ᵀ + b_0 + s · Z Bᵀ,    Z = drop_p(X) Aᵀ ∈ ℝ^{N × r},    s = α / r

With the upstream gradient :math:`G = \\partial L / \\partial H`:

    ∂L/∂B = s · Gᵀ Z         ∂L/∂X = G (W_0 + s·BA)         (∂L/∂A = s (GB)ᵀ X is never formed)

so backward needs ``Z`` (N·r numbers) where LoRA needs ``X`` (N·d_in numbers): the activation memory of
every adapted linear drops from the width of its input to the rank. That is the paper's whole point,
and it only materialises if autograd really does not keep ``X`` — hence :class:`_FusedLoRAFA`.

* ``A``: LoRA's Kaiming-uniform init (as peft's ``create_lorafa_optimizer``), then ``requires_grad=False``;
  it stays an (untrainable) parameter, so it is in the adapter's state dict and saved with ``B``.
* ``B = 0`` at init: the adapted model starts at the pretrained one.
* ``ΔW = s·BA`` keeps its row space inside that of the fixed ``A``; it merges exactly like LoRA's.
* v1 of the paper: plain AdamW on ``B`` (v2's preconditioned gradient ``g_B (AAᵀ)⁻¹ / s²`` is not this method).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import MethodCard, register_method
from .lora import LoraConfig, LoRALinear

__all__ = ["LoraFAConfig", "LoRAFALinear", "matching_rank"]


class _FusedLoRAFA(torch.autograd.Function):
    """``x (W0 + s·BA)ᵀ + b`` in one GEMM, saving ``Zᵀ = A xᵀ`` (r × N) instead of ``x`` for backward.

    The forward folds ``s·BA`` into the weight exactly as LoRA's fused path does; the only extra
    work is the skinny ``Zᵀ`` (N·d_in·r flops), kept in the ``(r × N)`` layout that makes
    ``dB = s·(Zᵀ g)ᵀ`` the fast product on CPU. ``W0``, ``A``, ``B`` are parameters (not activations);
    ``dx`` needs only them. ``A`` gets no gradient: the caller guarantees it is frozen.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        Zt = A @ x.reshape(-1, x.shape[-1]).t() if ctx.needs_input_grad[4] else None
        ctx.save_for_backward(Zt, weight, A, B)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        Zt, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])
        dx = dB = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ torch.addmm(weight, B, A, alpha=s)).view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            dB = Zt.mm(g2).t().mul_(s)
        return dx, None, None, None, dB, None


class LoRAFALinear(LoRALinear):
    """A LoRA layer whose ``lora_A`` is frozen right after LoRA's random init; only ``lora_B`` trains.

    When training in fp32 without active dropout the forward is :class:`_FusedLoRAFA`. Every other
    case goes to LoRA's own forward: without autograd nothing is saved anyway; merged, half precision,
    active branch dropout or ``lora_A`` unfrozen by hand take its unfused path, where a frozen ``A``
    already means autograd keeps ``Z`` and not ``x`` — but active dropout keeps its own mask of ``x``'s
    size (a float tensor on CPU), needed for ``dx`` through the branch: use ``lora_dropout=0`` for the saving.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, scaling: float) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, scaling)
        self.lora_A.requires_grad_(False)

    def _can_fuse(self) -> bool:
        # _FusedLoRAFA returns no gradient for A; if someone unfreezes it, LoRA's path computes one.
        return super()._can_fuse() and not self.lora_A.requires_grad

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self._can_fuse() or not torch.is_grad_enabled():
            return super().forward(x)
        return _FusedLoRAFA.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                  self.scaling)


@register_method
@dataclass
class LoraFAConfig(LoraConfig):
    """LoRA-FA: LoRA's hyperparameters (``r``, ``lora_alpha``, ``lora_dropout``) with ``A`` frozen.

    To match LoRA's trainable count at rank ``r_L`` use ``r = r_L · Σ(d_in + d_out) / Σ d_out``
    (``2 r_L`` when the adapted linears have ``Σ d_in = Σ d_out``, as MiniLM's six do).
    """

    method = "lora_fa"
    card = MethodCard(
        title="LoRA-FA", paper="Zhang et al., arXiv 2023", arxiv="2308.03303", date="2023-08",
        idea=r"freeze the random down-projection $A$ and train only $B$: backprop keeps $XA^\top$ instead of $X$",
        trains=r"$B$", frozen=r"$W_0$; the random $A$", mergeable=True,
        params=r"r\,d_{out}", chapter="lora_fa", bibkey="zhang2023lorafa",
        params_note=r"plus the frozen $r\,d_{in}$ of $A$",
    )

    def make_layer(self, name: str, module: nn.Module) -> LoRAFALinear:
        return LoRAFALinear(module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    # peft has no LoRA-FA adapter type: it is a plain LoRA adapter trained by another optimizer
    # (peft's create_lorafa_optimizer). We export as LORA (inherited to_peft); a peft LORA file reads
    # back as plain LoRA, since nothing in it says A was frozen.
    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        return False

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters LoRA-FA adds to one d_out × d_in linear: r·d_out (plus r·d_in frozen in A)."""
        return self.r * d_out


def matching_rank(r_lora: int, shapes: Iterable[tuple[int, int]]) -> float:
    """The LoRA-FA rank with LoRA's trainable count at rank ``r_lora`` over linears of ``(d_in, d_out)``
    shapes: ``r_lora · Σ(d_in + d_out) / Σ d_out`` (round it to an integer yourself)."""
    shapes = list(shapes)
    return r_lora * sum(d_in + d_out for d_in, d_out in shapes) / sum(d_out for _, d_out in shapes)
