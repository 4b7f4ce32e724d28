"""One experiment run, as every chapter uses it: load, adapt, train, evaluate, report.

A run is described by a :class:`RunSpec` (model, task, sizes, seed, how to fine-tune, training
settings) and returns a flat result dict that chapters turn into tables and figures. ``finetune`` is
``"none"`` (no training: the pretrained model is evaluated as it is, the baseline every table needs; an
encoder's task head is then its seeded initialisation, so it scores chance), ``"head"`` (only the task head
trains), ``"full"`` (everything trains) or any
:class:`~lorafam_nb.core.AdapterConfig`; an adapter config without ``modules_to_save`` gets the
model's fresh head added, since an untrained head would make any comparison meaningless.

**Reuse.** ``run(spec, store=Store(), profile=...)`` reads a run whose inputs are already recorded from
the results store (:mod:`lorafam_nb.results`) instead of training it, and records every run it trains.
A reused :class:`RunOutput` has the row, the training log, the evaluations and what the callbacks
recorded, but no model and no trainer (``reused`` is True; asking for them raises
:class:`ReusedRunError`). So a chapter computes what it needs from the model *during* the run, in a
callback passed to ``run(spec, callbacks=[...])``. A callback may implement:

* ``record(self)``: JSON-able results, stored in the record (``out.records[name]``, ``name`` being
  ``record_name`` or the class name); the adapter config's own callbacks (AdaLoRA's rank allocator) too;
* ``restore(self, data)``: called with what ``record`` returned *after its JSON round trip*, in a fresh run
  as in a reused one, so the chapter reads the callback the same way in both cases;
* ``settings(self) -> dict``: what the callback was given, for the key (default: its attributes before the
  run that are not code, which must then be JSON-able). Its class's code, and the functions it holds, are
  part of the key too (:func:`lorafam_nb.results.code_identity`), with the globals that code reads: a
  callback keeps its log on itself (and gives it through ``record``), never in a global it reads.

:class:`AtEnd` covers the common case: ``run(spec, callbacks=[AtEnd("merged", check)])`` records
``check(trainer)``, computed on the trained model, as ``out.records["merged"]``.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed
from .core import AdapterConfig, AdapterModel, count_parameters, get_adapter_model, suffix_match
from .data import load_task, task_code, task_info
from .models import architecture_of, load_model, load_tokenizer, model_code, model_spec
from .results import Store, code_fingerprint, code_identity, is_code, json_value, key_of, provenance, remember_loaded
from .tasks import EncodedTask, encode, evaluate, get_protocol
from .trainer import PRECISIONS, Callback, TrainConfig, Trainer, TrainResult, resolve_device, set_seed

__all__ = ["AtEnd", "ModelFacts", "ReusedRunError", "adapter_parameters", "RunOutput", "RunSpec", "build_model", "describe", "encode_task", "run", "run_inputs",
           "run_record", "spec_from_inputs", "train_head_only", "training_set"]

# TrainConfig fields that do not change a number (display, checkpoint files) or that are hardware (the
# device, the data-parallel split over processes): left out of the key, kept in the record's provenance.
NOT_KEYED = ("progress", "checkpoint_dir", "checkpoint_every", "device", "data_parallel")


@dataclass
class RunSpec:
    model: str = "minilm"
    task: str = "sst2"
    finetune: str | AdapterConfig = "head"
    train_n: int | None = 2000
    eval_n: int | None = 500
    max_length: int = 128
    image_size: int | None = None  # the side images are resized to (None: the model's default)
    # None: the task's own (vision tasks), else "encoder" for encoders and "label_token" for decoders.
    protocol: str | None = None
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
        chosen = self.protocol or task_info(self.task).protocol
        if chosen:
            return chosen
        return "label_token" if architecture_of(self.model) == "decoder" else "encoder"


def _head_for(spec: RunSpec) -> tuple[str, int]:
    return get_protocol(spec.resolved_protocol()).head(task_info(spec.task))


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
    if spec.finetune == "none":
        return model.requires_grad_(False)
    if spec.finetune == "head":
        if not heads:
            raise ValueError(f"{spec.model} has no separate task head to train alone")
        return train_head_only(model, heads)
    if not isinstance(spec.finetune, AdapterConfig):
        raise ValueError(f"finetune must be 'none', 'head', 'full' or an AdapterConfig, got {spec.finetune!r}")
    config = spec.finetune.resolve(spec)
    if not config.modules_to_save and heads:
        config = dataclasses.replace(config, modules_to_save=heads)
    adapted = get_adapter_model(model, config)
    config.prepare(adapted, spec)  # a method's first stage (separately trained experts), if it has one
    return adapted


def encode_task(spec: RunSpec, split: str, n: int | None) -> EncodedTask:
    """``n`` examples of ``spec.task``; in a multi-task mix each carries ``task_id``, its task's index in
    ``spec.task_ids or spec.mix`` (the side input that task-routed adapters read)."""
    protocol = spec.resolved_protocol()
    tokenizer = load_tokenizer(spec.model) if get_protocol(protocol).tokenized else None
    rows = load_task(spec.task, split, n=n, seed=spec.seed)
    task = encode(rows, spec.task, tokenizer, protocol, spec.max_length, spec.model, spec.image_size)
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
        return {"none": "no fine-tuning", "head": "head only", "full": "full fine-tuning"}[finetune]
    fields = {f.name: getattr(finetune, f.name) for f in dataclasses.fields(finetune)
              if f.name not in ("target_modules", "modules_to_save")}
    return f"{finetune.method} " + " ".join(f"{k}={v}" for k, v in fields.items())


class AtEnd(Callback):
    """Records ``fn(trainer)`` when training ends, as ``name``: what a chapter needs from the trained model
    (a merge check, a similarity, a routing matrix), kept in the record so that a reused run gives it too.
    ``fn`` returns JSON-able data; its code, and what that code refers to, is part of the run's key."""

    def __init__(self, name: str, fn: Callable[[Trainer], Any]) -> None:
        self.record_name, self.fn, self.value = name, fn, None

    def on_train_end(self, trainer: Trainer) -> None:
        self.value = self.fn(trainer)

    def record(self) -> Any:
        return self.value

    def restore(self, data: Any) -> None:
        self.value = data


