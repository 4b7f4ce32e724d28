"""The vision and multimodal comparison: who runs where, at which budget, and a table from real records."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from lorafam_nb import grid, modal_grid
from lorafam_nb.core import import_methods
from lorafam_nb.lora import LoraConfig
from lorafam_nb.models import load_model


@pytest.fixture(scope="module")
def smoke_plan():
    return modal_grid.plan("smoke")


@pytest.fixture(scope="module")
def book_plan():
    return modal_grid.plan("book")


def test_every_vision_and_multimodal_method_runs_once_in_its_setting(book_plan, smoke_plan):
    for plan, smoke in ((book_plan, False), (smoke_plan, True)):
        by_modality = {m: {r.method for r in plan if r.model in s.models.values()}
                       for m, s in modal_grid.SETTINGS.items()}
        for modality, ran in by_modality.items():
            own = {name for name, cls in import_methods().items() if cls.modality == modality
                   and (not smoke or vars(cls).get("in_smoke_grid"))}
            assert ran == {grid.BASELINE, "lora"} | own, modality
        assert len(plan) == len({(r.model, r.method) for r in plan})
    text = {name for name, cls in import_methods().items() if cls.modality == "text"} - {"lora"}
    assert not text & {r.method for r in smoke_plan}


def test_the_budget_is_loras_at_the_reference_rank_on_the_same_linears(book_plan):
    vlm = modal_grid.SETTINGS["multimodal"]
    base = load_model(vlm.budget_model, head="base")
    # SmolLM2-135M, per layer: q, o 576 → 576; k, v 576 → 192; gate, up 576 → 1536; down 1536 → 576.
    per_layer = 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert sum(1 for n, _ in base.named_modules() if n.endswith("self_attn.q_proj")) == 30
    lora = next(r for r in book_plan if r.model == "toy-vlm" and r.method == "lora")
    assert lora.budget["target"] == lora.budget["closed_form"] == 30 * per_layer
    for r in book_plan:
        if r.method not in (grid.BASELINE, "lora"):
            b = grid.Budget(**r.budget)
            assert b.matched or b.closed_form > b.target, (r.method, b)  # matched, or its smallest size


def test_a_method_above_the_budget_runs_at_its_smallest_size():
    @dataclasses.dataclass
    class Big(LoraConfig):
        method: ClassVar[str] = "big"

        def num_parameters(self, d_in: int, d_out: int) -> int:
            return 10 ** 9 * self.r

    base = load_model("dinov2-small", head="base")
    sites = Big(target_modules=["q_proj"]).sites(base)
    with pytest.raises(ValueError, match="below big's minimum"):
        grid.match_budget(Big, sites, 1000)
    budget = modal_grid._budget(Big, sites, 1000)
    assert (budget.value, budget.closed_form) == (1, 12 * 10 ** 9) and not budget.matched


def test_the_table_reads_real_records(tmp_path):
    runs = [r for r in modal_grid.plan("smoke", modalities=["vision"]) if r.method in (grid.BASELINE, "lora")]
    report = grid.run_grid(runs, tmp_path, log=None)
    shown = modal_grid.comparison_table(report.results)
    assert list(shown["method"]) == [grid.BASELINE, "lora"]
    assert list(shown["budget"]) == ["—", "matched"]
    lora = next(r for r in report.results if r["method"] == "lora")
    assert shown["#Params"].iloc[1] == f"{lora['params']['real']:,}"
    assert shown["Fashion-MNIST"].iloc[1] == grid.Score.of([lora["accuracy"]["fashion_mnist"]], 16).text()
