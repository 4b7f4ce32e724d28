"""One training loop for every method: AdamW, LR schedule, accumulation, evaluation, checkpoints.

Methods that change *training* (not only the forward pass) do so through two seams, both supplied by
the adapter config so that a chapter never edits this loop:

* ``AdapterConfig.param_groups`` — optimizer parameter groups (LoRA+ gives B a larger LR);
* :class:`Callback` — hooks around each step. ``extra_loss`` adds named terms to the loss (AdaLoRA's
  orthogonality penalty; AdaMix's consistency, from a second forward pass on the micro-batch),
  ``on_after_backward`` sees the gradients (AdaLoRA's sensitivity), ``on_step_end`` runs after the
  optimizer step (Delta-LoRA's update of W, PeriodicLoRA's unloading).

Auxiliary losses come through one channel: the adapter's weighted terms of each forward
(:meth:`~lorafam_nb.core.AdapterModel.aux_losses`: MoE load balance, contrastive terms) and the
callbacks' named terms are added to the task loss, and every logged step records each term by name,
with the routing recorder's summary for mixtures.

Several processes (``torchrun``, ``accelerate launch``): the same loop runs data-parallel, unchanged for
the caller (:mod:`~lorafam_nb.distributed`): each process computes its shard of every micro-batch and
the gradients are averaged, so N processes take the steps one process takes on the same global batch;
only rank 0 writes checkpoints and shows progress. ``precision="bf16"`` runs forward passes under
bfloat16 autocast (the GPU path; it runs on CPUs too), with parameters and optimizer state in fp32.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from ``seed + e``; a checkpoint
holds the adapter's whole state (trainable tensors, frozen adapter tensors such as LoRA-FA's ``A``, and
backbone weights a method rewrites), the optimizer, scheduler, RNG states, callback states and the
log, so an interrupted run resumed from it ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed
from .core import AdapterModel
from .tasks import EncodedTask, batch_to, collate, evaluate, score_batch

__all__ = ["Callback", "TrainConfig", "Trainer", "TrainResult", "lr_lambda", "resolve_device", "set_seed"]

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype of forward passes (None: off)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: this process's GPU (its launcher's ``LOCAL_RANK``), else the CPU."""
    if device == "auto":
        return torch.device(f"cuda:{distributed.local_rank()}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class TrainConfig:
    lr: float = 5e-4
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None  # optimizer steps between evaluations (None: only at the end)
    eval_batch_size: int = 32
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    device: str = "auto"
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast
    progress: bool = True
    # Under a launcher with several processes: split each micro-batch over them (True), or let every
    # process train on its own (False: the grid's fan-out gives each process its own runs).
    data_parallel: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        for name in ("lr", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class Callback:
    """Hooks into :class:`Trainer`; override what a method needs. ``trainer`` exposes ``model``,
    ``optimizer``, ``scheduler``, ``step`` (optimizer steps done), ``total_steps`` and ``config``."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def extra_loss(self, trainer: Trainer) -> dict[str, Tensor]:
        """Named terms to add to this micro-batch's loss (already weighted). ``trainer.batch`` is the
        micro-batch (collated, on the device) and ``trainer.scores`` its scores from the forward pass that
        gave the task loss, so a term may run a second forward pass on the same batch (AdaMix's
        consistency between two stochastic passes) through :func:`~lorafam_nb.tasks.score_batch`."""
        return {}

    def on_after_backward(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per logged step
    evals: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    steps: int = 0
    seconds_per_step: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[-1] if self.evals else {}


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR factor at each optimizer step: linear warm-up over ``warmup`` steps, then ``schedule``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    """Train ``model`` on an :class:`~lorafam_nb.tasks.EncodedTask`; evaluate on ``eval_tasks``."""

    def __init__(self, model: nn.Module, train_task: EncodedTask, config: TrainConfig,
                 eval_tasks: list[EncodedTask] | None = None, callbacks: list[Callback] | None = None) -> None:
        if len(train_task) == 0:
            raise ValueError("the training set is empty")
        self.config = config
        self.device = resolve_device(config.device)
        self.parallel = config.data_parallel and distributed.launched()
        if self.parallel:
            distributed.init(self.device)
        self.model = model.to(self.device)
        self.train_task = train_task
        self.eval_tasks = eval_tasks or []
        adapter = model.adapter_config if isinstance(model, AdapterModel) else None
        self.callbacks = (adapter.callbacks(model) if adapter else []) + list(callbacks or [])
        groups = (adapter.param_groups(model, config.lr, config.weight_decay) if adapter else
                  [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr,
                    "weight_decay": config.weight_decay}])
        self.trainable = [p for g in groups for p in g["params"]]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        if self.parallel:  # the same seed gives every process the same start; make sure of it
            with torch.no_grad():
                for p in self.trainable:
                    torch.distributed.broadcast(p.data, src=0)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(train_task) / (config.batch_size * config.grad_accum))
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self._lr_factor(step))
        self.step = 0
        self.result = TrainResult()
        # The current micro-batch and its scores, set before the callbacks' extra_loss runs.
        self.batch: dict[str, Tensor] | None = None
        self.scores: Tensor | None = None

    def _lr_factor(self, step: int) -> float:
        warmup = int(self.config.warmup_ratio * self.total_steps)
        return lr_lambda(self.config.schedule, max(1, warmup) if warmup else 0, self.total_steps)(step)

    # --- data order -------------------------------------------------------------------------
    def micro_batches(self, start_step: int):
        """Micro-batches from optimizer step ``start_step`` on, in a seed-determined order."""
        cfg, n = self.config, len(self.train_task)
        per_epoch = math.ceil(n / cfg.batch_size)  # the last micro-batch of an epoch may be short
        epoch, index = divmod(start_step * cfg.grad_accum, per_epoch)
        offset = index * cfg.batch_size
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
            for i in range(offset, n, cfg.batch_size):
                yield [self.train_task.examples[j] for j in order[i:i + cfg.batch_size]]
            epoch, offset = epoch + 1, 0

    # --- checkpoints ------------------------------------------------------------------------
    def _model_state(self) -> dict[str, Tensor]:
        """What a checkpoint restores: an adapter model's whole adapter state, else the trainable tensors."""
        if isinstance(self.model, AdapterModel):
            return {k: v.detach().clone() for k, v in self.model.adapter_state_dict().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.trainable}

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0 only, under a data-parallel launch: every process holds the same state)."""
        if self.parallel and not distributed.is_main():
            return
        path = Path(self.config.checkpoint_dir) / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step, "config": asdict(self.config), "params": self._model_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "callbacks": [c.state_dict() for c in self.callbacks], "result": asdict(self.result),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint

    def load_checkpoint(self) -> bool:
        path = Path(self.config.checkpoint_dir) / "checkpoint.pt"
        if not path.exists():
            return False
        state = torch.load(path, weights_only=False)
        if isinstance(self.model, AdapterModel):
            self.model.load_adapter_state_dict(state["params"], source=str(path))
        else:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in state["params"].items():
                    params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for callback, cb_state in zip(self.callbacks, state["callbacks"]):
            callback.load_state_dict(cb_state)
        self.result = TrainResult(**state["result"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]
        return True

    # --- loop -------------------------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        """The forward passes' autocast context (disabled at fp32)."""
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def evaluate(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step}
        for task in self.eval_tasks:
            with self.autocast():
                metrics = evaluate(self.model, task, self.config.eval_batch_size, self.device)
            row[task.info.name] = metrics[task.info.metric]
        for callback in self.callbacks:
            callback.on_evaluate(self, row)
        self.result.evals.append(row)
        return row

    def _loss_terms(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """The task loss (``"task"``) and every named auxiliary term of one micro-batch, weighted."""
        batch = batch_to(collate(self.train_task, examples), self.device)
        with self.autocast():  # a term's own forward pass (AdaMix's second one) runs at the same precision
            loss, scores = score_batch(self.model, self.train_task, batch)
            self.batch, self.scores = batch, scores  # what extra_loss hooks may read (see Callback.extra_loss)
            terms = {"task": loss}
            if isinstance(self.model, AdapterModel):
                terms.update(self.model.aux_losses())
            for callback in self.callbacks:
                for name, value in callback.extra_loss(self).items():
                    if name in terms:
                        raise ValueError(f"two sources add a loss term named {name!r}")
                    terms[name] = value
        return terms

    def _loss(self, examples: list[dict[str, Any]]) -> Tensor:
        return torch.stack(list(self._loss_terms(examples).values())).sum()

    def train_step(self, batches: Iterator[list[dict[str, Any]]]) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches from ``batches``, the method's hooks
        included; returns the loss and each auxiliary term (as logged). :meth:`train` runs these in a
        loop; the benchmark interleaves them across setups."""
        cfg = self.config
        total, logged = 0.0, {}
        for _ in range(cfg.grad_accum):
            examples, weight = next(batches), 1.0
            if self.parallel:
                examples, weight = distributed.shard(examples)
            with distributed.synced_step() if self.parallel else nullcontext():
                terms = self._loss_terms(examples)
            loss = torch.stack(list(terms.values())).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at optimizer step {self.step + 1}; run stopped")
            (loss * (weight / cfg.grad_accum)).backward()
            total += loss.item() * weight / cfg.grad_accum
            for name, value in terms.items():
                if name != "task":
                    logged[name] = logged.get(name, 0.0) + value.item() * weight / cfg.grad_accum
        if self.parallel:  # the step of the whole micro-batch: gradients and logged values averaged
            distributed.all_reduce_gradients(self.trainable)
            # On the training device: NCCL reduces GPU tensors only.
            values = torch.tensor([total, *logged.values()], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(values)
            total, *rest = (values / distributed.world_size()).tolist()
            logged = dict(zip(logged, rest))
        for callback in self.callbacks:
            callback.on_after_backward(self)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for callback in self.callbacks:
            callback.on_step_end(self)
        return total, logged

    def train(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        set_seed(cfg.seed)
        if resume and cfg.checkpoint_dir is None:
            raise ValueError("resume=True needs TrainConfig.checkpoint_dir")
        if resume:
            self.load_checkpoint()
        self.model.train()
        for callback in self.callbacks:
            callback.on_train_begin(self)
        batches = self.micro_batches(self.step)
        # mininterval keeps notebook output (one line per refresh outside a terminal) short.
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                   disable=not cfg.progress or (self.parallel and not distributed.is_main()),
                   mininterval=5.0)
        first_step, step_seconds = self.step, 0.0
        recorder = self.model.recorder if isinstance(self.model, AdapterModel) else None
        if recorder is not None:
            recorder.reset()
        while self.step < self.total_steps:
            started = time.perf_counter()
            total, logged = self.train_step(batches)
            step_seconds += time.perf_counter() - started
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                row = {"step": self.step, "loss": total, "lr": self.scheduler.get_last_lr()[0], **logged}
                if recorder is not None:  # routing since the last logged step
                    row.update(recorder.summary())
                    recorder.reset()
                self.result.history.append(row)
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        done = self.step - first_step
        self.result.steps = self.step
        if done:
            self.result.seconds_per_step = step_seconds / done
        if self.eval_tasks:
            self.evaluate()
        for callback in self.callbacks:
            callback.on_train_end(self)
        if cfg.checkpoint_dir:
            self.save_checkpoint()
        return self.result
