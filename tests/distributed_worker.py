"""One process of tests/test_distributed.py: run alone, or as one of N under torchrun / accelerate launch.

``train OUT``: trains LoRA and MixLoRA on MiniLM for a few data-parallel steps (dropout off and float64, so that N
processes and one process compute the same thing) and has rank 0 save the adapters; each rank is given its
own checkpoint folder, so the test can see which ranks wrote. ``grid OUT``: fans a three-cell grid out over
the processes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lorafam_nb import distributed
from lorafam_nb.experiment import RunSpec, build_model, training_set
from lorafam_nb.grid import ModelSettings, Profile, plan, run_grid
from lorafam_nb.lora import LoraConfig
from lorafam_nb.moe.mixlora import MixLoraConfig
from lorafam_nb.trainer import TrainConfig, Trainer

CONFIGS = {"lora": LoraConfig(r=4, target_modules=["query", "value"]),
           "mixlora": MixLoraConfig(r=4, num_experts=4, top_k=2, router_aux_loss_coef=0.5)}


def train(out: Path) -> None:
    adapters = {}
    for name, config in CONFIGS.items():
        spec = RunSpec(model="minilm", task="sst2", finetune=config, train_n=20, max_length=32, seed=3)
        model = build_model(spec).double()  # float64: summation-order noise stays far below the tolerance
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        # 20 examples in micro-batches of 8: the last one (4) splits evenly too; 3 steps of 2 micro-batches.
        cfg = TrainConfig(lr=5e-3, max_steps=3, batch_size=8, grad_accum=2, seed=3, progress=False, log_every=1,
                          checkpoint_dir=str(out / f"ckpt-{name}-rank{distributed.rank()}"))
        result = Trainer(model, training_set(spec), cfg).train()
        adapters[name] = {"state": model.adapter_state_dict(), "losses": [row["loss"] for row in result.history],
                          "aux": [row.get("load_balance") for row in result.history]}
    if distributed.is_main():
        torch.save(adapters, out / "adapters.pt")


def grid(out: Path) -> None:
    profile = Profile("fanout", {"minilm": ModelSettings(8, 8, 32, 8, 1e-3)}, methods=("lora",),
                      tasks=("arc_e", "boolq", "piqa"), multi_task=False)
    report = run_grid(plan(profile), out / "records", log=None)
    (out / f"trained-rank{distributed.rank()}.txt").write_text("\n".join(report.trained))
    assert len(report.results) == 3, report.results  # every process reads all records back


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"train": train, "grid": grid}[sys.argv[1]](Path(sys.argv[2]))
