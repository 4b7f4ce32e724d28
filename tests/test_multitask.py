"""The shared multi-task setting: GLUE as multiple choice, fixed task ids, intervals, the stage hook."""
from __future__ import annotations

import dataclasses
import math

import pytest

from lorafam_nb import experiment, multitask
from lorafam_nb.data import GLUE_TASKS, load_task, task_info
from lorafam_nb.lora import LoraConfig
from lorafam_nb.trainer import TrainConfig


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_choice_view_keeps_the_labels(task: str) -> None:
    plain, view = load_task(task, "validation", n=40, seed=3), load_task(f"{task}_mc", "validation", n=40, seed=3)
    assert task_info(f"{task}_mc").kind == "multiple_choice" and task_info(f"{task}_mc").eval_split == "validation"
    for row, mc in zip(plain, view):
        assert all(row[f] in mc["question"] for f in task_info(task).text_fields)
        if task == "stsb":  # rounded half up: 2.5 -> "3", 2.4 -> "2"
            assert mc["choices"] == [str(i) for i in range(6)] and mc["label"] == math.floor(row["label"] + 0.5)
        else:
            assert mc["label"] == row["label"] and len(mc["choices"]) == task_info(task).num_labels


def test_setting_holds_ten_tasks_and_holds_one_out() -> None:
    assert len(multitask.MULTITASK_TASKS) == len(set(multitask.MULTITASK_TASKS)) == 10
    assert multitask.MULTITASK_TASKS[-1] == multitask.HELD_OUT not in multitask.TRAIN_TASKS
    assert all(task_info(t).kind == "multiple_choice" for t in multitask.MULTITASK_TASKS)


def test_task_ids_index_the_whole_setting() -> None:
    spec = multitask.spec("head", tasks=("piqa", "sst2_mc"), train_n=3, eval_n=2)
    ids = {e["task_id"] for e in experiment.training_set(spec).examples}
    assert ids == {multitask.MULTITASK_TASKS.index("piqa"), multitask.MULTITASK_TASKS.index("sst2_mc")}
    held = experiment.RunSpec(task=multitask.HELD_OUT, task_ids=multitask.MULTITASK_TASKS, train_n=2)
    assert {e["task_id"] for e in experiment.training_set(held).examples} == {9}
    with pytest.raises(ValueError, match="no task id"):
        experiment.encode_task(dataclasses.replace(held, task="rte"), "train", 2)
    with pytest.raises(ValueError, match="subset"):
        multitask.spec("head", tasks=("rte",))


class _Staged(LoraConfig):
    """A LoRA whose first stage records what it was handed."""

    seen: list = []

    def prepare(self, model, spec):  # noqa: ANN001
        self.seen.append((type(model).__name__, spec.task))


def test_a_run_reports_per_task_metrics_and_calls_the_stage_hook() -> None:
    config = _Staged(r=2, lora_alpha=4, target_modules=["query", "value"])
    spec = multitask.spec(config, tasks=("boolq", "sst2_mc", "stsb_mc"), train_n=4, eval_n=3, max_length=32,
                          train=TrainConfig(batch_size=4, progress=False))
    out = experiment.run(spec)
    assert _Staged.seen == [("AdapterModel", "boolq")]
    assert set(out.row["per_task"]) == {"boolq", "sst2_mc", "stsb_mc"}
    assert out.row["per_task_n"] == {"boolq": 3, "sst2_mc": 3, "stsb_mc": 3}
    frame = multitask.per_task_table({"lora": out})
    assert list(frame.columns) == ["arm", "trainable", "BoolQ", "SST-2 (choice)", "STS-B (choice)", "macro average"]
    assert frame.loc[0, "macro average"].startswith(f"{out.row['accuracy']:.3f} [")
