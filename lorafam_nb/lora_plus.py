"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh & Yu, ICML 2024, arXiv 2402.12354).

The adapter is LoRA's, unchanged: frozen :math:`W_0 \\in \\mathbb{R}^{d_{out} \\times d_{in}}`,
trained :math:`A \\in \\mathbb{R}^{r \\times d_{in}}` (random) and :math:`B \\in \\mathbb{R}^{d_{out} \\times r}`
(zero at init),

    h = W_0 x + b_0 + (α / r) · B A x.

Only the optimizer changes. LoRA trains A and B with one learning rate η; LoRA+ gives B a larger one,

    η_A = η,        η_B = λ η,        λ = η_B / η_A   (the paper's rule of thumb: λ = 2⁴ = 16).

Why: for a layer of width n trained with Adam, the output change ``ΔB·A x`` is Θ(η_B) while
``B·ΔA x`` is Θ(n η_A) (ΔA moves coherently along x's n coordinates). Both feature updates stay
Θ(1) as n grows only if η_B / η_A = Θ(n); with η_A = η_B one of A, B learns inefficiently.

Groups follow the reference code (ported to peft as ``peft.optimizers.create_loraplus_optimizer``),
so the two build the same optimizer for the same model:

* ``A`` group, LR η: every trainable matrix that is not a LoRA B (LoRA A, and e.g. the head's weight);
* ``B`` group, LR λη: the LoRA B matrices, and every trainable 1-D tensor (head biases, LayerNorm);
  biases and LayerNorm weights in it get no weight decay.

peft also has a group for LoRA on embeddings (its own LR); this package's LoRA adapts linears only,
so that group never has members and is omitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .core import AdapterModel, MethodCard, register_method
from .lora import LoraConfig

__all__ = ["LoraPlusConfig"]


@register_method
@dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA with η_B = ``loraplus_lr_ratio`` × η_A (peft's name for λ); η_A is the trainer's ``lr``."""

    loraplus_lr_ratio: float = 16.0

    method = "lora_plus"
    card = MethodCard(
        title="LoRA+", paper="Hayou, Ghosh & Yu, ICML 2024", arxiv="2402.12354", date="2024-02",
        idea=r"LoRA unchanged, but $B$ learns faster than $A$: $\eta_B=\lambda\eta_A$ with $\lambda\approx 2^4$",
        trains=r"$A$ (learning rate $\eta$), $B$ ($\lambda\eta$)", frozen=r"$W_0$", mergeable=True,
        params=r"r(d_{in}+d_{out})", chapter="lora_plus", bibkey="hayou2024loraplus",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.loraplus_lr_ratio) and self.loraplus_lr_ratio > 0):
            raise ValueError(f"loraplus_lr_ratio (λ = η_B / η_A) must be a positive number, "
                             f"got {self.loraplus_lr_ratio}")

    def param_groups(self, model: AdapterModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """[A group (η), B group (λη), B group without weight decay (λη)], empty groups left out."""
        # B matrices are found by identity, not by name: a renamed parameter cannot fall back to η.
        lora_B = {id(layer.lora_B) for layer in model.adapter_layers().values()}
        owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        A, B, B_no_decay = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in lora_B or p.ndim == 1:
                # transformers' convention, which peft reuses: biases and LayerNorm weights never decay.
                no_decay = name.rpartition(".")[2] == "bias" or isinstance(owner[id(p)], nn.LayerNorm)
                (B_no_decay if no_decay else B).append(p)
            else:
                A.append(p)
        groups = [(A, lr, weight_decay), (B, lr * self.loraplus_lr_ratio, weight_decay),
                  (B_no_decay, lr * self.loraplus_lr_ratio, 0.0)]
        return [{"params": params, "lr": group_lr, "weight_decay": wd} for params, group_lr, wd in groups if params]

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # λ is an optimizer setting that peft's adapter_config.json does not record: a peft LoRA
        # adapter is plain LoRA, and a LoRA+ adapter exports to peft as one (the forward is the same).
        return False