def adapter_parameters(model: AdapterModel) -> tuple[int, int]:
    """(adapter, head) trainable parameter counts: the head (``modules_to_save``) is counted apart."""
    heads = model.adapter_config.modules_to_save
    seen: dict[int, int] = {}
    for name, module in model.model.named_modules():
        if name and suffix_match(name, heads):
            seen.update({id(p): p.numel() for p in module.parameters() if p.requires_grad})
    head = sum(seen.values())
    return count_parameters(model)[0] - head, head


class ModelFacts(Callback):
    """What a record needs from an adapter model once the method's first stage has run (LoRA-drop's probe
    decides the layers): the trainable adapter and head counts, and the adapter config that trained. (Here,
    not in the grid, so that an edit to the grid's tables leaves its records' keys alone.)"""

    record_name = "model_facts"

    def on_train_begin(self, trainer: Trainer) -> None:
        self.adapter, self.head = adapter_parameters(trainer.model)
        self.adapter_trained = trainer.model.adapter_config.to_dict()

    def record(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "head": self.head, "adapter_trained": self.adapter_trained}


class ReusedRunError(LookupError):
    """A reused run (read from the results store) was asked for its model or trainer."""


@dataclass
class RunOutput:
    row: dict[str, Any]  # flat, for tables: label, metric, parameter counts, sizes, timing, machine
    history: list[dict[str, Any]]  # logged training steps
    evals: list[dict[str, Any]]  # every evaluation: {"step", task: metric, ...}
    records: dict[str, Any]  # what the callbacks recorded (``record()``), by name
    provenance: dict[str, Any]  # where, when, how long (see lorafam_nb.results.provenance)
    trained_model: nn.Module | None = None  # None when reused
    trained_by: Trainer | None = None  # None when reused
    key: str | None = None  # the record's key (None: run without a store)
    reused: bool = False

    def _live(self, what: str) -> Any:
        value = self.trained_model if what == "model" else self.trained_by
        if value is None:
            raise ReusedRunError(
                f"run {self.key} was read back from the results store, so it has no {what}: compute what you "
                f"need from it during the run, in a callback with record() (run(spec, callbacks=[...])), or "
                f"recompute the run (Store(fresh=True), or no store)")
        return value

    @property
    def model(self) -> nn.Module:
        """The trained model, for checks such as merging (a reused run has none: :class:`ReusedRunError`)."""
        return self._live("model")

    @property
    def trainer(self) -> Trainer:
        """The trainer; its callbacks hold method state (a reused run has none: :class:`ReusedRunError`)."""
        return self._live("trainer")


def _spec_inputs(spec: RunSpec) -> dict[str, Any]:
    """``spec`` as the key sees it: the seed the trainer uses, the adapter config by its ``to_dict``,
    without the label and the :data:`NOT_KEYED` training fields."""
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "label"}
    train = dataclasses.asdict(dataclasses.replace(spec.train, seed=spec.seed))
    values["train"] = {k: v for k, v in train.items() if k not in NOT_KEYED}
    if isinstance(spec.finetune, AdapterConfig):
        values["finetune"] = spec.finetune.to_dict()
    return values


