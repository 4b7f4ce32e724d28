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
from .data import load_task, task_info
from .experiment import ModelFacts, RunSpec, adapter_parameters
from .lora import LoraConfig
from .models import MODELS, load_model
from .intervals import independent_mean, mean_interval, pearson_interval, wilson_interval
from .notebook import Table, table
from .trainer import Callback, TrainConfig, resolve_device

__all__ = [
    "BASELINE", "MIX", "PROFILES", "REFERENCE_MODELS", "TASKS", "TASK_TITLES", "Budget", "GridReport",
    "GridRun", "ModelSettings", "Profile", "Score", "adapter_parameters", "average", "budget_table", "comparison_table", "scores", "default_results_dir", "execute", "load_results",
    "match_budget", "reference_count", "model_shape", "multitask_table", "plan", "run_grid",
]

TASKS = ("arc_e", "arc_c", "boolq", "obqa", "piqa")  # the reference table's columns, in its order
# The tasks a grid may run: the reference's five, then GLUE, for models too small to leave chance behind on
# the commonsense suite from a few hundred examples (an encoder classifies them with a sequence-classification
# head; STS-B is scored by Pearson r).
TASK_TITLES = {"arc_e": "ARC-e", "arc_c": "ARC-c", "boolq": "BoolQ", "obqa": "OBQA", "piqa": "PIQA",
               "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "rte": "RTE", "stsb": "STS-B (r)"}
MIX = "mix"  # the cell that trains one adapter on the union of the profile's tasks
BASELINE = "no fine-tuning"  # the row of the pretrained model evaluated as it is (encoders: an untrained head)
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
    task_train_n: dict[str, int] = field(default_factory=dict)  # single-task cells' train_n by task (others: train_n)
    task_eval_n: dict[str, int] = field(default_factory=dict)  # eval_n by task (others: eval_n)

    def train_n_for(self, tasks: Sequence[str]) -> int | None:
        """The training examples per task of a cell: its task's own size, or ``train_n`` (every mix task)."""
        return self.task_train_n.get(tasks[0], self.train_n) if len(tasks) == 1 else self.train_n

    def eval_n_for(self, tasks: Sequence[str]) -> int | None:
        """The evaluated examples per task of a cell (a mix evaluates each task on ``eval_n``)."""
        return self.task_eval_n.get(tasks[0], self.eval_n) if len(tasks) == 1 else self.eval_n


@dataclass(frozen=True)
class Profile:
    name: str
    models: dict[str, ModelSettings]
    methods: tuple[str, ...] | None = None  # None: every registered method (with ``smoke``: those in_smoke_grid)
    smoke: bool = False
    skip: dict[str, str] = field(default_factory=dict)  # method -> why this profile does not run it
    tasks: tuple[str, ...] = TASKS
    multi_task: bool = True
    mix_tasks: tuple[str, ...] | None = None  # the mix cell's tasks (None: all of ``tasks``)
    reference_rank: int = 8  # the budget: LoRA's count at this rank on the same (all) linears
    baseline: bool = False  # a no-fine-tuning cell per model and task (the row every method must beat)
    seeds: dict[str, int] = field(default_factory=dict)  # method -> seeds of its single-task cells (default 1)
    seed_tasks: tuple[str, ...] | None = None  # the tasks that get those extra seeds (None: every single task)
    task_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> the only methods that run it


PROFILES: dict[str, Profile] = {
    # Pipeline check for CI (< 1 min): a few examples, MiniLM only, the methods whose configs say
    # ``in_smoke_grid`` (one matched, one that cannot be, one mixture), one task of each kind.
    "smoke": Profile("smoke", {"minilm": ModelSettings(8, 16, 32, 8, 1e-3)}, smoke=True, tasks=("arc_e", "boolq", "sst2"),
                     mix_tasks=("arc_e", "boolq"), baseline=True),
    # The rendered book, on MiniLM at LoRA r=8's budget, one epoch. Every method on SST-2 and STS-B, where
    # MiniLM learns from 500 examples. LoRA (five seeds there: how far a score moves with the seed alone; three
    # left STS-B's t-interval too wide to separate r ≈ 0.23 from the untrained model's r ≈ 0) and the untrained
    # model also on MRPC (2,000 examples, five seeds), and, one seed, on the
    # commonsense five in the reference's layout, where MiniLM stays near chance whatever it trains on (so
    # every other method there would compare noise; the full profile runs them all, with the mix cell).
    "book": Profile("book", {"minilm": ModelSettings(500, 400, 64, 16, 1e-3,
                                                     task_train_n={**dict.fromkeys(TASKS, 64), "mrpc": 2000},
                                                     task_eval_n=dict.fromkeys(TASKS, 100))},
                    tasks=("sst2", "stsb", "mrpc", *TASKS), multi_task=False, baseline=True, seeds={"lora": 5},
                    seed_tasks=("sst2", "stsb", "mrpc"), task_methods={t: ("lora",) for t in ("mrpc", *TASKS)}),
    # The reference table's setting (its per-run configs): r=80 on all linears, batch 16 as 4 × 4,
    # constant LR 1e-4, 2 epochs, cutoff 512, whole splits. Sized for one 80 GB GPU: fp32 weights (LLaMA-2-7B:
    # 27 GB) and bf16 autocast, whose activations at 4 × 512 tokens fit beside them. The weights come from the hub.
    "full": Profile("full", {name: ModelSettings(None, None, 512, 4, 1e-4, epochs=2, grad_accum=4,
                                                 schedule="constant", protocol="label_token", precision="bf16")
                             for name in REFERENCE_MODELS.values()},
                    reference_rank=80, baseline=True),
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

    @property
    def baseline(self) -> bool:
        return self.method == BASELINE

    def callbacks(self) -> list[Callback]:
        """What the cell's run records beside its result: an adapter's counts (a baseline trains nothing)."""
        return [] if self.baseline else [ModelFacts()]

    def inputs(self, callbacks: Sequence[Callback] | None = None) -> dict[str, Any]:
        """The cell's run inputs (:func:`lorafam_nb.experiment.run_inputs`), the plan as context."""
        return experiment.run_inputs(self.spec(), self.profile, self.callbacks() if callbacks is None else callbacks,
                                     context=dataclasses.asdict(self))

    def spec(self, device: str = "auto") -> RunSpec:
        s = self.settings
        # data_parallel=False: under a launch, each process trains its own cells (run_grid's fan-out).
        train = TrainConfig(lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                            schedule=s["schedule"], device=device, precision=s["precision"], progress=False,
                            log_every=5, data_parallel=False)
        finetune = "none" if self.baseline else AdapterConfig.from_dict(self.adapter)
        return RunSpec(model=self.model, task=self.tasks[0], mix=self.tasks if self.task == MIX else (),
                       finetune=finetune, train_n=ModelSettings(**s).train_n_for(self.tasks),
                       eval_n=ModelSettings(**s).eval_n_for(self.tasks),
                       max_length=s["max_length"],
                       protocol=s["protocol"], seed=self.seed, train=train, label=self.method)


def _resolve_profile(profile: Profile | str) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    return PROFILES[profile]


def _steps(tasks: Sequence[str], s: ModelSettings) -> int:
    """The trainer's optimizer steps for these tasks (its own formula, from the real split sizes)."""
    n = sum(len(load_task(t, "train", n=s.train_n_for(tasks))) for t in tasks)
    return max(1, math.ceil(s.epochs * math.ceil(n / (s.batch_size * s.grad_accum))))


def plan(profile: Profile | str, seed: int = 0) -> list[GridRun]:
    """Every cell of ``profile``, budgets matched; raises ``ValueError`` (saying what is allowed) on an
    unknown profile, method, task or model, or an unreachable budget, before anything trains."""
    profile = _resolve_profile(profile)
    registry = {m: cls for m, cls in import_methods().items() if cls.modality == "text"}  # vision: their chapters
    # The book's chapter order first (the registry's order depends on which module was imported first).
    known = [m for m in METHOD_PATHS if m in registry] + [m for m in registry if m not in METHOD_PATHS]
    chosen = profile.methods or tuple(m for m in known if vars(registry[m]).get("in_smoke_grid") or not profile.smoke)
    methods = tuple(m for m in chosen if m not in profile.skip)
    for method in (*methods, *profile.skip, *profile.seeds, *(m for ms in profile.task_methods.values() for m in ms)):
        if method not in registry:
            raise ValueError(f"unknown method {method!r}; registered: {', '.join(sorted(registry))}")
    mix = profile.mix_tasks or profile.tasks
    for task in (*profile.tasks, *mix, *profile.task_methods, *(profile.seed_tasks or ())):
        if task not in TASK_TITLES:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASK_TITLES)} (the commonsense suite "
                             f"and GLUE)")
    models = {_model_id(name): settings for name, settings in profile.models.items()}
    cells = [(task, (task,)) for task in profile.tasks] + ([(MIX, mix)] if profile.multi_task else [])
    runs = []
    for model, settings in models.items():
        shape = model_shape(model)
        if profile.baseline:  # the model as it is: one cell per task (on the mix it scores the same)
            runs += [GridRun(profile.name, model, BASELINE, task, tasks, {}, {}, dataclasses.asdict(settings),
                             shape.base_parameters, seed) for task, tasks in cells if task != MIX]
        target = reference_count(shape, profile.reference_rank)
        budgets = {m: match_budget(registry[m], method_sites(registry[m], shape), target) for m in methods}
        steps = {task: _steps(tasks, settings) for task, tasks in cells}
        for method in methods:
            cls = registry[method]
            for task, tasks in cells:
                if method not in profile.task_methods.get(task, (method,)):
                    continue
                config = cls.sized(budgets[method].values, shape.targets, steps[task], settings.lr)
                seeded = task != MIX and (profile.seed_tasks is None or task in profile.seed_tasks)
                for extra in range(profile.seeds.get(method, 1) if seeded else 1):
                    runs.append(GridRun(profile.name, model, method, task, tasks, config.to_dict(),
                                        dataclasses.asdict(budgets[method]),
                                        dataclasses.asdict(dataclasses.replace(settings, lr=settings.lr * cls.lr_scale)),
                                        shape.base_parameters, seed + extra))
    return runs


