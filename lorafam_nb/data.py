"""Datasets for the book: five commonsense multiple-choice tasks and five GLUE tasks.

Everything is read from ``lorafam_nb/_data``: byte-for-byte copies of the upstream
files, xz-compressed, listed with their sha256, source and licence in
``_data/MANIFEST.json``. Nothing is downloaded, so results do not depend on a hub
revision and the book builds offline. The maintainers' tool ``tests/vendor_data.py`` refreshes
that directory from the upstream files. Tasks of other kinds (the vision tasks) are registered by their own
modules (:func:`register_task`), which load their rows themselves.
"""

from __future__ import annotations

import csv
import functools
import json
import lzma
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .registry import import_extensions

__all__ = [
    "BOOK_TASKS",
    "COMMONSENSE_TASKS",
    "GLUE_CHOICE_TASKS",
    "GLUE_TASKS",
    "DataFormatError",
    "TaskInfo",
    "load_task",
    "task_info",
    "DATA_DIR",
    "TASK_NAMES",
    "parse_files",
    "register_task",
    "split_files",
    "task_code",
]

COMMONSENSE_TASKS: tuple[str, ...] = ("arc_e", "arc_c", "boolq", "obqa", "piqa")
GLUE_TASKS: tuple[str, ...] = ("sst2", "cola", "rte", "mrpc", "stsb")
# The same BoolQ question-answer pairs with and without their passage (open-book and closed-book), from the
# one BoolQ file that has passages (dev), split 2:1 into train and test: every third item is a test item.
BOOK_TASKS: tuple[str, ...] = ("boolq_open", "boolq_closed")
# GLUE viewed as multiple choice over its label names ("sst2_mc", ...), so that one multiple-choice head or
# prompt serves the commonsense and GLUE tasks together (the book's multi-task setting, see multitask.py).
# STS-B becomes six choices "0".."5", its score rounded half up.
GLUE_CHOICE_TASKS: tuple[str, ...] = tuple(f"{t}_mc" for t in GLUE_TASKS)

DATA_DIR = Path(__file__).parent / "_data"  # the shipped files (see _data/MANIFEST.json)

_Row = dict[str, Any]


@dataclass(frozen=True)
class TaskInfo:
    """Static description of a task.

    Commonsense tasks always have a ``"train"`` and a ``"test"`` split, where
    ``"test"`` is the split the reference comparison table (LLM-Adapters / DoRA)
    reports on: ARC and OpenBookQA test, BoolQ dev (LLM-Adapters ``test.json``) and
    PIQA validation (PIQA's own test split has no public labels). ARC and
    OpenBookQA also have their upstream ``"validation"`` split. GLUE tasks have
    ``"train"`` and ``"validation"`` (GLUE ``dev.tsv``; GLUE test labels are hidden).
    """

    name: str  # canonical name, e.g. "arc_e"
    title: str  # human-readable name, e.g. "ARC-Easy"
    kind: str  # "multiple_choice" | "classification" | "regression"
    num_labels: int  # classification: #classes; multiple choice: max #choices; regression: 1
    text_fields: tuple[str, ...]  # input columns, in the order a model should see them
    splits: tuple[str, ...]  # available splits
    eval_split: str  # the split results are reported on
    label_names: tuple[str, ...]  # GLUE class names by label id; () for MC/regression
    # The metric results report (higher is better); "" means accuracy, or Pearson r for regression.
    metric: str = ""
    # The protocol the task needs whatever the model ("" for text tasks: the model's architecture decides).
    protocol: str = ""

    def __post_init__(self) -> None:
        if not self.metric:
            object.__setattr__(self, "metric", "pearson" if self.kind == "regression" else "accuracy")