def _record_name(callback: Callback) -> str:
    return getattr(callback, "record_name", type(callback).__name__)


def _settings(callback: Callback) -> Any:
    """What the callback was given, for the key: its ``settings()``, else its attributes that are not code."""
    settings = (callback.settings() if hasattr(callback, "settings") else
                {k: v for k, v in vars(callback).items() if not is_code(v)})
    try:
        return json_value(settings)
    except TypeError as error:
        raise TypeError(f"{type(callback).__name__}'s settings are not JSON-able ({error}); give it a settings() "
                        f"method returning what it was given, so that the results store can key the run") from None


def run_inputs(spec: RunSpec, profile: str | None, callbacks: Sequence[Callback] = (), context: Any = None,
               model_given: bool = False) -> dict[str, Any]:
    """Everything a run's numbers depend on, as JSON: its key is :func:`lorafam_nb.results.key_of` of this.

    ``context``: what else the caller's run depends on, required when the caller built the model itself
    (``model_given``: how it was built, such as the key of the stage-one run it continues)."""
    if model_given and context is None:
        raise ValueError("a run on a model the caller built can be stored only with a context describing how "
                         "the model was built (for example the key of the run it continues)")
    used = [type(c) for c in callbacks] + [v for c in callbacks for v in vars(c).values() if is_code(v)]
    if isinstance(spec.finetune, AdapterConfig):
        used.append(type(spec.finetune))
    # Code outside the text core that the run reads through a registry: its protocol, tasks and model.
    used.append(get_protocol(spec.resolved_protocol()).encode)
    used += [f for t in dict.fromkeys((*spec.task_names(), *spec.eval_on)) for f in task_code(t)]
    loaders, packages = model_code(spec.model)
    modules, foreign = code_identity(used + loaders)
    code = code_fingerprint({__name__, *modules}, foreign, packages)
    return {"spec": _spec_inputs(spec), "profile": profile, "context": json_value(context),
            "callbacks": [{"name": _record_name(c), "class": f"{type(c).__module__}.{type(c).__qualname__}",
                           "settings": _settings(c)} for c in callbacks],
            "code": code}


def spec_from_inputs(values: dict[str, Any]) -> RunSpec:
    """The :class:`RunSpec` a record's ``inputs["spec"]`` describes, to recompute it (no label, progress off,
    the other unkeyed training fields at their defaults)."""
    values = dict(values)
    if not isinstance(values["finetune"], str):
        values["finetune"] = AdapterConfig.from_dict(values["finetune"])
    values["train"] = TrainConfig(**values["train"], progress=False)
    for name in ("mix", "eval_on", "task_ids"):
        values[name] = tuple(values[name])
    return RunSpec(**values)


def run_record(out: RunOutput, inputs: dict[str, Any]) -> dict[str, Any]:
    """The store's record of a run: its key and inputs, its results and their provenance."""
    return {"key": key_of(inputs), "inputs": inputs, "row": out.row, "history": out.history, "evals": out.evals,
            "callbacks": out.records, "provenance": out.provenance}


def _restore(callbacks: Sequence[Callback], records: dict[str, Any]) -> None:
    for callback in callbacks:
        if hasattr(callback, "restore") and _record_name(callback) in records:
            callback.restore(records[_record_name(callback)])


def _reused(record: dict[str, Any], spec: RunSpec, callbacks: Sequence[Callback]) -> RunOutput:
    row = dict(record["row"], label=spec.label or describe(spec.finetune))  # the label is not keyed
    _restore(callbacks, record["callbacks"])
    return RunOutput(row, record["history"], record["evals"], record["callbacks"], record["provenance"],
                     key=record["key"], reused=True)


