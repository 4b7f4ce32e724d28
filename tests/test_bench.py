"""The benchmark: every registered method has a setup, and the numbers it reports are the right ones
(trainable counts, the memory each method's design implies, the measured step count)."""
from __future__ import annotations

import copy

import pytest
import torch

from lorafam_nb import LoraConfig, count_parameters, get_adapter_model
from lorafam_nb import grid
from lorafam_nb.bench import HEAD, TARGETS, interleaved, method_config, ratios, run_benchmark, saved_by_module, setups
from lorafam_nb.models import MODELS

from conftest import text_methods


def test_every_registered_method_and_the_peft_references_are_set_up():
    names = set(setups())
    assert set(text_methods()) | {"frozen", "full", "peft:lora", "peft:dora", "peft:vera"} == names
    with pytest.raises(ValueError, match="unknown setups \\['nope'\\]"):
        run_benchmark(only=["nope"])


def test_method_configs_are_sized_by_the_grids_rule():
    methods = text_methods()
    lora = method_config(methods["lora"], r=4)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (4, 8, list(MODELS["minilm"].all_linear))
    shape = grid.model_shape("minilm")
    target = grid.closed_form_count(LoraConfig(r=4), grid.method_sites(LoraConfig, shape))
    for name, cls in methods.items():  # the budget the grid would give, and the config's own run settings
        budget = grid.match_budget(cls, grid.method_sites(cls, shape), target)
        assert method_config(cls, r=4, steps=20) == cls.sized(budget.values, TARGETS, 20, modules_to_save=HEAD), name
    assert method_config(methods["delta_lora"], r=4, steps=10).start_step == 1  # its update is timed from step 2


def test_interleaved_run_counts_training_state(bert):
    batch = {"input_ids": torch.randint(1, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    model = get_adapter_model(bert, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    result = interleaved({"lora": model}, batch, steps=3, device=torch.device("cpu"), warmup=1)
    trainable = count_parameters(model)[0]
    assert result.trainable == {"lora": trainable} and len(result.times["lora"]) == 3
    # Training state is at least gradients + two AdamW moments of every trainable float32 parameter, and the
    # saved activations are split by module: the adapted query layers saved their inputs.
    assert result.memory["lora"] > 3 * 4 * trainable + sum(result.saved["lora"].values()) - 1
    assert saved_by_module(result, "lora")["query"] > 0


def test_memory_follows_each_design_on_minilm():
    result = run_benchmark(batch_size=2, seq_len=16, steps=1, only=["lora", "lora_fa", "delta_lora", "dora", "peft:dora"])
    memory = result.memory
    # LoRA-FA saves A·x (r wide) instead of x and trains no A; Delta-LoRA keeps no gradient or state for W.
    assert memory["lora_fa"] < memory["lora"]
    assert memory["delta_lora"] == pytest.approx(memory["lora"], rel=0.01)
    assert result.trainable["delta_lora"] == result.trainable["lora"]
    # Ours detaches the norm and keeps no activation-sized tensor of its own; peft's DoRA keeps several.
    assert memory["dora"] < memory["peft:dora"]
    assert result.trainable["dora"] == result.trainable["peft:dora"]
    assert set(ratios(result)) == {"dora / peft:dora"}


def test_interleaved_steps_every_setup_in_rotating_rounds(bert, monkeypatch):
    from lorafam_nb import bench
    from lorafam_nb.trainer import Trainer

    batch = {"input_ids": torch.randint(1, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    models = {name: get_adapter_model(copy.deepcopy(bert), LoraConfig(r=r, target_modules=["query"],
                                                                      modules_to_save=["classifier"]))
              for name, r in (("a", 2), ("b", 4), ("c", 8))}
    order = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, batches: (order.append(self.model), step(self, batches))[1])
    result = bench.interleaved(models, batch, steps=3, device=torch.device("cpu"), warmup=1)
    names = {id(m): n for n, m in models.items()}
    rounds = ["".join(names[id(m)] for m in order[i:i + 3]) for i in range(0, len(order), 3)]
    # One warm-up round, three timed ones, then one untimed step of each to measure its memory.
    assert rounds == ["abc", "bca", "cab", "abc", "abc"]
    assert set(result.memory) == {"a", "b", "c"} and result.memory["c"] > result.memory["a"]  # rank 8 > rank 2
    assert {n: len(t) for n, t in result.times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(m.adapter_layers()["bert.encoder.layer.0.attention.self.query"].lora_B.abs().sum() > 0
               for m in models.values())  # real optimizer steps
    result.times = {"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}
    assert result.ratio("a", "b") == 1.0 and result.median("a") == 2.0  # median of the per-round ratios
    assert [r["setup"] for r in result.rows("b")] == ["a", "b"] and result.rows("b")[1]["× b"] == 1.0