class DataFormatError(ValueError):
    """A malformed record in a data file; the message names the file and the 1-based line."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        # Passing all three to ValueError keeps the exception picklable (datasets/multiprocessing).
        super().__init__(path, line, reason)
        self.path = path
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}, line {self.line}: {self.reason}"


class _RowError(Exception):
    """A problem inside one record; the file-level reader adds the file and line."""


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    """Decode a plain or ``.xz`` file; parsers accept both so tests can feed temp files."""
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    try:
        # utf-8-sig: GLUE's MRPC files start with a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, raw.count(b"\n", 0, err.start) + 1, "not valid UTF-8") from err


def _lines(text: str) -> list[str]:
    # Split on "\n" only: str.splitlines would also break on characters such as
    # U+2028 inside a sentence and shift every later line number.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline terminates the last line, it does not start a new one
    return lines


def _get(obj: Any, key: str, typ: type) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _RowError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, typ):
        raise _RowError(f"field {key!r} should be {typ.__name__}, got {type(value).__name__}")
    return value


def _str_list(obj: Any, key: str) -> list[str]:
    value = _get(obj, key, list)
    if not all(isinstance(v, str) for v in value):
        raise _RowError(f"field {key!r} should be a list of strings")
    return value


def _mc_row(question: str, texts: list[str], keys: list[str], answer: str) -> _Row:
    """Common multiple-choice schema; the gold answer is located by its key, not its position."""
    if len(texts) != len(keys):
        raise _RowError(f"{len(texts)} choice texts but {len(keys)} choice labels")
    if len(texts) < 2:
        raise _RowError("a multiple-choice item needs at least two choices")
    if answer not in keys:
        raise _RowError(f"answer {answer!r} is not one of the choice labels {keys}")
    return {"question": question, "choices": texts, "label": keys.index(answer)}


def _read_jsonl(path: Path, make_row: Callable[[Any], _Row]) -> list[_Row]:
    rows = []
    for lineno, line in enumerate(_lines(_read_text(path)), start=1):
        try:
            rows.append(make_row(json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, lineno, f"invalid JSON ({err.msg})") from err
        except _RowError as err:
            raise DataFormatError(path, lineno, str(err)) from err
    return rows


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _read_json_array(path: Path, make_row: Callable[[Any], _Row]) -> list[_Row]:
    """Parse a JSON array element by element so errors can point at the element's line."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    lineno, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal lineno, counted_to  # count newlines incrementally: O(file), not O(rows * file)
        lineno += text.count("\n", counted_to, pos)
        counted_to = pos
        return lineno

    pos = _JSON_WS.match(text).end()
    if text[pos : pos + 1] != "[":
        raise DataFormatError(path, line_at(pos), "expected a JSON array")
    pos = _JSON_WS.match(text, pos + 1).end()
    rows: list[_Row] = []
    closed = text[pos : pos + 1] == "]"
    while not closed:
        start = line_at(pos)
        try:
            obj, pos = decoder.raw_decode(text, pos)
            rows.append(make_row(obj))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg})") from err
        except _RowError as err:
            raise DataFormatError(path, start, str(err)) from err
        pos = _JSON_WS.match(text, pos).end()
        sep = text[pos : pos + 1]
        if sep not in (",", "]"):
            raise DataFormatError(path, line_at(pos), "expected ',' or ']' after an array element")
        closed = sep == "]"
        pos = _JSON_WS.match(text, pos + 1).end()
    if text[pos:].strip():
        raise DataFormatError(path, line_at(pos), "unexpected data after the JSON array")
    return rows


# ----------------------------------------------------------------- commonsense parsers


def _arc_row(obj: Any) -> _Row:
    # HF ai2_arc layout. answerKey is a letter for most items but a digit ("1".."4")
    # for a few percent of them, always matching that row's own choices.label list.
    choices = _get(obj, "choices", dict)
    return _mc_row(
        _get(obj, "question", str),
        _str_list(choices, "text"),
        _str_list(choices, "label"),
        _get(obj, "answerKey", str),
    )


def _obqa_row(obj: Any) -> _Row:
    question = _get(obj, "question", dict)
    choices = _get(question, "choices", list)
    return _mc_row(
        _get(question, "stem", str),
        [_get(c, "text", str) for c in choices],
        [_get(c, "label", str) for c in choices],
        _get(obj, "answerKey", str),
    )


def _piqa_row(obj: Any) -> _Row:
    return {"question": _get(obj, "goal", str), "choices": [_get(obj, "sol1", str), _get(obj, "sol2", str)]}


