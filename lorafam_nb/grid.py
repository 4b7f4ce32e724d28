"""The experiments grid: every registered method × model × task (and the five-task mix) at one budget.

The reference comparison table (TUDB-Labs, Awesome-LLM-LoRA) fine-tunes one adapter per commonsense
task and matches the methods' trainable-parameter counts. This module reproduces that layout from our
own runs:

1. :func:`plan` expands a :class:`Profile` into :class:`GridRun` cells. Every method of the registry
   (:func:`~lorafam_nb.core.import_methods`) gets the size settings (its ``budget_candidates``, ranked by
   its ``budget_order``) whose closed-form count (``model_parameters`` over the sites it adapts: routers
   and shared modules included) best matches LoRA's count at the profile's reference rank
   (:func:`match_budget`). Everything is validated before any training.
2. :func:`run_grid` trains each cell with the book's ordinary run (:func:`lorafam_nb.experiment.run`)
   and writes its record to the results store (:mod:`lorafam_nb.results`), keyed as every run is (the
   run's inputs, the cell's plan as its context, the code that computes it). A cell whose record exists
   is not trained again, so a changed config or code retrains only the cells it changes. Under a launcher
   with several processes (``torchrun``, ``accelerate launch``) the cells to train are fanned out: each
   process trains every N-th one on its own device and writes its records (:mod:`~lorafam_nb.distributed`).
3. :func:`comparison_table`, :func:`multitask_table` and :func:`budget_table` are built from those
   records alone.

Some methods cannot simply be matched. A method whose count reaches the budget only at sizes beyond any
matrix's dimension runs at its largest sensible size and is reported as not matched. A method whose first
stage decides its architecture (:meth:`~lorafam_nb.core.AdapterConfig.resolve`) is matched on its planned
count, and its record holds the count the run really trained. The grid holds no method's name: each
method's sizing rule, run-dependent settings, learning-rate convention and first stage live on its config.
"""
from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed, experiment, results
from .architectures import meta_model
from .core import (BUDGET_TOLERANCE, METHOD_PATHS, AdapterConfig, Site, count_parameters, import_methods,
                   target_module_names)
from .data import load_task
from .experiment import ModelFacts, RunSpec, adapter_parameters
from .lora import LoraConfig
from .models import MODELS, load_model
from .trainer import Callback, TrainConfig, resolve_device

__all__ = [
    "MIX", "PROFILES", "REFERENCE_MODELS", "TASKS", "Budget", "GridReport", "GridRun", "ModelSettings",
    "Profile", "adapter_parameters", "budget_table", "comparison_table", "default_results_dir", "execute", "load_results",
    "match_budget", "reference_count", "model_shape", "multitask_table", "plan", "run_grid",
]

TASKS = ("arc_e", "arc_c", "boolq", "obqa", "piqa")  # the reference table's columns, in its order
TASK_TITLES = {"arc_e": "ARC-e", "arc_c": "ARC-c", "boolq": "BoolQ", "obqa": "OBQA", "piqa": "PIQA"}
MIX = "mix"  # the cell that trains one adapter on the union of the profile's tasks
TOLERANCE = BUDGET_TOLERANCE  # a budget counts as matched within ±5 %
# The reference table's base models, runnable by hub id (profile "full", a GPU and the hub needed).
REFERENCE_MODELS = {"gemma-2b": "google/gemma-2b", "llama2-7b": "meta-llama/Llama-2-7b-hf"}


# --- profiles ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings:
    """How one model trains in a profile. ``train_n``/``eval_n`` are per task (None: the whole split);
    the mix trains on ``train_n`` of every task."""

    train_n: int | None
    eval_n: int | None
    max_length: int
    batch_size: int
    lr: float
    epochs: float = 1.0
    grad_accum: int = 1
    schedule: str = "linear"
    protocol: str | None = None  # None: RunSpec's choice ("label_token" for the decoder)
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast (the GPU setting)


@dataclass(frozen=True)
class Profile:
    name: str
    models: dict[str, ModelSettings]
    methods: tuple[str, ...] | None = None  # None: every registered method (with ``smoke``: those in_smoke_grid)
    smoke: bool = False
    skip: dict[str, str] = field(default_factory=dict)  # method -> why this profile does not run it
    tasks: tuple[str, ...] = TASKS
    multi_task: bool = True
    reference_rank: int = 8  # the budget: LoRA's count at this rank on the same (all) linears


