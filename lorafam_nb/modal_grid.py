"""The vision and multimodal comparison: every registered method whose ``modality`` is not text, in its
modality's setting, at the trainable-parameter budget of LoRA on the same model's linears.

The cells are the text grid's (:class:`lorafam_nb.grid.GridRun`: trained, recorded and read back by
:func:`lorafam_nb.grid.run_grid`, budgets matched by :func:`lorafam_nb.grid.match_budget`); only the settings
differ. Each :class:`Setting` names a model per profile, the tasks one adapter trains on together (a mix, each
task scored on its own test examples), and the training sizes; LoRA adapts every linear the model's spec
names (``all_linear``) for the reference count. A method joins its modality's setting by declaring ``modality``; nothing here names a method.

* ``"vision"``: DINOv2-small classifying Fashion-MNIST from 20 images per class (few-shot, as the visual
  adapter papers evaluate), the classifier trained alongside every adapter.
* ``"multimodal"``: the toy vision-language model (:mod:`lorafam_nb.vlm`) tuned on its five instruction
  tasks at once, scored per task.

A method whose smallest size is above the budget (a whole-FFN expert is far larger than a LoRA) runs at its
smallest size, and the table says so. Methods of a modality without a setting here (``"dense"``: a
dense-prediction decoder, which has no LoRA counterpart on a frozen CNN) are compared in their chapters.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import grid
from .core import AdapterConfig, import_methods
from .data import task_info
from .grid import BASELINE, MIX, Budget, GridRun, ModelSettings, average, closed_form_count, match_budget
from .lora import LoraConfig
from .models import load_model, model_spec
from .notebook import Table, table

__all__ = ["SETTINGS", "Setting", "comparison_table", "plan"]


@dataclass(frozen=True)
class Setting:
    models: dict[str, str]  # profile -> the model trained
    budget_model: str  # the model whose sites size the budgets (the same architecture; nothing to train first)
    tasks: tuple[str, ...]  # trained on together; each scored on its own
    sizes: dict[str, ModelSettings]  # profile -> train_n / eval_n per task, length, batch, LR (LoRA's)
    reference_rank: int = 8


SETTINGS: dict[str, Setting] = {
    "vision": Setting(
        {"smoke": "dinov2-small", "book": "dinov2-small", "full": "dinov2-small"}, "dinov2-small",
        ("fashion_mnist",),
        {"smoke": ModelSettings(16, 16, 64, 8, 1e-3),
         "book": ModelSettings(200, 500, 64, 16, 1e-3, epochs=3),
         "full": ModelSettings(None, None, 64, 16, 1e-3, epochs=3)}),
    "multimodal": Setting(
        {"smoke": "toy-vlm-smoke", "book": "toy-vlm", "full": "toy-vlm"}, "toy-vlm-raw",
        ("vlm_shape", "vlm_color", "vlm_yesno", "vlm_fashion", "vlm_textile"),
        {"smoke": ModelSettings(4, 8, 64, 8, 5e-4),
         "book": ModelSettings(160, 100, 64, 16, 5e-4),
         "full": ModelSettings(1000, None, 64, 16, 5e-4)}),
}


def _budget(cls: type[AdapterConfig], sites: list[Any], target: int) -> Budget:
    """:func:`~lorafam_nb.grid.match_budget`, or the method's smallest size when even that is above ``target``."""
    try:
        return match_budget(cls, sites, target)
    except ValueError:
        candidates = cls.budget_candidates(sites)
        counts = [closed_form_count(cls.sized(v, "all-linear"), sites) for v in candidates]
        least = min(range(len(counts)), key=counts.__getitem__)
        values = dict(candidates[least])
        top = max(v[cls.budget_knob] for v in candidates)
        return Budget(cls.method, cls.budget_knob, values.pop(cls.budget_knob), top, target, counts[least], values)


def plan(profile: str, seed: int = 0, modalities: Sequence[str] | None = None) -> list[GridRun]:
    """Per modality: the model as it is (for the image classifier: its untrained head), LoRA at the reference
    rank, and every registered method of that modality at LoRA's count (at the smoke profile, the methods
    whose configs ask for the smoke grid, as in the text grid)."""
    methods = import_methods()
    runs = []
    for modality in modalities or SETTINGS:
        s = SETTINGS[modality]
        if profile not in s.sizes:
            raise ValueError(f"unknown profile {profile!r}; allowed: {', '.join(s.sizes)}")
        sizes, model = s.sizes[profile], s.models[profile]
        base = load_model(s.budget_model, head="base")
        head = list(model_spec(model).head_modules)
        targets = list(model_spec(s.budget_model).all_linear)  # every linear the model's spec names
        target = closed_form_count(LoraConfig(r=s.reference_rank), LoraConfig(target_modules=targets).sites(base))
        tasks = s.tasks
        task = MIX if len(tasks) > 1 else tasks[0]
        total = sum(p.numel() for p in base.parameters())
        settings = dataclasses.asdict(sizes)
        runs.append(GridRun(profile, model, BASELINE, task, tasks, {}, {}, settings, total, seed))
        chosen = {"lora": LoraConfig, **{m: c for m, c in methods.items() if c.modality == modality
                                         and (profile != "smoke" or vars(c).get("in_smoke_grid"))}}
        steps = grid._steps(tasks, sizes)  # what a method with a schedule over training is sized for
        for name, cls in chosen.items():
            budget = _budget(cls, cls(target_modules=targets).sites(base), target)
            config = cls.sized(budget.values, targets, steps, modules_to_save=head)
            runs.append(GridRun(profile, model, name, task, tasks, config.to_dict(), dataclasses.asdict(budget),
                                {**settings, "lr": sizes.lr * cls.lr_scale}, total, seed))
    return runs


def comparison_table(results: Sequence[dict[str, Any]]) -> Table:
    """One row per (model, method): the real adapter count, the budget's status,
    each task's accuracy with its 95 % Wilson interval, and the mean over the tasks (half-widths in
    quadrature)."""
    cells = grid.scores(results, multi=True) | grid.scores(results)
    rows = []
    for r in results:
        tasks = list(r["accuracy"])
        row_cells = [cells[r["model"], r["method"], t] for t in tasks]
        b = Budget(**r["config"]["budget"]) if r["config"]["budget"] else None
        status = ("—" if b is None else "matched" if b.matched else
                  f"smallest size, {100 * b.deviation:+.0f} %" if b.closed_form > b.target else "nearest")
        rows.append({"model": r["model"], "method": r["method"], "#Params": f"{r['params']['real']:,}",
                     "budget": status,
                     **{task_info(t).title: c.text() for t, c in zip(tasks, row_cells)},
                     **({"mean": average(row_cells).text()} if len(tasks) > 1 else {})})
    return table(rows)
