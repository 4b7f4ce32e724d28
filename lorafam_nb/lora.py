"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv 2106.09685).

The frozen weight :math:`W_0 \\in \\mathbb{R}^{d_{out} \\times d_{in}}` is adapted by a rank-:math:`r`
update :math:`\\Delta W = s\\,BA` with :math:`A \\in \\mathbb{R}^{r \\times d_{in}}`,
:math:`B \\in \\mathbb{R}^{d_{out} \\times r}` and :math:`s = \\alpha / r`:

    h = W_0 x + b_0 + s · B A drop_p(x)

* ``B = 0`` at init, so the adapted model starts exactly at the pretrained one.
* ``A`` is Kaiming-uniform with ``a = √5`` (bound :math:`1/\\sqrt{d_{in}}`), as in the reference code
  (microsoft/LoRA ``loralib``) and peft; the paper's text says "random Gaussian".
* Dropout acts on the input of the LoRA branch only.
* After training, :math:`W = W_0 + sBA` is folded into the base weight (no inference cost).

:class:`LoRALinear` is also the base that the scaling/optimizer variants of the book reuse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import AdapterConfig, AdapterLayer, MethodCard, register_method

__all__ = ["LoraConfig", "LoRALinear"]


class _FusedLoRA(torch.autograd.Function):
    """``x (W0 + s·BA)^T + b`` in one GEMM, with the LoRA gradients in the cheapest layouts.

    Forward folds ``s·BA`` into a temporary weight (r·d_in·d_out flops, negligible next to the GEMM),
    so the adapter adds no activation-sized work to the forward pass. Backward recomputes that
    weight rather than storing it, and forms the skinny products as ``(r × N)`` matrices: on CPU,
    ``Bᵀgᵀ`` and ``(A xᵀ) g`` run several times faster than ``g B`` and ``gᵀ (x Aᵀ)``. Only ``x`` is
    saved (``W0``, ``A`` and ``B`` are parameters, not activations):

        dx = g (W0 + s·BA)      dA = s · (Bᵀgᵀ) x      dB = s · ((A xᵀ) g)ᵀ
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        ctx.save_for_backward(x, weight, A, B)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ torch.addmm(weight, B, A, alpha=s)).view(x.shape)
        if ctx.needs_input_grad[3]:
            dA = (B.t() @ g2.t()).mm(x2).mul_(s)
        if ctx.needs_input_grad[4]:
            dB = (A @ x2.t()).mm(g2).t().mul_(s)
        return dx, None, None, dA, dB, None


class LoRALinear(AdapterLayer):
    """``nn.Linear`` plus the low-rank branch ``s · B A``.

    ``lora_A`` (r × d_in) and ``lora_B`` (d_out × r) are stored as plain parameters in the paper's
    orientation, so ``delta_weight`` is literally ``s * B @ A``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, scaling: float) -> None:
        super().__init__(base_layer)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        d_out, d_in = base_layer.weight.shape
        w = base_layer.weight
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, scaling
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=w.dtype, device=w.device))
        # kaiming_uniform_(a=√5) on an (r, d_in) tensor draws from U(-1/√d_in, 1/√d_in).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # p = 0 skips the dropout call entirely: it would otherwise copy the activation.
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def _can_fuse(self) -> bool:
        """The fused GEMM is exact enough only in fp32/fp64 (in bf16/fp16 a small s·BA would be rounded
        away when added to W0, so not under autocast either), needs the branch input to equal x (no active
        dropout) and a frozen base."""
        base = self.base_layer
        return (base.weight.dtype in (torch.float32, torch.float64) and not base.weight.requires_grad
                and not torch.is_autocast_enabled(base.weight.device.type)
                and (base.bias is None or not base.bias.requires_grad)
                and (isinstance(self.lora_dropout, nn.Identity) or not self.training))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._can_fuse():
            return _FusedLoRA.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                    self.scaling)
        # Unfused: h + s·(drop(x) Aᵀ) Bᵀ, with addmm doing the scale and the add in one kernel.
        h = self.base_layer(x)
        xa = F.linear(self.lora_dropout(x), self.lora_A)
        return torch.addmm(
            h.reshape(-1, h.shape[-1]), xa.reshape(-1, self.r), self.lora_B.t(), alpha=self.scaling
        ).view(h.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


@register_method
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyperparameters (peft's names): rank ``r``, ``lora_alpha`` (scale α/r), ``lora_dropout``."""

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0

    method = "lora"
    peft_reference = True
    in_smoke_grid = True
    card = MethodCard(
        title="LoRA", paper="Hu et al., ICLR 2022", arxiv="2106.09685", date="2021-06",
        idea=r"freeze $W_0$ and learn its update as a low-rank product $\frac{\alpha}{r}BA$, merged after training",
        trains=r"$A$, $B$", frozen=r"$W_0$ (and its bias)", mergeable=True,
        params=r"r(d_{in}+d_{out})", chapter="lora", bibkey="hu2021lora",
    )
    peft_type = "LORA"
    peft_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def scaling(self) -> float:
        """s = α / r (rsLoRA overrides this)."""
        return self.lora_alpha / self.r

    def make_layer(self, name: str, module: nn.Module) -> LoRALinear:
        return LoRALinear(module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "target_modules": target_modules,
            "modules_to_save": self.modules_to_save or None, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        }

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # Plain LoRA only: rsLoRA and DoRA are their own methods in this package.
        return (super().peft_matches(peft_config) and not peft_config.get("use_rslora")
                and not peft_config.get("use_dora") and peft_config.get("bias", "none") == "none")

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> LoraConfig:
        patterns = [k for k in ("rank_pattern", "alpha_pattern") if peft_config.get(k)]
        if patterns:
            raise ValueError(f"peft's {' and '.join(patterns)} (a rank or α per module) cannot be read: every "
                             f"{cls.method} layer of one adapter has the same r and α here. Re-save the adapter "
                             "from peft without them, or load it with peft")
        return cls(r=peft_config["r"], lora_alpha=peft_config["lora_alpha"],
                   lora_dropout=peft_config.get("lora_dropout", 0.0),
                   target_modules=peft_config["target_modules"],
                   modules_to_save=list(peft_config.get("modules_to_save") or []))

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters LoRA adds to one d_out × d_in linear: r (d_in + d_out)."""
        return self.r * (d_in + d_out)