PROFILES: dict[str, Profile] = {
    # Pipeline check for CI (< 1 min): a few examples, MiniLM only, the methods whose configs say
    # ``in_smoke_grid`` (one matched, one that cannot be, one mixture).
    "smoke": Profile("smoke", {"minilm": ModelSettings(8, 16, 32, 8, 1e-3)}, smoke=True),
    # The rendered book: every method on both embedded models, subsampled; 132 runs took 48.5 min on an idle
    # 2-core x86_64 machine (2026-12-02), the mix cells a third of it.
    "book": Profile("book", {"minilm": ModelSettings(128, 150, 48, 16, 1e-3),
                             "smollm2-135m": ModelSettings(16, 32, 96, 8, 5e-4)}),
    # The reference table's setting (its per-run configs): r=80 on all linears, batch 16 as 4 × 4,
    # constant LR 1e-4, 2 epochs, cutoff 512, whole splits. Sized for one 80 GB GPU: fp32 weights (LLaMA-2-7B:
    # 27 GB) and bf16 autocast, whose activations at 4 × 512 tokens fit beside them. The weights come from the hub.
    "full": Profile("full", {name: ModelSettings(None, None, 512, 4, 1e-4, epochs=2, grad_accum=4,
                                                 schedule="constant", protocol="label_token", precision="bf16")
                             for name in REFERENCE_MODELS.values()},
                    reference_rank=80),
}


def _model_id(name: str) -> str:
    """A short name of an embedded model, a reference alias (``gemma-2b``) resolved, or a hub id."""
    name = REFERENCE_MODELS.get(name, name)
    if name not in MODELS and "/" not in name:
        raise ValueError(f"unknown model {name!r}; allowed: embedded {sorted(MODELS)}, reference "
                         f"{sorted(REFERENCE_MODELS)}, or a Hugging Face hub id such as 'google/gemma-2b'")
    return name


# --- budgets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What budgets depend on: the base model (for each method's sites), the "all linear layers" targets,
    those linears' ``(d_in, d_out)`` and the base model's size."""

    model: str
    targets: list[str] | str
    linears: tuple[tuple[int, int], ...]
    base_parameters: int  # the pretrained model without any task head
    base: nn.Module = field(compare=False, repr=False)  # real weights (embedded models) or the meta device (hub)


def model_shape(model: str) -> ModelShape:
    """Shapes of the linears "all linear layers" means for ``model`` (the reference table's choice)."""
    model = _model_id(model)
    targets: list[str] | str = list(MODELS[model].all_linear) if model in MODELS else "all-linear"
    if model in MODELS:
        base: nn.Module = load_model(model, head="base")
    else:  # hub models: built on the meta device from their config, no weights needed for shapes
        base = meta_model(model)
    names = target_module_names(base, LoraConfig(target_modules=targets))
    linears = tuple((base.get_submodule(n).in_features, base.get_submodule(n).out_features) for n in names)
    return ModelShape(model, targets, linears, count_parameters(base)[1], base)


def method_sites(cls: type[AdapterConfig], shape: ModelShape) -> list[Site]:
    """Where ``cls`` adapts the model at the grid's targets (sites do not depend on the size knobs)."""
    return cls(target_modules=shape.targets).sites(shape.base)


@dataclass(frozen=True)
class Budget:
    """A method's size knob chosen for a target count; ``closed_form`` is its count by ``model_parameters``.
    ``extra`` holds the other size settings a method varies with its knob (a mixture's expert count)."""

    method: str
    knob: str
    value: int
    max_value: int
    target: int
    closed_form: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, Any]:
        return {self.knob: self.value, **self.extra}

    @property
    def deviation(self) -> float:
        return self.closed_form / self.target - 1

    @property
    def matched(self) -> bool:
        return abs(self.deviation) <= TOLERANCE


def closed_form_count(config: AdapterConfig, sites: Sequence[Site]) -> int:
    """The config's trainable adapter parameters over ``sites``, routers and shared modules counted once."""
    return config.model_parameters(list(sites))


