"""Data-parallel training and the grid's fan-out under real launchers (torchrun and accelerate launch),
with 2 CPU processes on gloo: N processes take exactly the steps one process takes on the same global batch.

The worker (tests/distributed_worker.py) trains LoRA and MixLoRA in float64 with dropout off, so the only
difference between the runs is the order of floating-point sums; MixLoRA's load balance is a statistic of the
whole micro-batch, which the processes share (without it the adapters differ by ~2e-2).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def torchrun(*args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]


def accelerate(*args: str) -> list[str]:
    # --multi_gpu is accelerate's multi-process mode; without GPUs its processes run on CPUs (gloo).
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    _run([str(WORKER), "train", str(out)], out)
    return torch.load(out / "adapters.pt")


@pytest.mark.parametrize("launcher", [torchrun, accelerate], ids=["torchrun", "accelerate"])
def test_two_processes_take_the_single_process_steps(launcher, single, tmp_path):
    _run(launcher(str(WORKER), "train", str(tmp_path)), tmp_path)
    parallel = torch.load(tmp_path / "adapters.pt")
    for method in ("lora", "mixlora"):
        ours, ref = parallel[method], single[method]
        assert ours["state"].keys() == ref["state"].keys()
        for name, tensor in ref["state"].items():
            torch.testing.assert_close(ours["state"][name], tensor, atol=1e-5, rtol=0, msg=f"{method} {name}")
        # Logged loss and load balance are the whole micro-batch's, as one process logs them.
        assert ours["losses"] == pytest.approx(ref["losses"], abs=1e-9)
        if method == "mixlora":
            assert ours["aux"] == pytest.approx(ref["aux"], abs=1e-9)
        # Only rank 0 wrote: each rank was given its own checkpoint folder.
        assert (tmp_path / f"ckpt-{method}-rank0" / "checkpoint.pt").exists()
        assert not (tmp_path / f"ckpt-{method}-rank1").exists()


def test_the_training_really_moved_the_adapters(single):
    # The comparison above means something only if three steps changed the adapters well beyond 1e-5.
    lora_B = [t for n, t in single["lora"]["state"].items() if n.endswith("lora_B")]
    assert min(t.abs().max().item() for t in lora_B) > 1e-3


def test_grid_fans_cells_out_over_the_processes(tmp_path):
    _run(torchrun(str(WORKER), "grid", str(tmp_path)), tmp_path)
    trained = [(tmp_path / f"trained-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert sorted(map(len, trained)) == [1, 2] and not set(trained[0]) & set(trained[1])
    records = sorted((tmp_path / "records").glob("*.json"))
    assert len(records) == 3  # each cell once
    processes = {json.loads(p.read_text())["process"] for p in records}
    assert processes == {"0/2", "1/2"}
    # A second launch finds every record and trains nothing.
    _run(torchrun(str(WORKER), "grid", str(tmp_path)), tmp_path)
    assert all(not (tmp_path / f"trained-rank{r}.txt").read_text() for r in (0, 1))
