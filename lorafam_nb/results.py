"""The results store: every training run behind the book is a record, committed and reused.

**Format.** One pretty-printed JSON file per record, ``<key>.json``, in one flat folder (``results/`` at
the repository root, or ``$LORAFAM_RESULTS``). One file per record rather than one JSON Lines file
because records are written by several processes at once (the grid fans cells out under ``torchrun``) and
a file is replaced atomically on its own, with no lock and no merge; a person reads one run in one file,
and git diffs show which runs changed. :func:`load_records` reads a folder into a pandas DataFrame (one
row per record); :func:`read_records` gives the raw dicts.

**Key.** A record is named by :func:`key_of` over its *inputs*: for a run (:func:`lorafam_nb.experiment.run`)
its :class:`~lorafam_nb.experiment.RunSpec` less what does not change a number, the profile, what a
caller adds (``context``: how a model it built was made, a grid cell's plan), the callbacks it passed, and
the :func:`code_fingerprint`. A record whose key exists is read back instead of being computed; any
changed input gives another key, so the old record is simply not found (it stays until someone deletes it).

**What the code fingerprint covers.** The source of every ``lorafam_nb`` module the run can execute: the
static import closure (imports inside functions and under ``TYPE_CHECKING`` included) of
:mod:`lorafam_nb.experiment` and of the modules that define what the run was given (the adapter config's
class, the callbacks' classes and the functions they hold); the shipped data's manifest (its sha256 sums);
and the versions of torch, transformers, tokenizers and the package that ships the model's weights (a hub
model is named by its id alone: its revision is not pinned). Code defined outside the package (a
chapter's callback, a function it calls, a test's config) is fingerprinted by what it does (bytecode,
constants and names, independent of the file and line it sits at) and by what it refers to: other such
functions and classes, package modules (then in the closure), constants, captured values, tensors by their
values. A referenced library object (a model) counts by its type only: pass its state as a setting.

A hash over the whole package would be simpler and safe, but every edit to any method would invalidate
every chapter's records; the closure changes only the records that can depend on the edit. Not followed:
parent packages' ``__init__`` files (they re-export), the method registry (:mod:`lorafam_nb.registry`: the
list of method modules, imported by name; a method module, when imported, only registers its own config, and
the config class a run uses is fingerprinted directly, so a new method leaves every other record valid), and
this module (it computes no number; a change to the key scheme changes the keys anyway).

**What the key leaves out**, on purpose: the run's label (its name in tables, refreshed on reuse), the
progress bar, checkpoint folders and intervals, the device and the data-parallel split. The device and
the number of processes are hardware: records computed on a GPU are meant to be reused on a CPU machine,
and N processes take the same steps as one (tests/test_distributed.py). They are kept in the record's
provenance, as are the machine, the commit, the date and the wall time. ``precision`` is in the key: bf16
is another computation on any hardware.

``$LORAFAM_FRESH=1`` (``make book FRESH=1``) makes a store ignore what it holds: everything is recomputed
and overwritten.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

__all__ = ["Store", "code_fingerprint", "code_identity", "default_dir", "git_commit", "is_code", "json_value", "key_of",
           "load_records", "measured", "provenance", "read_records", "remember_loaded", "write_json"]

PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DATA_MANIFEST = PACKAGE_DIR / "_data" / "MANIFEST.json"
VERSIONED = ("torch", "transformers", "tokenizers")  # libraries whose version is part of every key
NOT_FOLLOWED = (__name__, f"{PACKAGE}.registry")  # computes no number (see the module's docstring)


def default_dir() -> Path:
    """``$LORAFAM_RESULTS``, else ``results/`` at the repository root (committed)."""
    return Path(os.environ.get("LORAFAM_RESULTS") or REPO_DIR / "results")


def _fresh_requested() -> bool:
    return os.environ.get("LORAFAM_FRESH", "") not in ("", "0")


# --- JSON ---------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """``value`` as JSON types: dataclasses as dicts, tuples as lists, sets sorted, numpy/torch scalars and
    arrays as numbers and lists, paths as strings; anything else is a TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return _plain(value.tolist())
    raise TypeError(f"{type(value).__name__} is not JSON-able: {value!r:.80}")