def reference_count(shape: ModelShape, rank: int) -> int:
    """LoRA's trainable count at ``rank`` on ``shape``'s linears: the budget every method is matched to."""
    return closed_form_count(LoraConfig(r=rank), method_sites(LoraConfig, shape))


def match_budget(cls: type[AdapterConfig], sites: Sequence[Site], target: int) -> Budget:
    """The size settings (:meth:`~lorafam_nb.core.AdapterConfig.budget_candidates`) whose closed-form count
    is best for ``target`` by the method's own order (:meth:`~lorafam_nb.core.AdapterConfig.budget_order`):
    for one knob the nearest count, ties to the larger value (a method whose extra vectors put r=8 and r=7
    equally far from LoRA's r=8 keeps LoRA's rank, as the papers and the reference table do).

    A target below the smallest count (by more than the tolerance) is an error.
    """
    sites = list(sites)
    candidates = cls.budget_candidates(sites)
    counts = [closed_form_count(cls.sized(v, "all-linear"), sites) for v in candidates]
    smallest = min(range(len(counts)), key=counts.__getitem__)
    if counts[smallest] > target * (1 + TOLERANCE):
        setting = ", ".join(f"{k}={v}" for k, v in candidates[smallest].items())
        raise ValueError(f"budget {target:,} is below {cls.method}'s minimum {counts[smallest]:,} ({setting}) "
                         f"on these sites; allowed: budgets of at least {counts[smallest] / (1 + TOLERANCE):,.0f}")
    best = min(range(len(counts)), key=lambda i: cls.budget_order(candidates[i], counts[i], target))
    values = dict(candidates[best])
    top = max(v[cls.budget_knob] for v in candidates)
    return Budget(cls.method, cls.budget_knob, values.pop(cls.budget_knob), top, target, counts[best], values)


# --- the grid ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridRun:
    """One cell: everything that determines its result. Its :attr:`key` is its record's in the store."""

    profile: str
    model: str
    method: str
    task: str  # one of TASKS, or MIX
    tasks: tuple[str, ...]  # what the cell trains on (one task, or the mix's)
    adapter: dict[str, Any]  # the adapter config's to_dict()
    budget: dict[str, Any]  # asdict(Budget)
    settings: dict[str, Any]  # asdict(ModelSettings), LR already scaled for the method
    base_parameters: int
    seed: int

    @property
    def key(self) -> str:
        return results.key_of(self.inputs())

    def inputs(self, facts: Callback | None = None) -> dict[str, Any]:
        """The cell's run inputs (:func:`lorafam_nb.experiment.run_inputs`), the plan as context."""
        spec = self.spec(AdapterConfig.from_dict(self.adapter))
        return experiment.run_inputs(spec, self.profile, [facts or ModelFacts()], context=dataclasses.asdict(self))

    def spec(self, config: AdapterConfig, device: str = "auto") -> RunSpec:
        s = self.settings
        # data_parallel=False: under a launch, each process trains its own cells (run_grid's fan-out).
        train = TrainConfig(lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                            schedule=s["schedule"], device=device, precision=s["precision"], progress=False,
                            log_every=5, data_parallel=False)
        return RunSpec(model=self.model, task=self.tasks[0], mix=self.tasks if self.task == MIX else (),
                       finetune=config, train_n=s["train_n"], eval_n=s["eval_n"], max_length=s["max_length"],
                       protocol=s["protocol"], seed=self.seed, train=train, label=self.method)


def _resolve_profile(profile: Profile | str) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    return PROFILES[profile]


def _steps(tasks: Sequence[str], s: ModelSettings) -> int:
    """The trainer's optimizer steps for these tasks (its own formula, from the real split sizes)."""
    n = sum(len(load_task(t, "train", n=s.train_n)) for t in tasks)
    return max(1, math.ceil(s.epochs * math.ceil(n / (s.batch_size * s.grad_accum))))


