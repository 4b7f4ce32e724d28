"""The reference table's models by id, offline: their architectures on the meta device (targets, FFN view,
budgets, every method's matched size) and tiny random twins that really train and run the smoke grid."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafam_nb import grid
from lorafam_nb.architectures import TINY, meta_model, reference_config
from lorafam_nb.core import count_parameters
from lorafam_nb.experiment import RunSpec, run
from lorafam_nb.lora import LoraConfig
from lorafam_nb.models import ffn_blocks
from lorafam_nb.trainer import TrainConfig

from conftest import text_methods

GEMMA, LLAMA = "google/gemma-2b", "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("model_id, layers, total", [(GEMMA, 18, 2_506_172_416), (LLAMA, 32, 6_607_343_616)])
def test_meta_model_has_the_published_shape(model_id, layers, total):
    base = meta_model(model_id)
    assert next(base.parameters()).device.type == "meta"
    # Gemma-2B's 2.51 B parameters (embeddings tied); Llama-2-7B's 6.74 B less its 131 M-parameter LM head.
    assert count_parameters(base)[1] == total
    assert len(ffn_blocks(base)) == layers
    assert {s.d_in for s in ffn_blocks(base)} == {reference_config(model_id).hidden_size}


@pytest.mark.parametrize("alias, count, linears", [("gemma-2b", 98_058_240, 126), ("llama2-7b", 199_884_800, 224)])
def test_lora_r80_on_the_seven_linears_has_the_reference_tables_count(alias, count, linears):
    shape = grid.model_shape(alias)
    assert len(shape.linears) == linears  # q, k, v, o, gate, up, down in every layer
    names = {n.rsplit(".", 1)[-1] for n, m in shape.base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert grid.reference_count(shape, 80) == count


@pytest.fixture(scope="module")
def full_plan():
    return grid.plan("full")


def test_every_method_is_sized_for_the_reference_budgets(full_plan):
    budgets = {(r.model, r.method): grid.Budget(**r.budget) for r in full_plan if r.method != grid.BASELINE}
    assert {(r.model, r.task) for r in full_plan if r.method == grid.BASELINE} == {
        (m, t) for m in (GEMMA, LLAMA) for t in grid.TASKS}  # the table's no-fine-tuning rows
    assert {m for _, m in budgets} == set(text_methods())
    for (model, method), b in budgets.items():
        assert b.target == {GEMMA: 98_058_240, LLAMA: 199_884_800}[model]
        # Matched within ±5 %, or at the method's largest size (VeRA's whole idea is to be far smaller).
        assert b.matched or b.value == b.max_value, (model, method, b)
    # The LoRA family's sizes, worked by hand: DoRA's magnitudes cost one rank; LoRA-FA trains B alone.
    assert budgets[(GEMMA, "dora")].values == {"r": 79} and budgets[(LLAMA, "dora")].values == {"r": 79}
    assert budgets[(GEMMA, "lora_fa")].values == {"r": 138} and budgets[(LLAMA, "lora_fa")].values == {"r": 147}
    assert not budgets[(GEMMA, "vera")].matched


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_twin_trains_a_real_step(name):
    out = run(RunSpec(model=name, task="boolq", finetune=LoraConfig(r=4, target_modules="all-linear"), train_n=8,
                      eval_n=8, max_length=48, train=TrainConfig(lr=1e-2, max_steps=2, batch_size=4, progress=False,
                                                                 log_every=1)))
    assert type(out.model.model).__name__.startswith({"tiny-gemma": "Gemma", "tiny-llama": "Llama"}[name])
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in out.history) and out.row["steps"] == 2
    lora_B = [p for n, p in out.model.named_parameters() if n.endswith("lora_B")]
    assert len(lora_B) == 2 * 7 and all(p.abs().max() > 0 for p in lora_B)  # B left zero: every site trained


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_twin_runs_the_smoke_grid(name, tmp_path):
    smoke = grid.PROFILES["smoke"]
    profile = dataclasses.replace(smoke, name=f"smoke-{name}", models={name: smoke.models["minilm"]},
                                  tasks=("arc_e",), multi_task=False, baseline=False)
    report = grid.run_grid(grid.plan(profile), tmp_path, log=None)
    assert len(report.trained) == len(report.results) == len({r.method for r in report.runs}) >= 3
    for record in report.results:
        assert 0 <= record["accuracy"]["arc_e"] <= 1 and record["params"]["real"] > 0


@pytest.mark.parametrize("alias, published", [("gemma-2b", 131_383_296), ("llama2-7b", 203_423_744)])
def test_mixlora_count_equals_the_reference_tables(alias, published):
    # The table's MixLoRA rows: 8 experts, top 2, r=16 on both models; our count of that config is theirs.
    from lorafam_nb.moe.mixlora import MixLoraConfig

    shape = grid.model_shape(alias)
    config = MixLoraConfig(r=16, num_experts=8, top_k=2, target_modules=shape.targets)
    assert config.model_parameters(config.sites(shape.base)) == published


def test_the_rule_picks_the_published_mixlora_size_on_llama(full_plan):
    budget = next(grid.Budget(**r.budget) for r in full_plan if r.model == LLAMA and r.method == "mixlora")
    assert budget.values == {"r": 16, "num_experts": 8} and budget.closed_form == 203_423_744


def test_reference_ids_run_with_the_decoder_protocol_offline():
    # A run on a reference hub id scores answers through the LM head (label tokens), as on SmolLM2, without
    # reaching the hub to find out that the model is a decoder.
    from lorafam_nb.models import architecture_of

    for model_id in (GEMMA, LLAMA, "tiny-gemma"):
        assert architecture_of(model_id) == "decoder"
        assert RunSpec(model=model_id, task="boolq").resolved_protocol() == "label_token"
    assert RunSpec(model="minilm").resolved_protocol() == "encoder"