def execute(run: GridRun, device: str = "auto") -> dict[str, Any]:
    """Train one cell and return its record: the store's record of the run, plus the grid's fields."""
    callbacks = run.callbacks()
    inputs = run.inputs(callbacks)
    # build_model inside run() runs the method's own first stage, if it has one (LoRA-drop's probe).
    out = experiment.run(run.spec(device), callbacks=callbacks, profile=run.profile)
    cell = out.records.get(ModelFacts.record_name, {"adapter": 0, "head": 0, "adapter_trained": {}})
    return {
        **experiment.run_record(out, inputs),
        "config": dataclasses.asdict(run), "profile": run.profile, "seed": run.seed,
        "model": run.model, "method": run.method, "task": run.task,
        "data": {"train_n": out.row["train_n"], "eval_n": out.row["per_task_n"],
                 "eval_split": out.row["eval_split"], "protocol": out.row["protocol"]},
        "params": {"closed_form": run.budget.get("closed_form", 0), "real": cell["adapter"], "head": cell["head"],
                   "target": run.budget.get("target", 0), "base": run.base_parameters},
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


@dataclass(frozen=True)
class Score:
    """One table cell: a method's accuracy (STS-B: Pearson r) on a task, over its seeds, with a 95 % interval.
    One seed: the Wilson interval of the evaluation sample (r: Fisher's). Several seeds (the same evaluation examples): the union of the
    t-interval over seeds and the Wilson interval of their mean, so that neither the seed's nor the
    sample's uncertainty is hidden."""

    mean: float
    low: float
    high: float
    n: int  # evaluated examples
    seeds: int

    @classmethod
    def of(cls, values: Sequence[float], n: int, correlation: bool = False) -> Score:
        """``values``: accuracies (or Pearson r, ``correlation``: Fisher's interval instead of Wilson's)."""
        mean, t_low, t_high = mean_interval(values)
        s_low, s_high = (pearson_interval if correlation else wilson_interval)(mean, n)
        return cls(mean, min(t_low, s_low), max(t_high, s_high), n, len(values))

    def text(self) -> str:
        """In points: "77.0 ± 3.7" where the interval is symmetric to the shown precision, else
        "6.2 [1.1–28.3]" (a Wilson interval near 0 or 1, or on a few examples, is not)."""
        mean, low, high = 100 * self.mean, 100 * self.low, 100 * self.high
        if abs((high - mean) - (mean - low)) < 0.1:
            return f"{mean:.1f} ± {(high - low) / 2:.1f}"
        return f"{mean:.1f} [{low:.1f}–{high:.1f}]"

    def beyond(self, other: Score) -> bool:
        """Whether the two intervals do not overlap: a difference the text may name."""
        return self.low > other.high or other.low > self.high


def scores(results: Sequence[dict[str, Any]], multi: bool = False) -> dict[tuple[str, str, str], Score]:
    """(model, method, task) -> :class:`Score` over the records' seeds; ``multi``: the mix adapter's."""
    found: dict[tuple[str, str, str], list[float]] = {}
    sizes: dict[tuple[str, str, str], int] = {}
    for r in results:
        if (r["task"] == MIX) != multi:
            continue
        for task, acc in r["accuracy"].items():
            key = (r["model"], r["method"], task)
            found.setdefault(key, []).append(acc)
            sizes[key] = r["data"]["eval_n"][task]
    return {key: Score.of(accs, sizes[key], task_info(key[2]).kind == "regression") for key, accs in found.items()}


def average(cells: Sequence[Score]) -> Score:
    """The mean over tasks; its interval from the tasks' independent intervals (half-widths in quadrature)."""
    mean, half = independent_mean([c.mean for c in cells], [(c.high - c.low) / 2 for c in cells])
    return Score(mean, mean - half, mean + half, sum(c.n for c in cells), min(c.seeds for c in cells))


def _tasks_of(results: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> list[str]:
    """The tasks the records score, in ``order`` (a profile's), then in :data:`TASK_TITLES`' order."""
    present = {t for r in results for t in r["accuracy"]}
    return [t for t in dict.fromkeys((*order, *TASK_TITLES)) if t in present]


def comparison_table(results: Sequence[dict[str, Any]], multi: bool = False, order: Sequence[str] = ()) -> Table:
    """The reference table's layout from our records: one row per (model, method), accuracy in % with its
    95 % interval (:class:`Score`), the no-fine-tuning row first; a task only some methods ran stays blank in
    the others' rows, and AVG then covers the tasks every row has (its header names them).

    Single-task cells (``multi=False``) give each task's column from its own adapter; ``multi=True``
    reads every column from the one adapter trained on the mix. #Params is the real adapter count
    (head excluded; a range where a method's first stage chose different layers per task); ``seeds`` is
    how many seeds each cell averages. ``order``: the columns' order (default: the reference's, then GLUE).
    """
    cells = scores(results, multi)
    tasks = _tasks_of([r for r in results if (r["task"] == MIX) == multi], order)
    params: dict[tuple[str, str], list[int]] = {}
    base: dict[str, int] = {}
    for r in results:
        if (r["task"] == MIX) == multi:
            params.setdefault((r["model"], r["method"]), []).append(r["params"]["real"])
            base[r["model"]] = r["params"]["base"]
    # AVG over the columns every row has (a profile may run some tasks with a few methods only).
    common = [t for t in tasks if all((m, meth, t) in cells for m, meth in params)]
    avg = "AVG" if common == tasks else f"AVG ({', '.join(TASK_TITLES[t] for t in common)})"
    out = []
    for model, method in sorted(params, key=lambda k: (list(base).index(k[0]), k[1] != BASELINE)):
        row = [cells[model, method, t] for t in tasks if (model, method, t) in cells]
        out.append({"Base model": model, "PEFT method": method, "#Params": _params_cell(params[model, method]),
                    "%Params": f"{100 * max(params[model, method]) / base[model]:.3g}%",
                    "seeds": max(c.seeds for c in row),
                    **{TASK_TITLES[t]: cells[model, method, t].text() if (model, method, t) in cells else ""
                       for t in tasks},
                    avg: average([cells[model, method, t] for t in common]).text() if common else ""})
    return table(out)


def multitask_table(results: Sequence[dict[str, Any]]) -> Table:
    """Per (model, method): each task's change from the single-task adapters to the mix adapter (points),
    the averages, and whether the change of the average exceeds both intervals."""
    single, multi = scores(results), scores(results, multi=True)
    tasks = _tasks_of([r for r in results if r["task"] == MIX])
    pairs = list(dict.fromkeys((m, meth) for m, meth, _ in multi))
    out = []
    for model, method in pairs:
        if not all((model, method, t) in single for t in tasks):
            continue
        one = average([single[model, method, t] for t in tasks])
        mixed = average([multi[model, method, t] for t in tasks])
        out.append({"Base model": model, "PEFT method": method,
                    **{f"Δ {TASK_TITLES[t]}": round(100 * (multi[model, method, t].mean - single[model, method, t].mean), 1)
                       for t in tasks},
                    "AVG single": one.text(), "AVG multi": mixed.text(),
                    "Δ AVG": round(100 * (mixed.mean - one.mean), 1), "beyond intervals": mixed.beyond(one)})
    return table(out)


def _first_stage_changed(record: dict[str, Any]) -> bool:
    """Whether the adapter that trained differs from the planned one (beyond the head the run adds)."""
    planned, trained = dict(record["config"]["adapter"]), dict(record["adapter_trained"])
    planned.pop("modules_to_save"), trained.pop("modules_to_save")
    return planned != trained


def budget_table(results: Sequence[dict[str, Any]]) -> Table:
    """Per (model, method): the knob chosen, the target, the closed-form and the real adapter counts."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r["method"] == BASELINE:
            continue
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
    return table(list(out.values()))