def json_value(value: Any) -> Any:
    """``value`` exactly as a record gives it back after a JSON round trip (tuples become lists, dict keys
    strings), so that a freshly computed run and a reused one hand their caller the same objects."""
    return json.loads(json.dumps(_plain(value)))


def key_of(inputs: dict[str, Any]) -> str:
    """The record name of ``inputs``: 16 hex digits of the sha256 of their canonical JSON."""
    blob = json.dumps(_plain(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, flushed, then renamed over ``path``. An
    interrupted write leaves the previous file (or none) and no half-written record; the temporary file
    (``*.tmp``, never read as a record) is removed when the write fails in this process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_plain(data), indent=1) + "\n"  # serialise first: a bad value never touches the folder
    fd, name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the record private to its writer
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- code fingerprint ---------------------------------------------------------------------------------

def _module_file(module: str) -> Path | None:
    """The source file of a ``lorafam_nb`` module (None: not a module of the package)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _imports(module: str, source: str) -> frozenset[str]:
    """Package modules that ``source`` (the text of ``module``) imports, anywhere in the file."""
    is_package = _module_file(module).name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if node.module:  # `from . import x` runs the package's __init__ (re-exports only): not followed
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import trainer`
    return frozenset(m for m in found if m != PACKAGE and m not in NOT_FOLLOWED and _module_file(m) is not None)


@functools.lru_cache(maxsize=None)
def _source(path: Path) -> str:
    """A module's source as this process first read it. A file edited while the process runs keeps the
    digest of what the process loaded, so records computed by the old code are not filed under the new
    code's key (the process must restart to run, and record, the edit)."""
    return path.read_text()


def remember_loaded() -> None:
    """Read the source of every package module this process has imported so far: the code it runs. Called
    when this module and :mod:`lorafam_nb.experiment` load; a module imported later is read at first use."""
    for module in [m for m in sys.modules if m.partition(".")[0] == PACKAGE]:
        if _module_file(module) is not None:
            _source(_module_file(module))


def _closure(seeds: Iterable[str]) -> dict[str, str]:
    """Every package module reachable from ``seeds`` by static imports -> sha256 of its source."""
    digests: dict[str, str] = {}
    todo = [m for m in seeds if _module_file(m) is not None and m not in NOT_FOLLOWED]
    while todo:
        module = todo.pop()
        if module in digests:
            continue
        source = _source(_module_file(module))
        digests[module] = hashlib.sha256(source.encode()).hexdigest()[:16]
        todo.extend(_imports(module, source))
    return dict(sorted(digests.items()))


def _code_digest(code: types.CodeType) -> str:
    """A function's code by what it does (bytecode, constants, names), not where it is written."""
    consts = [_code_digest(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    blob = repr((code.co_code.hex(), consts, code.co_names, code.co_varnames, code.co_freevars))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a function's code and its nested functions use."""
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def _library(module: str) -> bool:
    """Whether ``module`` is installed code (the standard library or site-packages): versioned, not hashed.
    ``__main__`` (a notebook's cells, a script) never is, whatever file launched it."""
    if module == "__main__":
        return False
    if module.partition(".")[0] in sys.builtin_module_names or module.partition(".")[0] in sys.stdlib_module_names:
        return True
    file = getattr(sys.modules.get(module), "__file__", None) or ""
    return any(part in ("site-packages", "dist-packages") for part in Path(file).parts)


class _Identity:
    """Walks what a run's callbacks and config refer to: package modules (seeds of the import closure),
    code from elsewhere (a chapter's or a test's classes and functions, hashed with everything they refer
    to: helpers, constants, captured values), and library code (left to the versions)."""

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.foreign: dict[str, str] = {}  # "module.qualname digest" -> digest
        self.seen: dict[int, str] = {}  # id -> how it entered (a cycle meets its name)

    def of(self, value: Any) -> str:
        """How ``value``, referenced by code, enters the key."""
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if isinstance(value, types.MethodType):
            value = value.__func__
        if isinstance(value, functools.partial):
            return f"partial({self.of(value.func)}, {self.of(value.args)}, {self.of(value.keywords)})"
        if isinstance(value, types.ModuleType):
            if value.__name__.partition(".")[0] == PACKAGE:
                self.modules.add(value.__name__)
            return f"module {value.__name__}"
        if isinstance(value, (type, types.FunctionType)):
            module, name = value.__module__ or "", f"{value.__module__}.{value.__qualname__}"
            if module.partition(".")[0] == PACKAGE:
                self.modules.add(module)
                if isinstance(value, type):  # its bases may live in other package modules
                    self.modules.update(k.__module__ for k in value.__mro__ if k.__module__.partition(".")[0] == PACKAGE)
                return name
            if _library(module):
                return name
            if id(value) not in self.seen:
                self.seen[id(value)] = name  # what a reference back to it, while it is being hashed, gives
                digest = self._class(value) if isinstance(value, type) else self._function(value)
                self.foreign[f"{name} {digest}"] = digest
                self.seen[id(value)] = f"{name} {digest}"
            return self.seen[id(value)]
        if isinstance(value, torch.Tensor):  # by its values
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return f"tensor {tuple(value.shape)} {value.dtype} {hashlib.sha256(data).hexdigest()[:16]}"
        if isinstance(value, (list, tuple)) and len(value) <= 64:
            return repr([self.of(v) for v in value])
        if isinstance(value, (set, frozenset)) and len(value) <= 64:
            return repr(sorted(self.of(v) for v in value))
        try:
            return json.dumps(_plain(value), sort_keys=True)
        except (TypeError, ValueError):
            return type(value).__qualname__  # a library object (a model, say): not keyed by its state

    def _function(self, func: types.FunctionType) -> str:
        refs = {name: self.of(func.__globals__[name])
                for name in sorted(_names(func.__code__)) if name in func.__globals__}
        captured = [self.of(cell.cell_contents) for cell in func.__closure__ or () if cell.cell_contents is not None]
        defaults = self.of(func.__defaults__ or ())
        blob = repr((_code_digest(func.__code__), refs, captured, defaults))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _class(self, cls: type) -> str:
        parts = {"bases": [self.of(base) for base in cls.__bases__ if base is not object]}
        for name, value in sorted(vars(cls).items()):
            if not name.startswith("__") or isinstance(value, types.FunctionType):
                parts[name] = self.of(value)
        return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]


def is_code(value: Any) -> bool:
    """Whether a callback's attribute is code (hashed by :func:`code_identity`) rather than a setting."""
    return isinstance(value, (type, types.FunctionType, types.MethodType, functools.partial))


def code_identity(objects: Iterable[Any]) -> tuple[set[str], dict[str, str]]:
    """For what a run uses (its config's class, its callbacks' classes and the functions they hold): the
    package modules they come from (seeds of the import closure), and a digest of every class and function
    from elsewhere, with everything it refers to (see :class:`_Identity`)."""
    identity = _Identity()
    for obj in objects:
        identity.of(obj)
    return identity.modules, identity.foreign


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def code_fingerprint(modules: Iterable[str], foreign: dict[str, str] | None = None,
                     distributions: Sequence[str] = ()) -> dict[str, Any]:
    """What computes a number: the import closure of ``modules`` (each module's source digest), the
    ``foreign`` classes' digests, the shipped data's manifest, and library versions (:data:`VERSIONED` and
    ``distributions``, e.g. the package that ships the model). ``digest`` hashes all of it."""
    out = {"modules": _closure(modules), "foreign": dict(sorted((foreign or {}).items())),
           "data": hashlib.sha256(DATA_MANIFEST.read_bytes()).hexdigest()[:16],
           "versions": {name: _version(name) for name in sorted({*VERSIONED, *distributions})}}
    return {"digest": key_of(out), **out}


# --- provenance ---------------------------------------------------------------------------------------

def git_commit() -> str | None:
    """The repository's commit (with ``+dirty`` when tracked files differ from it); None outside git."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(profile: str | None, wall_s: float, device: str, processes: int = 1) -> dict[str, Any]:
    """Where, when and with what a record was computed."""
    return {
        "profile": profile, "commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "node": platform.node(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "processes": processes},
        "python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall_s,
    }


# --- the store ----------------------------------------------------------------------------------------

def _paths(directory: Path, keys: Sequence[str] | None) -> list[Path]:
    if keys is None:
        return sorted(directory.glob("*.json"))
    return [p for p in (directory / f"{k}.json" for k in keys) if p.exists()]


def read_records(directory: str | Path | None = None, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The records in ``directory`` (default :func:`default_dir`): those of ``keys`` in their order (missing
    ones skipped), or all, by name."""
    return [json.loads(p.read_text()) for p in _paths(Path(directory or default_dir()), keys)]


RUN_FIELDS = ("key", "inputs", "row", "history", "evals", "callbacks", "provenance")  # what run_record writes


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """One table row of a record: its result row's fields at the top (the same columns for every run), the
    fields a writer added under other names (the grid's ``method``, ``params``, …), the rest nested (pandas
    flattens them to ``spec.train.lr``, ``provenance.machine.cpus``, …); the logs (history, evaluations)
    stay out."""
    inputs, row = record.get("inputs", {}), record.get("row", {})
    return {"key": record["key"], "profile": inputs.get("profile"),
            **{k: v for k, v in record.items() if k not in RUN_FIELDS and k not in row}, **row,
            "spec": inputs.get("spec", {}), "provenance": record.get("provenance", {}),
            "code": inputs.get("code", {}).get("digest")}


def load_records(directory: str | Path | None = None, keys: Sequence[str] | None = None) -> Any:
    """The records as a pandas DataFrame: one row per record, nested fields as dotted columns."""
    import pandas as pd

    return pd.json_normalize([_flat(r) for r in read_records(directory, keys)])


@dataclass
class Store:
    """A folder of records. ``fresh``: ignore existing records (recompute and overwrite them); default
    from ``$LORAFAM_FRESH``."""

    directory: Path = field(default_factory=default_dir)
    fresh: bool = field(default_factory=_fresh_requested)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def has(self, key: str) -> bool:
        """Whether a record of ``key`` would be reused."""
        return not self.fresh and self.path(key).exists()

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None (none stored, or a fresh store)."""
        return json.loads(self.path(key).read_text()) if self.has(key) else None

    def put(self, record: dict[str, Any]) -> Path:
        """Write ``record`` (it names its ``key``) atomically; returns its file."""
        path = self.path(record["key"])
        write_json(path, record)
        return path

    def records(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return read_records(self.directory, keys)

    def frame(self, keys: Sequence[str] | None = None) -> Any:
        return load_records(self.directory, keys)


def measured(store: Store, name: str, settings: dict[str, Any], code: Sequence[Any], compute: Callable[[], Any],
             profile: str, device: str) -> Any:
    """A measurement that is not a training run (a benchmark's step times and memory), recorded and reused like
    one. Its key covers ``name``, the ``settings``, the ``profile`` and the fingerprint of the code it runs
    (the package modules and the functions in ``code``, with what they refer to). ``compute()`` runs only when
    no record exists and returns JSON-able data; the caller gets that data back after its JSON round trip,
    fresh or reused alike. Timings are the machine's that recorded them (its provenance says which)."""
    modules, foreign = code_identity(code)
    inputs = {"measurement": name, "settings": json_value(settings), "profile": profile,
              "code": code_fingerprint(modules, foreign)}
    key = key_of(inputs)
    record = store.get(key)
    if record is None:
        started = time.perf_counter()
        value = json_value(compute())
        record = {"key": key, "inputs": inputs, "value": value,
                  "provenance": provenance(profile, time.perf_counter() - started, device)}
        store.put(record)
    return record["value"]


remember_loaded()
