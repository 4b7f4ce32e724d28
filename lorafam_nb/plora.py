"""PeriodicLoRA (PLoRA): Breaking the Low-Rank Bottleneck in LoRA Optimization (Meng et al., 2024,
arXiv 2402.16141).

A LoRA adds :math:`sBA` with rank at most :math:`r` to the frozen :math:`W_0`, however long it trains. PLoRA
trains in stages :math:`k = 1, \\dots, S` of :math:`T_s` optimizer steps; inside stage :math:`k` it is plain
LoRA on the current backbone, ``h = W^(k-1) x + b + s · B_k A_k drop(x)``, and at the stage end it
*unloads* the adapter into the backbone and starts a fresh one:

    W^(k) = W^(k-1) + s · B_k A_k,     A_{k+1} ~ Kaiming-uniform (as LoRA),  B_{k+1} = 0,

and the LoRA factors' optimizer state and LR schedule (warm-up included) restart for the next stage. The
task head (``modules_to_save``) is not part of the low-rank stage: its Adam moments and its LR schedule run
on over the whole run, so a stage end does not send it through a second warm-up. The unload
does not change the function (the product moves from the branch into ``W``); after :math:`S` stages

    W^(S) − W_0 = s · Σ_k B_k A_k,     rank ≤ min(S r, d_in, d_out),

at the memory of one rank-:math:`r` LoRA.

*Momentum-based unloading* (``momentum=μ``), which the paper adds against the instability of hard
resets, follows the only concrete implementation we could find (LoRAFactory, ``plora_momentum``; the
paper's own equation could not be retrieved): at each unload

    W ← W + μ · s · B A,     A ← (1 − μ) A,     B ← (1 − μ) B,

with no re-initialisation and no optimizer or schedule reset (the factors live on, so their Adam moments
stay meaningful). The reference unloads this way after every optimizer step (``unload_every=1``). It
does not preserve the function: the layer goes from ``W + sBA`` to ``W + (μ + (1 − μ)²) sBA``.

The last stage's adapter is not unloaded (it merges like any LoRA). The trained ``W`` is saved with the
adapter (and so checkpointed), through the layer shared with Delta-LoRA (``delta_lora.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core import AdapterModel, MethodCard, register_method
from .delta_lora import BackboneLoRALinear, add_to_backbone
from .lora import LoraConfig
from .trainer import Callback, Trainer, lr_lambda

__all__ = ["PLoRALinear", "PLoraConfig", "PeriodicUnload", "lora_factors"]


class PLoRALinear(BackboneLoRALinear):
    """LoRA layer that can unload its product into ``W`` (hard reset or momentum rule)."""

    @torch.no_grad()
    def unload(self, momentum: float | None = None, generator: torch.Generator | None = None) -> None:
        """``momentum=None``: W += sBA, fresh A (drawn from ``generator``), B = 0.
        ``momentum=μ``: W += μ sBA, then A and B shrink by (1 − μ)."""
        if momentum is None:
            add_to_backbone(self, self.lora_B, self.lora_A, self.scaling)
            self.lora_B.zero_()
            # LoRA's init, drawn on the CPU so the numbers do not depend on the device.
            fresh = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
            self.lora_A.copy_(nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator))
        else:
            add_to_backbone(self, self.lora_B, self.lora_A, momentum * self.scaling)
            self.lora_A.mul_(1 - momentum)
            self.lora_B.mul_(1 - momentum)


def lora_factors(model: AdapterModel) -> list[nn.Parameter]:
    """Every layer's ``lora_A`` and ``lora_B``: what a hard unload restarts."""
    return [p for layer in model.adapter_layers().values() for p in (layer.lora_A, layer.lora_B)]