def plan(profile: Profile | str, seed: int = 0) -> list[GridRun]:
    """Every cell of ``profile``, budgets matched; raises ``ValueError`` (saying what is allowed) on an
    unknown profile, method, task or model, or an unreachable budget, before anything trains."""
    profile = _resolve_profile(profile)
    registry = import_methods()
    # The book's chapter order first (the registry's order depends on which module was imported first).
    known = [m for m in METHOD_PATHS if m in registry] + [m for m in registry if m not in METHOD_PATHS]
    chosen = profile.methods or tuple(m for m in known if vars(registry[m]).get("in_smoke_grid") or not profile.smoke)
    methods = tuple(m for m in chosen if m not in profile.skip)
    for method in (*methods, *profile.skip):
        if method not in registry:
            raise ValueError(f"unknown method {method!r}; registered: {', '.join(sorted(registry))}")
    for task in profile.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)} (the multiple-choice suite)")
    models = {_model_id(name): settings for name, settings in profile.models.items()}
    cells = [(task, (task,)) for task in profile.tasks] + ([(MIX, profile.tasks)] if profile.multi_task else [])
    runs = []
    for model, settings in models.items():
        shape = model_shape(model)
        target = reference_count(shape, profile.reference_rank)
        budgets = {m: match_budget(registry[m], method_sites(registry[m], shape), target) for m in methods}
        steps = {task: _steps(tasks, settings) for task, tasks in cells}
        for method in methods:
            cls = registry[method]
            for task, tasks in cells:
                config = cls.sized(budgets[method].values, shape.targets, steps[task], settings.lr)
                runs.append(GridRun(profile.name, model, method, task, tasks, config.to_dict(),
                                    dataclasses.asdict(budgets[method]),
                                    dataclasses.asdict(dataclasses.replace(settings, lr=settings.lr * cls.lr_scale)),
                                    shape.base_parameters, seed))
    return runs


def execute(run: GridRun, device: str = "auto") -> dict[str, Any]:
    """Train one cell and return its record: the store's record of the run, plus the grid's fields."""
    facts = ModelFacts()
    inputs = run.inputs(facts)
    # build_model inside run() runs the method's own first stage, if it has one (LoRA-drop's probe).
    out = experiment.run(run.spec(AdapterConfig.from_dict(run.adapter), device), callbacks=[facts],
                         profile=run.profile)
    cell = out.records[facts.record_name]
    return {
        **experiment.run_record(out, inputs),
        "config": dataclasses.asdict(run), "profile": run.profile, "seed": run.seed,
        "model": run.model, "method": run.method, "task": run.task,
        "data": {"train_n": out.row["train_n"], "eval_n": out.row["per_task_n"],
                 "eval_split": out.row["eval_split"], "protocol": out.row["protocol"]},
        "params": {"closed_form": run.budget["closed_form"], "real": cell["adapter"], "head": cell["head"],
                   "target": run.budget["target"], "base": run.base_parameters},
        "adapter_trained": cell["adapter_trained"],  # after the first stage (LoRA-drop's kept layers)
        "accuracy": out.row["per_task"], "steps": out.row["steps"], "s_per_step": out.row["s_per_step"],
        "wall_s": out.provenance["wall_s"], "machine": out.row["machine"], "node": platform.node(),
        "process": f"{distributed.rank()}/{distributed.world_size()}",
    }


default_results_dir = results.default_dir  # the grid's records live in the one results store
load_results = results.read_records


@dataclass
class GridReport:
    runs: list[GridRun]
    trained: list[str]  # keys trained by this call
    cached: list[str]  # keys whose record already existed
    results: list[dict[str, Any]]  # every run's record, read back from its file


def run_grid(runs: Sequence[GridRun], results_dir: str | Path | None = None, device: str = "auto",
             log: Callable[[str], None] | None = print) -> GridReport:
    """Train every cell of ``runs`` that has no record in the store at ``results_dir`` (default: the results
    store, :func:`lorafam_nb.results.default_dir`) yet; returns what happened.

    Under a launch of N processes, each trains every N-th missing cell (``trained``: this process's) and all
    wait for each other before the records are read back."""
    store = results.Store(results_dir if results_dir is not None else default_results_dir())
    keys = [run.key for run in runs]
    todo = [run for run, key in zip(runs, keys) if not store.has(key)]
    cached = [key for run, key in zip(runs, keys) if run not in todo]
    if distributed.launched():
        distributed.init(resolve_device(device))
        todo = distributed.my_share(todo)
    trained = []
    for i, run in enumerate(todo, 1):
        record = execute(run, device)
        store.put(record)
        trained.append(record["key"])
        if log:
            acc = " ".join(f"{t}={a:.3f}" for t, a in record["accuracy"].items())
            log(f"[{i}/{len(todo)}] {run.model} {run.method} {run.task}: {acc} ({record['wall_s']:.1f} s)")
    distributed.barrier()
    return GridReport(list(runs), trained, cached, store.records(keys))


