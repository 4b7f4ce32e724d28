"""Training-step benchmark: ``python -m lorafam_nb.bench [--steps N] [--batch 16] [--seq 128]``.

Measures, in one process and on the same inputs, one optimizer step (forward, backward, AdamW) of:

* ``frozen``   — the base model frozen, gradients flowing only to the input embeddings: the floor any
  adapter that back-propagates through the network must pay;
* ``full``     — full fine-tuning;
* ``lorafam``  — this package's LoRA;
* ``peft``     — peft's LoRA (an independent implementation), same targets, rank and init.

Memory: on CUDA the allocator's peak. On CPU there is no per-run allocator peak inside one process,
so we count the *training state* exactly instead: bytes of tensors saved for backward (activations,
deduplicated by storage, model weights excluded) + gradients + optimizer state. That is what
differs between methods; the weights themselves are the same for all.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core import AdapterConfig, count_parameters, get_adapter_model
from .lora import LoraConfig
from .models import MODELS, load_model

__all__ = ["BenchResult", "run_benchmark", "main"]


@dataclass
class BenchResult:
    name: str
    seconds_per_step: float
    memory_mb: float
    trainable: int

    def row(self) -> dict[str, float | str | int]:
        return {"setup": self.name, "s/step": round(self.seconds_per_step, 4),
                "memory MB": round(self.memory_mb, 1), "trainable": self.trainable}


class _SavedTensorMeter:
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


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    opt = 0 if optimizer is None else sum(
        v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return grads + opt


def _measure(name: str, model: nn.Module, batch: dict[str, torch.Tensor], steps: int,
             device: torch.device) -> BenchResult:
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    batch = {k: v.to(device) for k, v in batch.items()}

    def step(meter: _SavedTensorMeter | None = None) -> None:
        if meter is None:
            loss = model(**batch).loss
        else:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=meter is None)

    times = []
    for i in range(steps + 2):  # two warm-up steps: allocator and optimizer state
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        memory = torch.cuda.max_memory_allocated()
    else:
        meter = _SavedTensorMeter(model)
        step(meter)  # keeps the gradients (zero_grad sets them to zero, not None) for the count
        memory = meter.nbytes + _state_bytes(model, optimizer)
    trainable, _ = count_parameters(model)
    return BenchResult(name, statistics.median(times), memory / 2**20, trainable)


HEAD = MODELS["minilm"].head_modules  # trained in every setup except "frozen"


def _peft_lora(targets: list[str], r: int, **options: Any) -> Callable[[nn.Module], nn.Module]:
    def build(m: nn.Module) -> nn.Module:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        return get_peft_model(m, PeftLoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                modules_to_save=list(HEAD), **options))
    return build


def _ours(config: AdapterConfig) -> Callable[[nn.Module], nn.Module]:
    return lambda m: get_adapter_model(m, dataclasses.replace(config, modules_to_save=list(HEAD)))


def setups(r: int = 8) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Name -> function turning a fresh MiniLM classifier into the model to time."""
    targets = list(MODELS["minilm"].all_linear)

    def frozen(m: nn.Module) -> nn.Module:
        m.requires_grad_(False)
        m.enable_input_require_grads()  # gradients reach the embeddings output, nothing else
        return m

    return {
        "frozen": frozen,
        "full": lambda m: m,
        "lorafam": _ours(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)),
        "peft": _peft_lora(targets, r),
    }


def run_benchmark(batch_size: int = 16, seq_len: int = 128, steps: int = 10, r: int = 8,
                  device: str = "cpu", only: list[str] | None = None) -> list[BenchResult]:
    torch.manual_seed(0)
    base = load_model("minilm", head="sequence_classification", num_labels=2)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, seq_len)),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,))}
    dev = torch.device(device)
    results = []
    for name, build in setups(r).items():
        if only and name not in only:
            continue
        results.append(_measure(name, build(copy.deepcopy(base)), batch, steps, dev))
    return results


def ratios(results: list[BenchResult]) -> dict[str, float]:
    t = {r.name: r.seconds_per_step for r in results}
    out = {}
    if "lorafam" in t and "frozen" in t:
        out["lorafam / frozen"] = t["lorafam"] / t["frozen"]
    if "lorafam" in t and "peft" in t:
        out["lorafam / peft"] = t["lorafam"] / t["peft"]
    if "peft" in t and "full" in t:
        out["peft / full"] = t["peft"] / t["full"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = run_benchmark(args.batch, args.seq, args.steps, args.rank, args.device)
    print(f"MiniLM, batch {args.batch} x {args.seq} tokens, r={args.rank} on all linear layers, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    for r in results:
        print(f"  {r.name:8s} {r.seconds_per_step:8.4f} s/step  {r.memory_mb:8.1f} MB  {r.trainable:>11,} trainable")
    for k, v in ratios(results).items():
        print(f"  {k:18s} {v:.3f}")


if __name__ == "__main__":
    main()
