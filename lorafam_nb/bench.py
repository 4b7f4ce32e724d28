"""Training-step benchmark: ``python -m lorafam_nb.bench [--steps N] [--batch 16] [--seq 128] [--only ...]``.

Measures, in one process and on the same inputs, real optimizer steps of the package's
:class:`~lorafam_nb.trainer.Trainer` (forward, backward, the method's hooks, AdamW) for:

* ``frozen``  — only the task head trains, but gradients are forced back through the whole frozen
  network to the input embeddings: the floor any adapter that back-propagates through it must pay;
* ``full``    — full fine-tuning;
* every registered method of this package on all linear layers, at LoRA rank ``r``'s parameter budget
  (sized by the experiments grid's rule), each with its own training hooks;
* ``peft:<method>`` — peft's implementation of the methods whose layer peft has, built from the
  method's peft export (same targets, size, init and head): an independent reference for our speed.

Every setup trains MiniLM's task head (pooler + classifier) as well.

Memory: on CUDA the allocator's peak during one step. On CPU there is no per-run allocator peak inside
one process, so we count the *training state* of one step exactly instead: bytes of tensors saved for
backward (activations, deduplicated by storage, model weights excluded) + gradients + optimizer state.
That is what differs between methods; the weights themselves are the same for all.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core import AdapterConfig, count_parameters, get_adapter_model, import_methods
from .data import task_info
from .experiment import train_head_only
from .grid import ModelShape, match_budget, method_sites, model_shape, reference_count
from .lora import LoraConfig
from .models import MODELS, load_model
from .tasks import EncodedTask
from .trainer import Callback, TrainConfig, Trainer

__all__ = ["BenchResult", "Interleaved", "SavedTensorMeter", "frozen", "interleaved", "main", "measure",
           "method_config", "ratios", "run_benchmark", "setups"]


@dataclass
class BenchResult:
    name: str
    seconds_per_step: float
    memory_mb: float
    trainable: int

    def row(self) -> dict[str, float | str | int]:
        return {"setup": self.name, "s/step": round(self.seconds_per_step, 4),
                "memory MB": round(self.memory_mb, 1), "trainable": self.trainable}


class SavedTensorMeter:
    """Sums the storage bytes autograd saves for backward (each storage once, parameters excluded)."""

    def __init__(self, model: nn.Module) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.param_ptrs:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


class _Probe(Callback):
    """Times every optimizer step (method hooks included) and measures the memory of the last one.

    It runs after the method's own callbacks, so a step's time covers them. The last step runs under
    the saved-tensor meter (CPU) or a fresh CUDA peak; gradients and optimizer state are counted
    after its backward, when both exist.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.memory = 0
        self._hooks: Any = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, trainer: Trainer) -> None:
        self._last = self._now()
        self._maybe_start_metering(trainer)

    def _maybe_start_metering(self, trainer: Trainer) -> None:
        if trainer.step != trainer.total_steps - 1:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._meter = SavedTensorMeter(trainer.model)
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._meter.pack, lambda t: t)
            self._hooks.__enter__()

    def on_after_backward(self, trainer: Trainer) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            grads = sum(p.grad.nbytes for p in trainer.model.parameters() if p.grad is not None)
            state = sum(v.nbytes for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
            self.memory = self._meter.nbytes + grads + state

    def on_step_end(self, trainer: Trainer) -> None:
        now = self._now()
        self.times.append(now - self._last)
        self._last = now
        if self.device.type == "cuda" and trainer.step == trainer.total_steps:
            self.memory = torch.cuda.max_memory_allocated()
        self._maybe_start_metering(trainer)


def _task_of(batch: dict[str, torch.Tensor], protocol: str = "encoder") -> EncodedTask:
    """The fixed batch as a two-class task, so that the Trainer collates exactly it: an encoder classifier's
    input, or (``"label_token"``) a decoder prompt scored by the next-token logits of two label tokens."""
    examples = [{"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "label": int(label)}
                for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]
    if protocol == "label_token":
        examples = [{"input_ids": e["input_ids"], "label_ids": [1, 2], "label": e["label"]} for e in examples]
    return EncodedTask(task_info("sst2"), protocol, examples, pad_id=0)


@dataclass
class Interleaved:
    """Step times of several setups measured round-robin in one process (see :func:`interleaved`)."""

    times: dict[str, list[float]]  # setup -> seconds of each timed step, in round order

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def iqr(self, name: str) -> tuple[float, float]:
        """The first and third quartile of the step time."""
        q = statistics.quantiles(self.times[name], n=4)
        return q[0], q[2]

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``a``'s step time over ``b``'s in the same round: slow drifts of the machine
        (frequency, other load) hit both setups of a round alike and cancel."""
        return statistics.median(x / y for x, y in zip(self.times[a], self.times[b]))

    def rows(self, reference: str | None = None) -> list[dict[str, Any]]:
        out = []
        for name in self.times:
            q1, q3 = self.iqr(name)
            row = {"setup": name, "median s/step": self.median(name), "IQR": f"{q1:.3f}–{q3:.3f}"}
            if reference is not None:
                row[f"× {reference}"] = self.ratio(name, reference)
            out.append(row)
        return out


def interleaved(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], steps: int,
                device: torch.device, protocol: str = "encoder", warmup: int = 2) -> Interleaved:
    """Real optimizer steps of every setup (the package's Trainer, each method's hooks included), taken
    round-robin: round i runs one step of each setup, the order rotated by one each round, so that no
    setup always runs first or right after a given other one. ``warmup`` rounds are not timed."""
    config = TrainConfig(lr=1e-4, max_steps=steps + warmup, batch_size=len(batch["labels"]), warmup_ratio=0.0,
                         schedule="constant", max_grad_norm=None, device=str(device), progress=False)
    trainers = {name: Trainer(model, _task_of(batch, protocol), config) for name, model in models.items()}
    batches = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        for callback in trainer.callbacks:
            callback.on_train_begin(trainer)
        batches[name] = trainer.micro_batches(0)
    names, times = list(models), {name: [] for name in models}
    for i in range(steps + warmup):
        for name in names[i % len(names):] + names[: i % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            trainers[name].train_step(batches[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return Interleaved(times)


def measure(name: str, model: nn.Module, batch: dict[str, torch.Tensor], steps: int,
            device: torch.device, protocol: str = "encoder") -> BenchResult:
    """``steps`` timed optimizer steps after two warm-up steps (allocator, optimizer state)."""
    probe = _Probe(device)
    config = TrainConfig(lr=1e-4, max_steps=steps + 2, batch_size=len(batch["labels"]), warmup_ratio=0.0,
                         schedule="constant", max_grad_norm=None, device=str(device), progress=False)
    Trainer(model, _task_of(batch, protocol), config, callbacks=[probe]).train()
    trainable, _ = count_parameters(model)
    return BenchResult(name, statistics.median(probe.times[2:]), probe.memory / 2**20, trainable)


HEAD = list(MODELS["minilm"].head_modules)  # trained in every setup
TARGETS = list(MODELS["minilm"].all_linear)


def frozen(model: nn.Module) -> nn.Module:
    """Only the head trains; gradients still flow back through the frozen network to the embeddings."""
    train_head_only(model, HEAD)
    model.enable_input_require_grads()
    return model


def method_config(cls: type[AdapterConfig], r: int, steps: int = 10, shape: ModelShape | None = None) -> AdapterConfig:
    """``cls`` on all of MiniLM's linears at LoRA rank ``r``'s parameter budget, sized by the experiments
    grid's rule (:func:`~lorafam_nb.grid.match_budget`, then the config's own ``sized`` for a run of
    ``steps``), so that every setup trains about as many parameters as LoRA and runs its per-step hooks.
    ``shape``: MiniLM's :func:`~lorafam_nb.grid.model_shape`, when the caller has it already."""
    shape = shape or model_shape("minilm")
    budget = match_budget(cls, method_sites(cls, shape), reference_count(shape, r))
    return cls.sized(budget.values, TARGETS, steps, modules_to_save=HEAD)


def _peft(config: AdapterConfig) -> Callable[[nn.Module], nn.Module]:
    """peft's implementation of ``config`` (same targets, rank, init and head), from its peft export."""
    def build(m: nn.Module) -> nn.Module:
        import peft
        return peft.get_peft_model(m, peft.get_peft_config(config.to_peft(TARGETS)))
    return build


def setups(r: int = 8, steps: int = 10) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Name -> function turning a fresh MiniLM classifier into the model to time: the baselines, every
    registered method, and peft's version of the methods whose configs say peft implements them."""
    shape = model_shape("minilm")
    configs = {name: method_config(cls, r, steps, shape) for name, cls in import_methods().items()}
    ours = {name: (lambda m, c=c: get_adapter_model(m, c)) for name, c in configs.items()}
    references = {f"peft:{name}": _peft(c) for name, c in configs.items() if vars(type(c)).get("peft_reference")}
    return {"frozen": frozen, "full": lambda m: m, **ours, **references}


def run_benchmark(batch_size: int = 16, seq_len: int = 128, steps: int = 10, r: int = 8,
                  device: str = "cpu", only: list[str] | None = None) -> list[BenchResult]:
    all_setups = setups(r, steps)
    unknown = set(only or ()) - set(all_setups)
    if unknown:
        raise ValueError(f"unknown setups {sorted(unknown)}; choose from {list(all_setups)}")
    torch.manual_seed(0)
    base = load_model("minilm", head="sequence_classification", num_labels=2)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, seq_len)),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,))}
    return [measure(name, build(copy.deepcopy(base)), batch, steps, torch.device(device))
            for name, build in all_setups.items() if not only or name in only]


def ratios(results: list[BenchResult]) -> dict[str, float]:
    """LoRA against the frozen floor, and each of our methods against peft's implementation of it."""
    t = {r.name: r.seconds_per_step for r in results}
    out = {}
    lora = LoraConfig.method  # the book's reference method, whose count defines the budgets
    if lora in t and "frozen" in t:
        out[f"{lora} / frozen"] = t[lora] / t["frozen"]
    for name in t:
        if f"peft:{name}" in t:
            out[f"{name} / peft:{name}"] = t[name] / t[f"peft:{name}"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="setup names (default: all)")
    args = parser.parse_args(argv)
    results = run_benchmark(args.batch, args.seq, args.steps, args.rank, args.device, args.only)
    print(f"MiniLM, batch {args.batch} x {args.seq} tokens, r={args.rank} on all linear layers, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    for r in results:
        print(f"  {r.name:11s} {r.seconds_per_step:8.4f} s/step  {r.memory_mb:8.1f} MB  {r.trainable:>11,} trainable")
    for k, v in ratios(results).items():
        print(f"  {k:22s} {v:.3f}")


if __name__ == "__main__":
    main()