# --- tables -----------------------------------------------------------------------------------------

def _params_cell(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


def comparison_table(results: Sequence[dict[str, Any]], multi: bool = False) -> Any:
    """The reference table's layout from our records: one row per (model, method), accuracy in %.

    Single-task cells (``multi=False``) give each task's column from its own adapter; ``multi=True``
    reads every column from the one adapter trained on the mix. #Params is the real adapter count
    (head excluded; a range where a method's first stage chose different layers per task).
    """
    import pandas as pd

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    params: dict[tuple[str, str], list[int]] = {}
    for r in results:
        if (r["task"] == MIX) != multi:
            continue
        key = (r["model"], r["method"])
        row = rows.setdefault(key, {"Base model": r["model"], "PEFT method": r["method"]})
        params.setdefault(key, []).append(r["params"]["real"])
        row["base"] = r["params"]["base"]
        for task, acc in r["accuracy"].items():
            row[TASK_TITLES[task]] = round(100 * acc, 1)
    out = []
    for key, row in rows.items():
        accs = [row[t] for t in TASK_TITLES.values() if t in row]
        out.append({"Base model": row["Base model"], "PEFT method": row["PEFT method"],
                    "#Params": _params_cell(params[key]),
                    "%Params": f"{100 * max(params[key]) / row.pop('base'):.3g}%",
                    **{t: row.get(t) for t in TASK_TITLES.values()},
                    "AVG": round(sum(accs) / len(accs), 1) if accs else None})
    return pd.DataFrame(out)


def multitask_table(results: Sequence[dict[str, Any]]) -> Any:
    """Per (model, method): single-task AVG, the mix adapter's AVG over the same tasks, and the drop."""
    import pandas as pd

    single, multi = comparison_table(results), comparison_table(results, multi=True)
    merged = single.merge(multi, on=["Base model", "PEFT method"], suffixes=(" single", " multi"))
    tasks = [t for t in TASK_TITLES.values() if merged[f"{t} single"].notna().any()]
    frame = merged[["Base model", "PEFT method"]].copy()
    for t in tasks:
        frame[f"Δ {t}"] = (merged[f"{t} multi"] - merged[f"{t} single"]).round(1)
    frame["AVG single"], frame["AVG multi"] = merged["AVG single"], merged["AVG multi"]
    frame["Δ AVG"] = (merged["AVG multi"] - merged["AVG single"]).round(1)
    return pd.DataFrame(frame)


def _first_stage_changed(record: dict[str, Any]) -> bool:
    """Whether the adapter that trained differs from the planned one (beyond the head the run adds)."""
    planned, trained = dict(record["config"]["adapter"]), dict(record["adapter_trained"])
    planned.pop("modules_to_save"), trained.pop("modules_to_save")
    return planned != trained


def budget_table(results: Sequence[dict[str, Any]]) -> Any:
    """Per (model, method): the knob chosen, the target, the closed-form and the real adapter counts."""
    import pandas as pd

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        b, p = Budget(**r["config"]["budget"]), r["params"]
        row = out.setdefault((r["model"], r["method"]), {
            "model": r["model"], "method": r["method"],
            "knob": ", ".join(f"{k}={v}" for k, v in b.values.items()),
            "target": b.target, "closed form": b.closed_form, "real (min)": p["real"], "real (max)": p["real"],
            "deviation %": round(100 * b.deviation, 2),
        })
        row["real (min)"], row["real (max)"] = min(row["real (min)"], p["real"]), max(row["real (max)"], p["real"])
        row["head"] = p["head"]
        row["status"] = ("matched" if b.matched else
                         f"nearest achievable ({b.knob} ≤ {b.max_value})" if b.value == b.max_value
                         else "nearest achievable")
        if _first_stage_changed(r):
            row["status"] += "; planned count matched, real = after the method's first stage"
    return pd.DataFrame(list(out.values()))
