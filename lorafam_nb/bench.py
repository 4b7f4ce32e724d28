"""Training-step benchmark: ``python -m lorafam_nb.bench [--steps N] [--batch 16] [--seq 128] [--only ...]``.

Measures, in one process and on the same inputs, real optimizer steps of the package's
:class:`~lorafam_nb.trainer.Trainer` (forward, backward, the method's hooks, AdamW), taken round-robin
(one step of each setup per round, the order rotated), so that every ratio is a median of ratios taken
within a round, where a change of the machine's speed hits both setups alike. For:

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

__all__ = ["Interleaved", "SavedTensorMeter", "frozen", "interleaved", "main", "method_config", "ratios",
           "run_benchmark", "saved_by_module", "setups"]


class SavedTensorMeter:
    """Sums the storage bytes autograd saves for backward (each storage once, parameters excluded).

    ``by_module`` splits the sum by the module whose forward pass saved each storage first (the innermost
    module running at the time), so that a difference between two methods can be traced to its layers."""

    def __init__(self, model: nn.Module) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, tuple[str, int]] = {}
        self._current = [""]  # the stack of modules whose forward is running
        self._handles = [m.register_forward_pre_hook(lambda m, a, n=n: self._current.append(n))
                         for n, m in model.named_modules()]
        self._handles += [m.register_forward_hook(self._leave) for m in model.modules()]

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self._current.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.param_ptrs and ptr not in self.seen:
            self.seen[ptr] = (self._current[-1], storage.nbytes())
        return t

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.seen.values())

    def by_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, n in self.seen.values():
            out[name] = out.get(name, 0) + n
        return out


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
    """Step times of several setups measured round-robin in one process (see :func:`interleaved`), and each
    setup's training state from one more, untimed step."""

    times: dict[str, list[float]]  # setup -> seconds of each timed step, in round order
    memory: dict[str, int] = field(default_factory=dict)  # bytes: training state (CPU) or CUDA peak
    saved: dict[str, dict[str, int]] = field(default_factory=dict)  # CPU: saved bytes by module (SavedTensorMeter)
    trainable: dict[str, int] = field(default_factory=dict)
    ops: dict[str, dict[str, float]] = field(default_factory=dict)  # profiled setups: seconds per operator

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def iqr(self, name: str) -> tuple[float, float]:
        """The first and third quartile of the step time."""
        return _quartiles(self.times[name])

    def paired(self, a: str, b: str) -> list[float]:
        """``a``'s step time over ``b``'s, round by round: slow drifts of the machine (frequency, other load)
        hit both setups of a round alike and cancel."""
        return [x / y for x, y in zip(self.times[a], self.times[b])]

    def ratio(self, a: str, b: str) -> float:
        """The median over rounds of :meth:`paired`."""
        return statistics.median(self.paired(a, b))

    def ratio_iqr(self, a: str, b: str) -> tuple[float, float]:
        return _quartiles(self.paired(a, b))

    def rows(self, reference: str | None = None) -> list[dict[str, Any]]:
        out = []
        for name in self.times:
            q1, q3 = self.iqr(name)
            row: dict[str, Any] = {"setup": name, "median s/step": self.median(name), "IQR": f"{q1:.3f}–{q3:.3f}"}
            if reference is not None:
                r1, r3 = self.ratio_iqr(name, reference)
                row[f"× {reference}"] = self.ratio(name, reference)
                row[f"× {reference} IQR"] = f"{r1:.2f}–{r3:.2f}"
            if name in self.memory:
                row["memory MB"] = self.memory[name] / 2**20
            if name in self.trainable:
                row["trainable"] = self.trainable[name]
            out.append(row)
        return out


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


