"""One experiment run, as every chapter uses it: load, adapt, train, evaluate, report.

A run is described by a :class:`RunSpec` (model, task, sizes, seed, how to fine-tune, training
settings) and returns a flat result dict that chapters turn into tables and figures. ``finetune`` is
``"head"`` (only the task head trains), ``"full"`` (everything trains) or any
:class:`~lorafam_nb.core.AdapterConfig`; an adapter config without ``modules_to_save`` gets the
model's fresh head added, since an untrained head would make any comparison meaningless.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .core import AdapterConfig, count_parameters, get_adapter_model, suffix_match
from .data import load_task, task_info
from .models import load_model, load_tokenizer, model_spec
from .tasks import EncodedTask, encode
from .trainer import TrainConfig, Trainer, TrainResult, set_seed

__all__ = ["RunOutput", "RunSpec", "build_model", "describe", "encode_task", "run", "train_head_only", "training_set"]


@dataclass
class RunSpec:
    model: str = "minilm"
    task: str = "sst2"
    finetune: str | AdapterConfig = "head"
    train_n: int | None = 2000
    eval_n: int | None = 500
    max_length: int = 128
    protocol: str | None = None  # None: "encoder" for encoders, "label_token" for decoders
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    label: str = ""  # how tables and legends name this run
    # Multi-task: train on the union of these tasks (train_n of each) and evaluate on each. ``task``
    # must be one of them; it picks the head and protocol, so all must be of one kind.
    mix: tuple[str, ...] = ()
    # Tasks to evaluate on (default: what it trains on). A lifelong stage trains on one chunk and is
    # evaluated on every chunk of the stream.
    eval_on: tuple[str, ...] = ()
    # The task list that task ids index (default: ``mix``): a run on one task of a multi-task setting, such as
    # few-shot adaptation to its held-out task, keeps that task's id in the setting.
    task_ids: tuple[str, ...] = ()

    def task_names(self) -> tuple[str, ...]:
        return self.mix or (self.task,)

    def resolved_protocol(self) -> str:
        spec = model_spec(self.model)
        decoder = spec is not None and spec.architecture == "decoder"
        return self.protocol or ("label_token" if decoder else "encoder")


def _head_for(spec: RunSpec) -> tuple[str, int]:
    info = task_info(spec.task)
    if spec.resolved_protocol() != "encoder":
        return "causal_lm", 0
    if info.kind == "multiple_choice":
        return "multiple_choice", 0
    return "sequence_classification", 1 if info.kind == "regression" else info.num_labels


def train_head_only(model: nn.Module, heads: list[str]) -> nn.Module:
    """Freeze ``model`` except the modules named by the suffixes ``heads`` (the task head)."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if suffix_match(name, heads):
            module.requires_grad_(True)
    return model


def build_model(spec: RunSpec) -> nn.Module:
    """The model of ``spec`` with its fine-tuning mode applied (head seeded by ``spec.seed``)."""
    head, num_labels = _head_for(spec)
    set_seed(spec.seed)
    model = load_model(spec.model, head=head, num_labels=num_labels or 2)
    known = model_spec(spec.model)
    heads = list(known.head_modules) if known else []
    if spec.finetune == "full":
        return model
    if spec.finetune == "head":
        if not heads:
            raise ValueError(f"{spec.model} has no separate task head to train alone")
        return train_head_only(model, heads)
    if not isinstance(spec.finetune, AdapterConfig):
        raise ValueError(f"finetune must be 'head', 'full' or an AdapterConfig, got {spec.finetune!r}")
    config = spec.finetune.resolve(spec)
    if not config.modules_to_save and heads:
        config = dataclasses.replace(config, modules_to_save=heads)
    adapted = get_adapter_model(model, config)
    config.prepare(adapted, spec)  # a method's first stage (separately trained experts), if it has one
    return adapted


def encode_task(spec: RunSpec, split: str, n: int | None) -> EncodedTask:
    """``n`` examples of ``spec.task``; in a multi-task mix each carries ``task_id``, its task's index in
    ``spec.task_ids or spec.mix`` (the side input that task-routed adapters read)."""
    tokenizer = load_tokenizer(spec.model)
    rows = load_task(spec.task, split, n=n, seed=spec.seed)
    task = encode(rows, spec.task, tokenizer, spec.resolved_protocol(), spec.max_length)
    ids = spec.task_ids or spec.mix
    if ids:
        if spec.task not in ids:
            raise ValueError(f"task {spec.task!r} has no task id: it is not one of {ids}")
        for example in task.examples:
            example["task_id"] = ids.index(spec.task)
    return task


def training_set(spec: RunSpec) -> EncodedTask:
    """``train_n`` training examples of each of ``spec.task_names()``, pooled (the trainer shuffles)."""
    parts = [encode_task(dataclasses.replace(spec, task=t), "train", spec.train_n) for t in spec.task_names()]
    return dataclasses.replace(parts[0], examples=[e for part in parts for e in part.examples])


def describe(finetune: str | AdapterConfig) -> str:
    if isinstance(finetune, str):
        return {"head": "head only", "full": "full fine-tuning"}[finetune]
    fields = {f.name: getattr(finetune, f.name) for f in dataclasses.fields(finetune)
              if f.name not in ("target_modules", "modules_to_save")}
    return f"{finetune.method} " + " ".join(f"{k}={v}" for k, v in fields.items())


@dataclass
class RunOutput:
    row: dict[str, Any]  # flat, for tables: label, metric, parameter counts, sizes, timing, machine
    history: list[dict[str, Any]]  # logged training steps
    model: nn.Module  # the trained model, for checks such as merging
    trainer: Trainer  # its callbacks hold method state (AdaLoRA's rank allocator, LoRA-drop's scores)


def run(spec: RunSpec, model: nn.Module | None = None) -> RunOutput:
    """Train and evaluate ``spec``; the row names the protocol, sizes, seed and machine.

    ``row[metric]`` is the metric on ``spec.task``, or its mean over ``spec.mix``; ``row["per_task"]``
    holds each task's.
    """
    if spec.mix and spec.task not in spec.mix:
        raise ValueError(f"task {spec.task!r} must be one of mix {spec.mix}")
    info = task_info(spec.task)
    train = training_set(spec)
    evaluations = [encode_task(dataclasses.replace(spec, task=t), task_info(t).eval_split, spec.eval_n)
                   for t in spec.eval_on or spec.task_names()]
    model = model if model is not None else build_model(spec)
    trainable, total = count_parameters(model)
    train_cfg = dataclasses.replace(spec.train, seed=spec.seed)
    started = time.perf_counter()
    trainer = Trainer(model, train, train_cfg, eval_tasks=evaluations)
    result: TrainResult = trainer.train()
    metric = "pearson" if info.kind == "regression" else "accuracy"
    per_task = {e.info.name: result.final[e.info.name] for e in evaluations}
    row = {
        "label": spec.label or describe(spec.finetune), "model": spec.model, "task": "+".join(spec.mix) or spec.task,
        "protocol": spec.resolved_protocol(), "metric": metric, metric: sum(per_task.values()) / len(per_task),
        "per_task": per_task, "per_task_n": {e.info.name: len(e) for e in evaluations},
        "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total,
        "train_n": len(train), "eval_n": sum(len(e) for e in evaluations),
        "eval_split": ",".join(dict.fromkeys(task_info(t).eval_split for t in per_task)), "seed": spec.seed,
        "steps": result.steps, "s_per_step": result.seconds_per_step,
        "wall_s": time.perf_counter() - started,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    return RunOutput(row, result.history, model, trainer)