class PeriodicUnload(Callback):
    """Unloads every layer after each ``unload_every`` optimizer steps (except the last step of the run).

    With hard unloads the LoRA factors' parameter group runs its LR schedule over the current stage
    (``stage``: first step and length, checkpointed), and a stage end clears only the factors' Adam state;
    the other groups (the task head) keep their moments and the trainer's whole-run schedule."""

    def __init__(self, model: AdapterModel, unload_every: int, momentum: float | None) -> None:
        self.layers: dict[str, PLoRALinear] = model.adapter_layers()
        self.factors = lora_factors(model)
        self.unload_every, self.momentum = unload_every, momentum
        self.stage: tuple[int, int] | None = None

    def stage_factor(self, trainer: Trainer, step: int) -> float:
        """The factors' LR multiplier at ``step``: the trainer's schedule, restarted at the stage's first step."""
        start, length = self.stage
        cfg = trainer.config
        return lr_lambda(cfg.schedule, int(cfg.warmup_ratio * length), length)(step - start)

    def factor_groups(self, trainer: Trainer) -> list[int]:
        ids = {id(p) for p in self.factors}
        return [i for i, g in enumerate(trainer.optimizer.param_groups) if ids & {id(p) for p in g["params"]}]

    def start_stage(self, trainer: Trainer) -> None:
        """The factors' groups get the current stage's LR now (the scheduler applies it from the next step)."""
        for i in self.factor_groups(trainer):
            trainer.optimizer.param_groups[i]["lr"] = trainer.scheduler.base_lrs[i] * self.stage_factor(trainer, trainer.step)

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.momentum is not None:
            return
        if self.stage is None:  # a fresh run; on resume the checkpointed stage is restored
            self.stage = (trainer.step, min(self.unload_every, trainer.total_steps - trainer.step))
        for i in self.factor_groups(trainer):
            trainer.scheduler.lr_lambdas[i] = lambda step: self.stage_factor(trainer, step)
        self.start_stage(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step % self.unload_every or trainer.step >= trainer.total_steps:
            return
        # A seed per (run, step): the fresh A's are reproducible, also on resume, and use no shared RNG.
        generator = torch.Generator().manual_seed(trainer.config.seed * 1_000_003 + trainer.step)
        for layer in self.layers.values():
            layer.unload(self.momentum, generator)
        if self.momentum is None:
            # Stale Adam moments would mean nothing for the new A, B = 0, so they go and the factors warm up
            # again; the head's moments still describe the head, which the unload did not change.
            for p in self.factors:
                trainer.optimizer.state.pop(p, None)
            self.stage = (trainer.step, min(self.unload_every, trainer.total_steps - trainer.step))
            self.start_stage(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = tuple(state["stage"]) if state["stage"] else None


@register_method
@dataclass
class PLoraConfig(LoraConfig):
    """PLoRA: LoRA (peft's names) plus ``unload_every`` (stage length T_s, optimizer steps) and
    ``momentum`` (None: hard unload and reset; μ in (0, 1): momentum unloading)."""

    unload_every: int = 100
    momentum: float | None = None

    method = "plora"
    card = MethodCard(
        title="PeriodicLoRA", paper="Meng et al., arXiv 2024", arxiv="2402.16141", date="2024-02",
        idea=r"periodically unload $sBA$ into the backbone and restart the LoRA, so the update grows beyond rank $r$",
        trains=r"$A$, $B$, restarted every stage", frozen=r"$W$ between unloads (no gradient)", mergeable=True,
        params=r"r(d_{in}+d_{out})", chapter="plora", bibkey="meng2024periodiclora",
        params_note=r"at any time; the accumulated update is dense, of rank up to $S\,r$ after $S$ stages",
        merge_note="the result is a dense weight: the backbone already holds the unloaded stages",
    )
    peft_type = None  # W is modified: no peft LoRA file can describe the result

    @classmethod
    def run_settings(cls, knob: int, steps: int, lr: float) -> dict[str, Any]:
        """Four stages per run, whatever its length."""
        return {"unload_every": max(1, steps // 4)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.unload_every, int) or self.unload_every <= 0:
            raise ValueError(f"unload_every (stage length T_s) must be a positive integer, got {self.unload_every!r}")
        if self.momentum is not None and not 0 < self.momentum < 1:
            # μ = 1 would zero both factors for good (no gradient reaches A or B when both are 0).
            raise ValueError(f"momentum must be None (hard unload) or in (0, 1), got {self.momentum}")

    def param_groups(self, model: AdapterModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The LoRA factors apart from the rest (the task head): only their state and schedule restart."""
        factors = {id(p) for p in lora_factors(model)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        split = ([p for p in trainable if id(p) in factors], [p for p in trainable if id(p) not in factors])
        return [{"params": params, "lr": lr, "weight_decay": weight_decay} for params in split if params]

    def make_layer(self, name: str, module: nn.Module) -> PLoRALinear:
        return PLoRALinear(module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        return [PeriodicUnload(model, self.unload_every, self.momentum)]