class _StateBytes(Callback):
    """Counts gradients and optimizer state right after backward, when both exist."""

    def __init__(self) -> None:
        self.nbytes = 0

    def on_after_backward(self, trainer: Trainer) -> None:
        grads = sum(p.grad.nbytes for p in trainer.model.parameters() if p.grad is not None)
        state = sum(v.nbytes for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        self.nbytes = grads + state


def _metered_step(trainer: Trainer, batches: Any, device: torch.device) -> tuple[int, dict[str, int]]:
    """One optimizer step whose memory is measured: on CUDA the allocator's peak; on CPU, exactly, the bytes
    saved for backward (activations, each storage once, weights excluded) plus gradients and optimizer state."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(batches)
        return torch.cuda.max_memory_allocated(), {}
    meter, state = SavedTensorMeter(trainer.model), _StateBytes()
    trainer.callbacks.append(state)
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            trainer.train_step(batches)
    finally:
        trainer.callbacks.remove(state)
        meter.close()
    return meter.nbytes + state.nbytes, meter.by_module()


def _profiled_step(trainer: Trainer, batches: Any) -> dict[str, float]:
    """Seconds each operator took (its own time, not its callees') in one optimizer step."""
    with torch.profiler.profile() as prof:
        trainer.train_step(batches)
    return {e.key: e.self_device_time_total / 1e6 if trainer.device.type == "cuda" else e.self_cpu_time_total / 1e6
            for e in prof.key_averages()}


def interleaved(models: dict[str, nn.Module], batch: dict[str, torch.Tensor] | None, steps: int,
                device: torch.device, protocol: str = "encoder", warmup: int = 2,
                precision: str = "fp32", profile: Sequence[str] = (), task: EncodedTask | None = None) -> Interleaved:
    """Real optimizer steps of every setup (the package's Trainer, each method's hooks included), taken
    round-robin: round i runs one step of each setup, the order rotated by one each round, so that no
    setup always runs first or right after a given other one. ``warmup`` rounds are not timed; one more
    round measures memory (:func:`_metered_step`), untimed, and the setups named in ``profile`` run one
    step more under the profiler (where their time goes, by operator). Every step trains on the text
    ``batch`` (under ``protocol``), or on all the examples of ``task`` (an image or vision-language task,
    as :func:`lorafam_nb.experiment.encode_task` gives it) as one batch."""
    task = task if task is not None else _task_of(batch, protocol)
    config = TrainConfig(lr=1e-4, max_steps=steps + warmup + 2, batch_size=len(task), warmup_ratio=0.0,
                         schedule="constant", max_grad_norm=None, device=str(device), precision=precision,
                         progress=False)
    trainers = {name: Trainer(model, task, config) for name, model in models.items()}
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
    result = Interleaved(times, trainable={name: count_parameters(m)[0] for name, m in models.items()})
    for name in names:
        result.memory[name], result.saved[name] = _metered_step(trainers[name], batches[name], device)
    for name in profile:
        result.ops[name] = _profiled_step(trainers[name], batches[name])
    return result


def saved_by_module(result: Interleaved, name: str, depth: int = 1) -> dict[str, int]:
    """Bytes ``name`` saved for backward, by module path with layer numbers dropped and ``depth`` trailing
    parts kept (``attention.self.query`` → ``query`` at depth 1): where a method's activation memory goes."""
    out: dict[str, int] = {}
    for module, n in result.saved[name].items():
        parts = [p for p in module.split(".") if not p.isdigit() and p not in ("base_layer", "model")]
        key = ".".join(parts[-depth:]) if parts else "(model)"
        out[key] = out.get(key, 0) + n
    return out


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
    configs = {name: method_config(cls, r, steps, shape) for name, cls in import_methods().items()
               if cls.modality == "text"}  # the vision and multimodal methods are timed on their own models
    ours = {name: (lambda m, c=c: get_adapter_model(m, c)) for name, c in configs.items()}
    references = {f"peft:{name}": _peft(c) for name, c in configs.items() if vars(type(c)).get("peft_reference")}
    return {"frozen": frozen, "full": lambda m: m, **ours, **references}


def run_benchmark(batch_size: int = 16, seq_len: int = 128, steps: int = 10, r: int = 8,
                  device: str = "cpu", only: list[str] | None = None, precision: str = "fp32",
                  extra: dict[str, Callable[[nn.Module], nn.Module]] | None = None,
                  profile: Sequence[str] = ()) -> Interleaved:
    """Every setup (or ``only`` these), plus the caller's ``extra`` ones (name -> builder from a fresh MiniLM
    classifier), on one MiniLM batch, interleaved: ``steps`` timed rounds; ``profile``: see :func:`interleaved`."""
    all_setups = setups(r, steps)
    unknown = set(only or ()) - set(all_setups)
    if unknown:
        raise ValueError(f"unknown setups {sorted(unknown)}; choose from {list(all_setups)}")
    torch.manual_seed(0)
    base = load_model("minilm", head="sequence_classification", num_labels=2)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, seq_len)),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,))}
    chosen = {name: build for name, build in all_setups.items() if not only or name in only} | (extra or {})
    models = {name: build(copy.deepcopy(base)) for name, build in chosen.items()}
    return interleaved(models, batch, steps, torch.device(device), precision=precision, profile=profile)


def ratios(result: Interleaved) -> dict[str, float]:
    """Paired step-time ratios from one interleaved run: LoRA against the frozen floor, and each of our methods
    against peft's implementation of it (every setup against LoRA is a column of :meth:`Interleaved.rows`)."""
    t = result.times
    lora = LoraConfig.method  # the book's reference method, whose count defines the budgets
    pairs = [(lora, "frozen")] + [(name, f"peft:{name}") for name in t]
    return {f"{a} / {b}": result.ratio(a, b) for a, b in pairs if a in t and b in t}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--only", nargs="*", help="setup names (default: all)")
    args = parser.parse_args(argv)
    result = run_benchmark(args.batch, args.seq, args.steps, args.rank, args.device, args.only, args.precision)
    print(f"MiniLM, batch {args.batch} x {args.seq} tokens, r={args.rank} on all linear layers, {args.device}, "
          f"{args.precision}, {torch.get_num_threads()} threads; {args.steps} interleaved rounds (median, IQR)")
    lora = LoraConfig.method
    for name in result.times:
        q1, q3 = result.iqr(name)
        paired = f"{result.ratio(name, lora):6.3f} × {lora}" if lora in result.times else ""
        print(f"  {name:13s} {result.median(name):8.4f} s/step  IQR {q1:.4f}–{q3:.4f}  {paired}  "
              f"{result.memory[name] / 2**20:8.1f} MB  {result.trainable[name]:>11,} trainable")
    for k, v in ratios(result).items():
        a, b = k.split(" / ")
        q1, q3 = result.ratio_iqr(a, b)
        print(f"  {k:24s} {v:.3f}  (IQR {q1:.3f}–{q3:.3f})")


if __name__ == "__main__":
    main()