# BoolQ comes in LLM-Adapters' question-only format for both train and eval: the
# original train file with passages was not obtainable, and the reference table
# evaluates on exactly these prompts. We keep only the bare question (including the
# "?" LLM-Adapters appended) so that every commonsense task shares one schema and
# the prompt wording is chosen by the caller, not baked into the data.
_BOOLQ_INSTRUCTION = re.compile(
    r"Please answer the following question with true or false, question: (?P<question>.+)"
    r"\n\nAnswer format: true/false",
    re.DOTALL,
)
_BOOLQ_CHOICES = ["true", "false"]


def _boolq_row(obj: Any) -> _Row:
    match = _BOOLQ_INSTRUCTION.fullmatch(_get(obj, "instruction", str))
    if match is None:
        raise _RowError("instruction does not follow the LLM-Adapters BoolQ template")
    return _mc_row(match["question"], list(_BOOLQ_CHOICES), _BOOLQ_CHOICES, _get(obj, "answer", str))


def _boolq_passage_row(obj: Any, open_book: bool) -> _Row:
    """An original BoolQ item: the question (with a "?", as in LLM-Adapters' copy), after its passage when
    ``open_book``."""
    question = _get(obj, "question", str) + "?"
    if open_book:
        question = f"{_get(obj, 'passage', str)}\n{question}"
    answer = "true" if _get(obj, "answer", bool) else "false"
    return _mc_row(question, list(_BOOLQ_CHOICES), _BOOLQ_CHOICES, answer)


def _parse_boolq_passages(path: Path, open_book: bool) -> list[_Row]:
    return _read_jsonl(path, functools.partial(_boolq_passage_row, open_book=open_book))


def _every_third_is_test(rows: list[_Row], split: str) -> list[_Row]:
    return [row for i, row in enumerate(rows) if (i % 3 == 2) == (split == "test")]


def _parse_arc(path: Path) -> list[_Row]:
    return _read_jsonl(path, _arc_row)


def _parse_obqa(path: Path) -> list[_Row]:
    return _read_jsonl(path, _obqa_row)


def _parse_boolq(path: Path) -> list[_Row]:
    return _read_json_array(path, _boolq_row)


def _parse_piqa(jsonl: Path, labels: Path) -> list[_Row]:
    """PIQA keeps labels in a separate file aligned line by line with the questions."""
    rows = _read_jsonl(jsonl, _piqa_row)
    label_lines = _lines(_read_text(labels))
    if len(label_lines) != len(rows):
        raise DataFormatError(
            labels,
            min(len(label_lines), len(rows)) + 1,  # first line without a partner
            f"{len(label_lines)} labels for {len(rows)} rows of {jsonl}; the files must align",
        )
    for lineno, (row, value) in enumerate(zip(rows, label_lines), start=1):
        if value not in ("0", "1"):
            raise DataFormatError(labels, lineno, f"label must be 0 or 1, got {value!r}")
        row["label"] = int(value)
    return rows


# ------------------------------------------------------------------------ GLUE parser


@dataclass(frozen=True)
class _Tsv:
    """Upstream GLUE TSV layout of one task."""

    header: tuple[str, ...] | None  # expected first line; None for CoLA, which has none
    num_columns: int
    text_columns: tuple[int, ...]  # column of each TaskInfo.text_fields entry
    label_column: int
    label_by_name: bool  # RTE spells labels out; the other tasks use digits


_TSV: dict[str, _Tsv] = {
    "cola": _Tsv(None, 4, (3,), 1, False),
    "sst2": _Tsv(("sentence", "label"), 2, (0,), 1, False),
    "mrpc": _Tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, (3, 4), 0, False),
    "rte": _Tsv(("index", "sentence1", "sentence2", "label"), 4, (1, 2), 3, True),
    "stsb": _Tsv(
        ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"),
        10,
        (7, 8),
        9,
        False,
    ),
}


def _glue_label(info: TaskInfo, fmt: _Tsv, value: str) -> int | float:
    if info.kind == "regression":
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:  # also rejects NaN
            raise _RowError(f"similarity score must be a number in [0, 5], got {value!r}")
        return score
    allowed = list(info.label_names) if fmt.label_by_name else [str(i) for i in range(info.num_labels)]
    if value not in allowed:
        raise _RowError(f"label must be one of {allowed}, got {value!r}")
    return allowed.index(value)