def run(spec: RunSpec, model: nn.Module | None = None, *, callbacks: Sequence[Callback] = (),
        store: Store | None = None, profile: str | None = None, context: Any = None) -> RunOutput:
    """Train and evaluate ``spec``; the row names the protocol, sizes, seed and machine.

    ``row[metric]`` is the metric on ``spec.task``, or its mean over ``spec.mix``; ``row["per_task"]``
    holds each task's. ``callbacks`` join the adapter config's own in the trainer. With a ``store``, a run
    whose inputs (:func:`run_inputs`: the spec, ``profile``, ``context``, the callbacks, the code) are
    recorded is read back without training, and a trained run is recorded (by the first process only,
    under a data-parallel launch).
    """
    if spec.mix and spec.task not in spec.mix:
        raise ValueError(f"task {spec.task!r} must be one of mix {spec.mix}")
    callbacks = list(callbacks)
    inputs = None
    if store is not None:
        if profile is None:
            raise ValueError("a stored run names its profile: run(spec, store=..., profile=...)")
        inputs = run_inputs(spec, profile, callbacks, context, model_given=model is not None)
        record = store.get(key_of(inputs))
        if record is not None:
            return _reused(record, spec, callbacks)
    started = time.perf_counter()
    evaluations = [encode_task(dataclasses.replace(spec, task=t), task_info(t).eval_split, spec.eval_n)
                   for t in spec.eval_on or spec.task_names()]
    model = model if model is not None else build_model(spec)
    if spec.finetune == "none":
        return _untrained(spec, model, evaluations, callbacks, inputs, store, profile, started)
    train = training_set(spec)
    train_cfg = dataclasses.replace(spec.train, seed=spec.seed)
    trained = time.perf_counter()
    trainer = Trainer(model, train, train_cfg, eval_tasks=evaluations, callbacks=callbacks)
    recording = [_record_name(c) for c in trainer.callbacks if hasattr(c, "record")]
    if len(set(recording)) < len(recording):  # the adapter's own callbacks record too
        raise ValueError(f"callbacks that record need distinct names (record_name), got {recording}")
    result: TrainResult = trainer.train()
    row = _row(spec, result, evaluations, model, len(train), time.perf_counter() - trained)
    records = {_record_name(c): json_value(c.record()) for c in trainer.callbacks if hasattr(c, "record")}
    _restore(callbacks, records)  # the caller's only: the adapter's own callbacks still serve the live model
    out = RunOutput(json_value(row), json_value(result.history), json_value(result.evals), records,
                    provenance(profile, time.perf_counter() - started, str(trainer.device),
                               distributed.world_size() if trainer.parallel else 1),
                    trained_model=model, trained_by=trainer)
    return _stored(out, inputs, store, not trainer.parallel or distributed.is_main())


def _row(spec: RunSpec, result: TrainResult, evaluations: list[EncodedTask], model: nn.Module, train_n: int,
         wall_s: float) -> dict[str, Any]:
    """The run's flat result row (see :func:`run`)."""
    metric = task_info(spec.task).metric
    per_task = {e.info.name: result.final[e.info.name] for e in evaluations}
    trainable, total = count_parameters(model)
    return {
        "label": spec.label or describe(spec.finetune), "model": spec.model, "task": "+".join(spec.mix) or spec.task,
        "protocol": spec.resolved_protocol(), "metric": metric, metric: sum(per_task.values()) / len(per_task),
        "per_task": per_task, "per_task_n": {e.info.name: len(e) for e in evaluations},
        "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total,
        "train_n": train_n, "eval_n": sum(len(e) for e in evaluations),
        "eval_split": ",".join(dict.fromkeys(task_info(t).eval_split for t in per_task)), "seed": spec.seed,
        "steps": result.steps, "s_per_step": result.seconds_per_step, "wall_s": wall_s,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


def _stored(out: RunOutput, inputs: dict[str, Any] | None, store: Store | None, writer: bool) -> RunOutput:
    """``out`` with its key, recorded in ``store`` (by the ``writer`` process) when the run has inputs."""
    if inputs is not None:
        out.key = key_of(inputs)
        if writer:
            store.put(run_record(out, inputs))
    return out


def _untrained(spec: RunSpec, model: nn.Module, evaluations: list[EncodedTask], callbacks: Sequence[Callback],
               inputs: dict[str, Any] | None, store: Store | None, profile: str | None, started: float) -> RunOutput:
    """``finetune="none"``: evaluate the model as it is, on the device and at the precision the spec names."""
    if callbacks:
        raise ValueError("a run with finetune='none' trains nothing, so it takes no callbacks")
    device = resolve_device(spec.train.device)
    model.to(device)
    dtype = PRECISIONS[spec.train.precision]
    row: dict[str, Any] = {"step": 0}
    begun = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for task in evaluations:
            metrics = evaluate(model, task, spec.train.eval_batch_size, device)
            row[task.info.name] = metrics[task.info.metric]
    result = TrainResult(evals=[row])
    out = RunOutput(json_value(_row(spec, result, evaluations, model, 0, time.perf_counter() - begun)), [],
                    json_value(result.evals), {}, provenance(profile, time.perf_counter() - started, str(device)),
                    trained_model=model)
    return _stored(out, inputs, store, distributed.is_main())


remember_loaded()  # the package's code as this process loaded it (the store's keys name it)
