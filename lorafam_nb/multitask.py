"""The book's multi-task setting, shared by every chapter whose method exists for multi-task learning.

Ten tasks, each with a task id (its index in :data:`MULTITASK_TASKS`): the five commonsense multiple-choice
tasks and the five GLUE tasks viewed as multiple choice over their label names (``sst2_mc``, …; STS-B as six
choices, its score rounded), so that one head (an encoder's multiple-choice head, or a decoder's answer
token) serves all of them. RTE, the smallest GLUE task and the classic transfer target, is held out
(:data:`HELD_OUT`, the last id) for the methods that claim transfer to new tasks. Results are reported per
task beside the macro average, each with its 95 % interval (:func:`per_task_table`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .core import AdapterConfig
from .data import COMMONSENSE_TASKS, GLUE_CHOICE_TASKS, task_info
from .experiment import RunOutput, RunSpec
from .intervals import macro_interval
from .intervals import wilson_interval as interval

__all__ = ["HELD_OUT", "MULTITASK_TASKS", "TRAIN_TASKS", "interval", "macro_interval", "per_task_table", "spec"]

HELD_OUT = "rte_mc"
MULTITASK_TASKS: tuple[str, ...] = (*COMMONSENSE_TASKS, *(t for t in GLUE_CHOICE_TASKS if t != HELD_OUT), HELD_OUT)
TRAIN_TASKS: tuple[str, ...] = MULTITASK_TASKS[:-1]

def spec(finetune: str | AdapterConfig, tasks: Sequence[str] = TRAIN_TASKS, **fields: Any) -> RunSpec:
    """A run that trains one model on the union of ``tasks`` and evaluates on each; every example carries
    its task id in the whole setting (``RunSpec.task_ids``), so ids stay fixed whatever subset trains."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in MULTITASK_TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {MULTITASK_TASKS}; unknown: {unknown}")
    return RunSpec(task=tasks[0], mix=tasks, task_ids=MULTITASK_TASKS, finetune=finetune, **fields)


def _cell(accuracy: float, lo: float, hi: float) -> str:
    return f"{accuracy:.3f} [{lo:.2f}, {hi:.2f}]"


def per_task_table(outputs: Mapping[str, RunOutput | dict[str, Any]]) -> Any:
    """One row per arm (the mapping's keys): each evaluated task's accuracy with its 95 % interval, the
    macro average over those tasks with its interval, and the trainable parameters. Accepts run outputs or
    their ``row`` dicts."""
    from .notebook import table

    rows = []
    for arm, out in outputs.items():
        row = out.row if isinstance(out, RunOutput) else out
        accs, ns = row["per_task"], row["per_task_n"]
        record: dict[str, Any] = {"arm": arm, "trainable": f"{row['trainable']:,}"}
        for task, acc in accs.items():
            record[task_info(task).title] = _cell(acc, *interval(acc, ns[task]))
        mean = sum(accs.values()) / len(accs)
        record["macro average"] = _cell(mean, *macro_interval(list(accs.values()), [ns[t] for t in accs]))
        rows.append(record)
    return table(rows)  # the book's table: no index, fits the column