def _parse_glue(path: Path, task: str) -> list[_Row]:
    """Parse a GLUE train/dev TSV of ``task`` (canonical name) in its exact upstream layout."""
    info, fmt = _TASKS[task].info, _TSV[task]
    # QUOTE_NONE: SST-2 and RTE contain bare quote characters that are part of the text.
    reader = csv.reader(_lines(_read_text(path)), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = []
    for fields in reader:
        lineno = reader.line_num
        if lineno == 1 and fmt.header is not None:
            if tuple(fields) != fmt.header:
                raise DataFormatError(path, 1, f"expected header {fmt.header}, got {tuple(fields)}")
            continue
        if len(fields) != fmt.num_columns:
            raise DataFormatError(path, lineno, f"expected {fmt.num_columns} columns, got {len(fields)}")
        try:
            label = _glue_label(info, fmt, fields[fmt.label_column])
        except _RowError as err:
            raise DataFormatError(path, lineno, str(err)) from err
        row: _Row = {name: fields[col] for name, col in zip(info.text_fields, fmt.text_columns)}
        row["label"] = label
        rows.append(row)
    return rows


# ----------------------------------------------------------------------- task table


@dataclass(frozen=True)
class _Task:
    info: TaskInfo
    files: Mapping[str, tuple[str, ...]]  # split -> data files under _data (without ".xz")
    parse: Callable[..., list[_Row]]  # called with the split's files, in that order
    # For splits cut out of one file: (all parsed rows, split) -> that split's rows.
    part: Callable[[list[_Row], str], list[_Row]] | None = None


def _mc_info(name: str, title: str, num_labels: int, splits: tuple[str, ...]) -> TaskInfo:
    return TaskInfo(name, title, "multiple_choice", num_labels, ("question",), splits, "test", ())


def _glue_info(name: str, title: str, text_fields: tuple[str, ...], label_names: tuple[str, ...]) -> TaskInfo:
    kind, num_labels = ("classification", len(label_names)) if label_names else ("regression", 1)
    return TaskInfo(name, title, kind, num_labels, text_fields, ("train", "validation"), "validation", label_names)


def _arc_files(folder: str) -> dict[str, tuple[str, ...]]:
    return {split: (f"commonsense/{folder}/{split}.jsonl",) for split in ("train", "validation", "test")}


def _glue_files(folder: str) -> dict[str, tuple[str, ...]]:
    return {"train": (f"glue/{folder}/train.tsv",), "validation": (f"glue/{folder}/dev.tsv",)}


_TRAIN_VAL_TEST = ("train", "validation", "test")
_TRAIN_TEST = ("train", "test")

_TASKS: dict[str, _Task] = {
    # ARC has up to 5 answer options (a handful of items; most have 4, a few 3).
    "arc_e": _Task(_mc_info("arc_e", "ARC-Easy", 5, _TRAIN_VAL_TEST), _arc_files("arc_easy"), _parse_arc),
    "arc_c": _Task(_mc_info("arc_c", "ARC-Challenge", 5, _TRAIN_VAL_TEST), _arc_files("arc_challenge"), _parse_arc),
    "boolq": _Task(
        _mc_info("boolq", "BoolQ", 2, _TRAIN_TEST),
        {split: (f"commonsense/llm_adapters/boolq/{split}.json",) for split in _TRAIN_TEST},
        _parse_boolq,
    ),
    "obqa": _Task(
        _mc_info("obqa", "OpenBookQA", 4, _TRAIN_VAL_TEST),
        {split: (f"commonsense/openbookqa/{split}.jsonl",) for split in _TRAIN_VAL_TEST},
        _parse_obqa,
    ),
    "piqa": _Task(
        _mc_info("piqa", "PIQA", 2, _TRAIN_TEST),
        {
            "train": ("commonsense/piqa/train.jsonl", "commonsense/piqa/train-labels.lst"),
            # PIQA's test labels are hidden, so the reference table evaluates on validation.
            "test": ("commonsense/piqa/validation.jsonl", "commonsense/piqa/validation-labels.lst"),
        },
        _parse_piqa,
    ),
    **{
        name: _Task(
            _mc_info(name, title, 2, _TRAIN_TEST),
            dict.fromkeys(_TRAIN_TEST, ("commonsense/boolq/validation.jsonl",)),
            functools.partial(_parse_boolq_passages, open_book=name == "boolq_open"),
            _every_third_is_test,
        )
        for name, title in (("boolq_open", "BoolQ open-book"), ("boolq_closed", "BoolQ closed-book"))
    },
    "sst2": _Task(
        _glue_info("sst2", "SST-2", ("sentence",), ("negative", "positive")),
        _glue_files("SST-2"),
        functools.partial(_parse_glue, task="sst2"),
    ),
    "cola": _Task(
        _glue_info("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable")),
        _glue_files("CoLA"),
        functools.partial(_parse_glue, task="cola"),
    ),
    "rte": _Task(
        # Same label ids as Hugging Face's glue/rte, so results are comparable.
        _glue_info("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        _glue_files("RTE"),
        functools.partial(_parse_glue, task="rte"),
    ),
    "mrpc": _Task(
        _glue_info("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
        _glue_files("MRPC"),
        functools.partial(_parse_glue, task="mrpc"),
    ),
    "stsb": _Task(
        _glue_info("stsb", "STS-B", ("sentence1", "sentence2"), ()),
        _glue_files("STS-B"),
        functools.partial(_parse_glue, task="stsb"),
    ),
}


# The question each GLUE item becomes in its multiple-choice view, and the choices (label names spelled out).
_GLUE_QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("What is the sentiment of this sentence? {sentence}", ("negative", "positive")),
    "cola": ("Is this sentence grammatically acceptable? {sentence}", ("unacceptable", "acceptable")),
    "mrpc": ("Do these two sentences mean the same? 1: {sentence1} 2: {sentence2}", ("not equivalent", "equivalent")),
    "rte": ("Does sentence 1 entail sentence 2? 1: {sentence1} 2: {sentence2}", ("entailment", "not entailment")),
    "stsb": ("How similar are these two sentences, from 0 to 5? 1: {sentence1} 2: {sentence2}",
             tuple(str(i) for i in range(6))),
}


def _parse_glue_choices(path: Path, task: str) -> list[_Row]:
    """GLUE rows of ``task`` as multiple-choice rows: the question template filled in, the label names as
    choices; STS-B's score rounded half up to one of "0".."5"."""
    template, choices = _GLUE_QUESTIONS[task]
    regression = _TASKS[task].info.kind == "regression"
    return [{"question": template.format(**row), "choices": list(choices),
             "label": int(np.floor(row["label"] + 0.5)) if regression else row["label"]}
            for row in _parse_glue(path, task)]


for _name in GLUE_TASKS:
    _glue = _TASKS[_name]
    _TASKS[f"{_name}_mc"] = _Task(
        TaskInfo(f"{_name}_mc", f"{_glue.info.title} (choice)", "multiple_choice", len(_GLUE_QUESTIONS[_name][1]),
                 ("question",), _glue.info.splits, _glue.info.eval_split, ()),
        _glue.files, functools.partial(_parse_glue_choices, task=_name))


def _normalise(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


# Canonical names and titles, compared without case or separators, cover the usual
# spellings: "ARC-Easy", "arc-e", "OpenBookQA", "sst-2", "STS_B", ...
_ALIASES: dict[str, str] = {
    _normalise(alias): name for name, task in _TASKS.items() for alias in (name, task.info.title)
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)  # every task load_task knows, by canonical name


def register_task(info: TaskInfo, load: Callable[[str, int | None, int], Any]) -> None:
    """Add a task from outside the text core (:data:`lorafam_nb.registry.EXTENSION_MODULES`): ``load(split, n,
    seed)`` gives its rows (what its protocol's ``encode`` reads), drawn as :func:`load_task` draws them."""
    _TASKS[info.name] = _Task(info, {}, load)
    _ALIASES.update({_normalise(info.name): info.name, _normalise(info.title): info.name})


def _resolve(task: str) -> _Task:
    name = _ALIASES.get(_normalise(task)) if isinstance(task, str) else None
    if name is None and isinstance(task, str):
        import_extensions()
        name = _ALIASES.get(_normalise(task))
    if name is None:
        raise ValueError(
            f"unknown task {task!r}; expected one of {', '.join(_TASKS)} "
            "(case-insensitive, '-'/'_' optional; titles such as 'ARC-Easy' also work)"
        )
    return _TASKS[name]


def task_info(task: str) -> TaskInfo:
    """Describe ``task`` (canonical name or alias, e.g. ``"ARC-Easy"``, ``"sst-2"``)."""
    return _resolve(task).info


def task_code(task: str) -> list[Callable[..., Any]]:
    """What reading ``task`` runs beyond the text core: a registered task's loader (the results store
    fingerprints the module it comes from); nothing for the shipped text tasks."""
    found = _resolve(task)
    return [] if found.files else [found.parse]


def split_files(task: str) -> dict[str, tuple[str, ...]]:
    """Each split of ``task`` -> the data files it is parsed from (paths under :data:`DATA_DIR`, less ``.xz``)."""
    return dict(_resolve(task).files)


def parse_files(task: str, paths: Sequence[Path]) -> list[_Row]:
    """Parse one split of ``task`` from ``paths`` (its :func:`split_files`, plain or ``.xz``), before any split
    is cut out of a shared file: the rows a file holds. The vendoring tool checks upstream files with it."""
    return _resolve(task).parse(*paths)


@functools.lru_cache(maxsize=None)
def _rows(task: str, split: str) -> tuple[_Row, ...]:
    """Parsed rows of one split, cached because decompressing and parsing dominates load time."""
    spec = _TASKS[task]
    rows = spec.parse(*(DATA_DIR / f"{rel}.xz" for rel in spec.files[split]))
    if spec.part is not None:
        rows = spec.part(rows, split)
    if spec.info.kind == "multiple_choice":
        # The task column lets the five commonsense sets be mixed into one training set.
        rows = [{**row, "task": task} for row in rows]
    return tuple(rows)


def _features(info: TaskInfo) -> datasets.Features:
    if info.kind == "multiple_choice":
        return datasets.Features(
            {
                "question": datasets.Value("string"),
                "choices": datasets.List(datasets.Value("string")),
                "label": datasets.Value("int64"),
                "task": datasets.Value("string"),
            }
        )
    columns = {name: datasets.Value("string") for name in info.text_fields}
    # float64 keeps STS-B scores equal to the decimals in the file (float32 would round 3.8).
    columns["label"] = datasets.Value("float64" if info.kind == "regression" else "int64")
    return datasets.Features(columns)


def load_task(task: str, split: str = "train", n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Load one split of a task as a fresh ``datasets.Dataset``.

    Commonsense tasks (``COMMONSENSE_TASKS``) have columns ``question``, ``choices``,
    ``label`` (index into ``choices``) and ``task``; their ``"test"`` split is what the
    reference table evaluates on (ARC/OBQA test, BoolQ dev, PIQA validation), and ARC
    and OBQA also offer ``"validation"``. GLUE tasks (``GLUE_TASKS``) have their text
    columns (``sentence`` or ``sentence1``/``sentence2``) and ``label`` (int, or float
    in [0, 5] for STS-B), with splits ``"train"`` and ``"validation"`` (GLUE dev).

    ``n`` draws a seeded sample without replacement, returned in file order, so the
    result depends only on ``(task, split, n, seed)``; ``None`` or ``n >= len`` gives
    the whole split.
    """
    found = _resolve(task)
    info = found.info
    if split not in info.splits:
        raise ValueError(f"unknown split {split!r} for task {info.name}; expected one of {', '.join(info.splits)}")
    if n is not None and n <= 0:
        raise ValueError(f"n must be a positive number of examples or None, got {n}")
    if not found.files:  # a registered task loads itself
        return found.parse(split, n, seed)
    rows = _rows(info.name, split)
    if n is not None and n < len(rows):
        picked = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        rows = tuple(rows[i] for i in picked)
    return datasets.Dataset.from_list(list(rows), features=_features(info))
