"""rsLoRA: A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (Kalajdzievski, 2023, arXiv 2312.03732).

LoRA with a different constant in front of the adapter. With frozen
:math:`W_0 \\in \\mathbb{R}^{d_{out} \\times d_{in}}`, :math:`A \\in \\mathbb{R}^{r \\times d_{in}}` (random,
variance independent of r) and :math:`B \\in \\mathbb{R}^{d_{out} \\times r}` (zero at init),

    h = W_0 x + b_0 + γ_r · B A x,        γ_r = α / √r      (LoRA: γ_r = α / r).

Why √r: after one step from B = 0 the adapter's output on an input y carries the factor
``γ_r² (A x)ᵀ(A y)``, a sum of r terms that grows like r. It neither vanishes nor explodes as r grows
only if γ_r ∝ 1/√r (the paper proves this "rank stabilisation" holds throughout training iff
γ_r ∈ Θ(1/√r)). With α/r the update shrinks like 1/r, so large ranks learn no more than small ones.

Training, parameter count r(d_in + d_out) and the exact merge W_0 + γ_r BA are LoRA's; peft's
``LoraConfig(use_rslora=True)`` is the same adapter, and the two interchange through ``save_peft``/``load_peft``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .core import MethodCard, register_method
from .lora import LoraConfig

__all__ = ["RsLoraConfig"]


@register_method
@dataclass
class RsLoraConfig(LoraConfig):
    """LoRA scaled by γ_r = α / √r; same fields as :class:`~lorafam_nb.lora.LoraConfig`."""

    method = "rslora"
    card = MethodCard(
        title="rsLoRA", paper="Kalajdzievski, arXiv 2023", arxiv="2312.03732", date="2023-12",
        idea=r"scale the update by $\alpha/\sqrt{r}$ instead of $\alpha/r$, so that larger ranks keep learning",
        trains=r"$A$, $B$", frozen=r"$W_0$", mergeable=True,
        params=r"r(d_{in}+d_{out})", chapter="rslora", bibkey="kalajdzievski2023rslora",
    )

    def scaling(self) -> float:
        """γ_r = α / √r."""
        return self.lora_alpha / math.sqrt(self.r)

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        return super().to_peft(target_modules) | {"use_rslora": True}

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # A peft rsLoRA config is a plain LoRA config with use_rslora switched on: exactly the peft
        # configs LoRA refuses for that one reason, so each config is read by one method only.
        return bool(peft_config.get("use_rslora")) and LoraConfig.peft_matches({**peft_config, "use_rslora": False})
