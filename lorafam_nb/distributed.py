"""Several processes on existing launchers: ``torchrun`` and ``accelerate launch``.

Both launchers start N copies of the same script and describe the job in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); nothing here schedules
anything. The package uses such a launch in two ways:

* **Data parallel** (:class:`~lorafam_nb.trainer.Trainer`): every process holds the whole model and
  the whole (seed-ordered) data; each optimizer step's micro-batch is cut into N contiguous shards,
  each process computes the loss of its shard and the gradients are summed over processes
  (:func:`all_reduce_gradients`), so every process takes the same step as one process would on the
  whole micro-batch. Only rank 0 writes checkpoints.
* **Fan-out** (:func:`~lorafam_nb.grid.run_grid`): each process trains its own cells of the grid alone
  (:func:`my_share`), one process per GPU, and writes their records; every record is written once.

Batch statistics are per shard unless a loss asks for the whole micro-batch: inside a data-parallel
step (:func:`synced_step`) :func:`global_sum` adds a statistic over the processes, which the mixtures'
load balance uses, so that it too equals the single-process value.
"""
from __future__ import annotations

import os
from datetime import timedelta
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_gradients", "barrier", "global_sum", "init", "is_main", "launched", "local_rank",
           "my_share", "rank", "shard", "synced_step", "world_size"]

T = TypeVar("T")
_SYNCED = False  # inside a data-parallel training step (see synced_step)


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes shared files (checkpoints, logs)."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the launch's process group (gloo for CPUs, NCCL for GPUs), once; nothing without a launch."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A long timeout: in a fan-out, processes wait at the end for the slowest one's runs.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=48))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def my_share(items: Sequence[T]) -> list[T]:
    """The items this process takes when work is fanned out: every ``world_size()``-th, from ``rank()``."""
    return list(items[rank()::world_size()])


def shard(items: Sequence[T]) -> tuple[list[T], float]:
    """This process's contiguous part of one micro-batch and its weight ``N · n_rank / n`` (1 when the parts
    are equal): a loss that is a mean over the shard, times the weight, averages over processes to the mean
    over the whole micro-batch."""
    n, world = len(items), world_size()
    if n < world:
        raise ValueError(f"a micro-batch of {n} examples cannot be split over {world} processes; "
                         f"allowed: batch_size >= {world}")
    bounds = [n * i // world for i in range(world + 1)]
    part = list(items[bounds[rank()]:bounds[rank() + 1]])
    return part, world * len(part) / n


@contextmanager
def synced_step() -> Iterator[None]:
    """Mark a data-parallel training step: every process runs the same forward, so collectives are safe."""
    global _SYNCED
    _SYNCED, previous = True, _SYNCED
    try:
        yield
    finally:
        _SYNCED = previous


def global_sum(x: Tensor) -> Tensor:
    """``x`` summed over the processes inside a data-parallel step; ``x`` itself elsewhere.

    The others' parts are constants here, and this process's part carries the gradient times N, so that
    the averaging of :func:`all_reduce_gradients` leaves each part's gradient exactly once."""
    world = world_size()
    if not (_SYNCED and dist.is_initialized() and world > 1):
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total + world * (x - x.detach())


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the processes, in one flat buffer.

    A parameter whose gradient is None on every process stays None (AdamW then skips it, as a single
    process would); if any process has one, the others count zeros."""
    if world_size() == 1:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    if not live:
        return
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in live])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in live:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
