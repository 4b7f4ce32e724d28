"""Tests for lorafam_nb.data: shipped data, provenance, sampling and error reporting."""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from lorafam_nb import data
from vendor_data import vendor
from lorafam_nb.data import (
    COMMONSENSE_TASKS,
    GLUE_TASKS,
    DataFormatError,
    load_task,
    task_info,
)

DATA_DIR = Path(data.__file__).parent / "_data"
MANIFEST = json.loads((DATA_DIR / "MANIFEST.json").read_text(encoding="utf-8"))
ENTRIES = {entry["path"]: entry for entry in MANIFEST["files"]}

# Example counts from shared/data/README.md (BoolQ "test" = BoolQ dev, PIQA "test" = PIQA validation).
COUNTS = {
    ("arc_e", "train"): 2251,
    ("arc_e", "validation"): 570,
    ("arc_e", "test"): 2376,
    ("arc_c", "train"): 1119,
    ("arc_c", "validation"): 299,
    ("arc_c", "test"): 1172,
    ("boolq", "train"): 9427,
    ("boolq", "test"): 3270,
    ("obqa", "train"): 4957,
    ("obqa", "validation"): 500,
    ("obqa", "test"): 500,
    ("piqa", "train"): 16113,
    ("piqa", "test"): 1838,
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("cola", "train"): 8551,
    ("cola", "validation"): 1043,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("mrpc", "train"): 3667,  # one pair short of canonical GLUE (3668), see README
    ("mrpc", "validation"): 408,
    ("stsb", "train"): 5749,
    ("stsb", "validation"): 1500,
}

SHIPPED = {
    *(f"commonsense/{d}/{s}.jsonl" for d in ("arc_easy", "arc_challenge", "openbookqa")
      for s in ("train", "validation", "test")),
    "commonsense/piqa/train.jsonl",
    "commonsense/piqa/train-labels.lst",
    "commonsense/piqa/validation.jsonl",
    "commonsense/piqa/validation-labels.lst",
    "commonsense/llm_adapters/boolq/train.json",
    "commonsense/llm_adapters/boolq/test.json",
    "commonsense/llm_adapters/DATA_LICENSE",
    "commonsense/boolq/validation.jsonl",
    *(f"glue/{t}/{s}.tsv" for t in ("CoLA", "SST-2", "MRPC", "RTE", "STS-B") for s in ("train", "dev")),
    "glue/STS-B/LICENSE.txt",
}


def _shared_data() -> Path | None:
    # CI clones the repository next to shared/, hence <repo>/../shared/data.
    for candidate in (Path("/work/shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if (candidate / "README.md").is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def shared() -> Path:
    path = _shared_data()
    if path is None:
        pytest.skip("shared/data is not available (only in the development checkout)")
    return path


def _readme_table(readme: str) -> dict[str, tuple[int, str]]:
    """{path under shared/data: (count, sha256[:16])} for table rows that carry a hash."""
    listed: dict[str, tuple[int, str]] = {}
    prefix = ""
    for line in readme.splitlines():
        if section := re.match(r"## (commonsense|glue)/", line):
            prefix = section[1] + "/"
        cells = [c.strip().replace("*", "") for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3:
            continue
        names, counts, hashes = (c.split(", ") for c in cells)
        if not all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes):
            continue  # header rows and the LLM-Adapters table (no hashes)
        folder = names[0].rsplit("/", 1)[0]
        for name, count, digest in zip(names, counts, hashes, strict=True):
            path = name if "/" in name else f"{folder}/{name}"
            listed[prefix + path] = (int(count) if count.isdigit() else -1, digest)
    return listed


# ------------------------------------------------------------------ counts and schema


def test_task_lists_and_splits_match_readme() -> None:
    assert COMMONSENSE_TASKS == ("arc_e", "arc_c", "boolq", "obqa", "piqa")
    assert GLUE_TASKS == ("sst2", "cola", "rte", "mrpc", "stsb")
    for task in COMMONSENSE_TASKS + GLUE_TASKS:
        info = task_info(task)
        assert info.name == task
        assert set(info.splits) == {s for t, s in COUNTS if t == task}
        assert info.eval_split in info.splits
    for task in COMMONSENSE_TASKS:
        assert {"train", "test"} <= set(task_info(task).splits)
        assert task_info(task).eval_split == "test"
    for task in GLUE_TASKS:
        assert task_info(task).splits == ("train", "validation")
        assert task_info(task).eval_split == "validation"


@pytest.mark.parametrize(("task", "split"), [k for k in COUNTS if k[0] in COMMONSENSE_TASKS])
def test_commonsense_split_count_and_schema(task: str, split: str) -> None:
    info = task_info(task)
    ds = load_task(task, split)
    assert len(ds) == COUNTS[task, split]
    assert ds.column_names == ["question", "choices", "label", "task"]
    assert info.kind == "multiple_choice" and info.text_fields == ("question",) and info.label_names == ()
    rows = ds.to_dict()
    assert set(rows["task"]) == {task}
    assert all(isinstance(q, str) and q.strip() for q in rows["question"])
    for choices, label in zip(rows["choices"], rows["label"]):
        assert 2 <= len(choices) <= info.num_labels
        assert all(isinstance(c, str) for c in choices)
        assert isinstance(label, int) and 0 <= label < len(choices)


def test_num_labels_is_the_largest_number_of_choices() -> None:
    for task in COMMONSENSE_TASKS:
        info = task_info(task)
        widest = max(len(c) for split in info.splits for c in load_task(task, split)["choices"])
        assert widest == info.num_labels, task


@pytest.mark.parametrize(("task", "split"), [k for k in COUNTS if k[0] in GLUE_TASKS])
def test_glue_split_count_and_schema(task: str, split: str) -> None:
    info = task_info(task)
    ds = load_task(task, split)
    assert len(ds) == COUNTS[task, split]
    assert ds.column_names == [*info.text_fields, "label"]
    assert info.text_fields == (("sentence",) if task in ("sst2", "cola") else ("sentence1", "sentence2"))
    for field in info.text_fields:
        assert all(isinstance(t, str) and t.strip() for t in ds[field])
    labels = ds["label"]
    if task == "stsb":
        assert info.kind == "regression" and info.num_labels == 1 and info.label_names == ()
        assert ds.features["label"].dtype == "float64"
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels)
        assert min(labels) == 0.0 and max(labels) == 5.0
    else:
        assert info.kind == "classification" and info.num_labels == len(info.label_names) == 2
        assert ds.features["label"].dtype == "int64"
        assert set(labels) == {0, 1}


# --------------------------------------------------------------------- spot checks


def test_arc_easy_first_train_row() -> None:
    row = load_task("arc_e", "train")[0]
    assert row["question"] == "Which factor will most likely cause a person to develop a fever?"
    assert row["choices"][row["label"]] == "a bacterial population in the bloodstream"
    assert row["label"] == 1


def test_digit_answer_keys_are_mapped_through_the_choice_labels(tmp_path: Path) -> None:
    path = tmp_path / "arc.jsonl"
    row = {"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
           "answerKey": "3"}
    path.write_text(json.dumps(row) + "\n")
    assert data._parse_arc(path) == [{"question": "Q?", "choices": ["a", "b", "c"], "label": 2}]


def test_obqa_piqa_boolq_first_rows() -> None:
    obqa = load_task("obqa", "train")[0]
    assert obqa["question"] == "The sun is responsible for"
    assert obqa["choices"][obqa["label"]] == "plants sprouting, blooming and wilting"
    piqa = load_task("piqa", "train")[0]
    assert piqa["question"] == "When boiling butter, when it's ready, you can"
    assert piqa["choices"] == ["Pour it onto a plate", "Pour it into a jar"] and piqa["label"] == 1
    boolq = load_task("boolq", "train")[0]
    assert boolq == {"question": "do iran and afghanistan speak the same language?",
                     "choices": ["true", "false"], "label": 0, "task": "boolq"}


def test_label_balances_match_readme() -> None:
    assert Counter(load_task("piqa", "train")["label"]) == {0: 8053, 1: 8060}
    assert Counter(load_task("boolq", "test")["label"]) == {0: 2033, 1: 1237}  # 0 = "true"
    assert Counter(load_task("sst2", "train")["label"]) == {1: 37569, 0: 29780}
    assert Counter(load_task("sst2", "validation")["label"]) == {1: 444, 0: 428}
    assert Counter(load_task("rte", "train")["label"]) == {0: 1249, 1: 1241}


def test_glue_first_rows() -> None:
    cola = load_task("cola", "train")[0]
    assert cola == {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1}
    rte = load_task("rte", "train")[0]
    assert rte["sentence1"] == "No Weapons of Mass Destruction Found in Iraq Yet." and rte["label"] == 1
    assert task_info("rte").label_names[rte["label"]] == "not_entailment"
    mrpc = load_task("mrpc", "train")[0]
    assert mrpc["sentence1"].startswith("Amrozi accused his brother") and mrpc["label"] == 1
    stsb = load_task("stsb", "train")
    assert stsb[0]["label"] == 5.0 and stsb[1]["label"] == 3.8
    assert load_task("sst2", "train")[0]["sentence"] == "hide new secretions from the parental units "


# ------------------------------------------------------------------------ aliases


@pytest.mark.parametrize(
    ("alias", "name"),
    [("ARC-Easy", "arc_e"), ("arc-e", "arc_e"), ("ARC_Challenge", "arc_c"), ("arc-c", "arc_c"),
     ("openbookqa", "obqa"), ("OpenBookQA", "obqa"), ("BoolQ", "boolq"), ("PIQA", "piqa"),
     ("sst-2", "sst2"), ("SST2", "sst2"), ("sts-b", "stsb"), ("STS_B", "stsb"), ("CoLA", "cola"),
     ("RTE", "rte"), ("Mrpc", "mrpc")],
)
def test_aliases(alias: str, name: str) -> None:
    assert task_info(alias).name == name
    assert load_task(alias, n=3)["label"] == load_task(name, n=3)["label"]


# --------------------------------------------------------------------- subsampling


def test_subsample_is_deterministic_sized_and_a_subset() -> None:
    full = load_task("arc_c", "train")["question"]
    a = load_task("arc_c", "train", n=50, seed=1)["question"]
    assert a == load_task("arc_c", "train", n=50, seed=1)["question"]
    assert a != load_task("arc_c", "train", n=50, seed=2)["question"]
    assert len(a) == len(set(a)) == 50
    positions = [full.index(q) for q in a]
    assert positions == sorted(positions)  # returned in file order
    assert a == [full[i] for i in positions]


def test_subsample_bounds() -> None:
    assert len(load_task("rte", "validation", n=10_000)) == 277
    assert len(load_task("rte", "validation", n=277)) == 277
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n must be"):
            load_task("rte", n=bad)


def test_each_call_returns_a_fresh_dataset_from_the_cache() -> None:
    first = load_task("cola", "validation")
    hits = data._rows.cache_info().hits
    second = load_task("cola", "validation")
    assert first is not second and first["sentence"] == second["sentence"]
    assert data._rows.cache_info().hits == hits + 1


# --------------------------------------------------------------------- provenance


def test_manifest_lists_exactly_the_shipped_files() -> None:
    assert {e["original"] for e in MANIFEST["files"]} == SHIPPED
    on_disk = {str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*.xz")}
    assert on_disk == set(ENTRIES)
    for entry in MANIFEST["files"]:
        assert entry["path"] == entry["original"] + ".xz"
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", entry["source"]), entry
        assert entry["licence"]


@pytest.mark.parametrize("path", sorted(ENTRIES))
def test_manifest_sha256_matches_decompressed_bytes(path: str) -> None:
    raw = lzma.decompress((DATA_DIR / path).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == ENTRIES[path]["sha256"]
    assert len(raw) == ENTRIES[path]["bytes"]


def test_manifest_row_counts_match_the_loaders() -> None:
    for (task, split), count in COUNTS.items():
        for rel in data._TASKS[task].files[split]:
            assert ENTRIES[f"{rel}.xz"]["rows"] == count, rel


def test_shipped_files_equal_shared_originals_and_readme(shared: Path) -> None:
    readme = _readme_table((shared / "README.md").read_text(encoding="utf-8"))
    for entry in MANIFEST["files"]:
        original = (shared / entry["original"]).read_bytes()
        assert hashlib.sha256(original).hexdigest() == entry["sha256"], entry["original"]
        if entry["original"] in readme:
            count, prefix = readme[entry["original"]]
            assert entry["sha256"][:16] == prefix, entry["original"]
            assert entry["rows"] == (None if count == -1 else count), entry["original"]
    # Everything except the LLM-Adapters files (whose README table has no hashes) is listed.
    assert SHIPPED - set(readme) == {f for f in SHIPPED if "/llm_adapters/" in f}


def test_boolq_questions_match_original_dev_file(shared: Path) -> None:
    original = [json.loads(line) for line in (shared / "commonsense/boolq/validation.jsonl").read_text().splitlines()]
    ours = load_task("boolq", "test")
    # LLM-Adapters appends "?" to every BoolQ question; order and answers are unchanged.
    assert ours["question"] == [row["question"] + "?" for row in original]
    assert ours["label"] == [0 if row["answer"] else 1 for row in original]


def test_boolq_with_passages_splits_two_to_one_and_matches_the_question_only_copy() -> None:
    """boolq_open and boolq_closed hold the same question-answer pairs (the original dev file, every third
    item for test), with and without the passage; the questions and answers are LLM-Adapters' BoolQ test
    items at the same positions."""
    question_only = load_task("boolq", "test")
    for split, positions, size in (("train", [i for i in range(3270) if i % 3 != 2], 2180),
                                   ("test", list(range(2, 3270, 3)), 1090)):
        closed, opened = load_task("boolq_closed", split), load_task("boolq_open", split)
        assert len(closed) == len(opened) == size
        assert closed["question"] == [question_only[i]["question"] for i in positions]
        assert closed["label"] == opened["label"] == [question_only[i]["label"] for i in positions]
        assert all(o.endswith("\n" + c) and len(o) > len(c) + 20 for o, c in zip(opened["question"], closed["question"]))
        assert closed["choices"][0] == ["true", "false"] and set(closed["task"]) == {"boolq_closed"}


def test_vendor_is_idempotent(shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "_data"
    shutil.copytree(DATA_DIR, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    vendor(shared, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert (out / "MANIFEST.json").read_bytes() == (DATA_DIR / "MANIFEST.json").read_bytes()


# -------------------------------------------------------------------------- errors


def test_unknown_task_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="unknown task 'squad'") as err:
        load_task("squad")
    for name in COMMONSENSE_TASKS + GLUE_TASKS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown task"):
        task_info("arc")


def test_unknown_split_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*piqa.*train, test"):
        load_task("piqa", "validation")
    with pytest.raises(ValueError, match=r"unknown split 'test'.*train, validation"):
        load_task("sst2", "test")


def _write(path: Path, text: str, compress: bool = False) -> Path:
    if compress:
        path = path.with_name(path.name + ".xz")
        path.write_bytes(lzma.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


ARC_OK = json.dumps({"id": "1", "question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                     "answerKey": "B"})


@pytest.mark.parametrize("compress", [False, True])
def test_malformed_json_line(tmp_path: Path, compress: bool) -> None:
    path = _write(tmp_path / "arc.jsonl", f"{ARC_OK}\n{ARC_OK}\n{{not json\n", compress)
    with pytest.raises(DataFormatError, match=r"arc\.jsonl(\.xz)?, line 3: invalid JSON") as err:
        data._parse_arc(path)
    assert err.value.path == path and err.value.line == 3


def test_missing_field(tmp_path: Path) -> None:
    row = {"id": "1", "question": {"choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
           "answerKey": "A"}
    path = _write(tmp_path / "obqa.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=r"obqa\.jsonl, line 1: missing field 'stem'"):
        data._parse_obqa(path)


def test_answer_key_not_among_choices(tmp_path: Path) -> None:
    bad = ARC_OK.replace('"answerKey": "B"', '"answerKey": "E"')
    path = _write(tmp_path / "arc.jsonl", f"{ARC_OK}\n{bad}\n")
    with pytest.raises(DataFormatError, match=r"arc\.jsonl, line 2: answer 'E' is not one of"):
        data._parse_arc(path)


@pytest.mark.parametrize(
    ("task", "text", "line", "reason"),
    [
        ("sst2", "sentence\tlabel\ngood\t1\nbad\t2\n", 3, "label must be one of"),
        ("sst2", "sentence\tlabel\ngood\t1\nno label here\n", 3, "expected 2 columns, got 1"),
        ("sst2", "text\tlabel\ngood\t1\n", 1, "expected header"),
        ("cola", "src\t1\t\tok\nsrc\t1\tok\n", 2, "expected 4 columns, got 3"),
        ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n", 2, "label must be one of"),
        ("stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                 "0\tg\tf\ty\t0\ts\ts\ta\tb\t5.5\n", 2, r"similarity score must be a number in \[0, 5\]"),
    ],
    ids=["sst2-label", "sst2-columns", "sst2-header", "cola-columns", "rte-label", "stsb-score"],
)
def test_bad_glue_rows(tmp_path: Path, task: str, text: str, line: int, reason: str) -> None:
    path = _write(tmp_path / f"{task}.tsv", text)
    with pytest.raises(DataFormatError, match=rf"{task}\.tsv, line {line}: {reason}"):
        data._parse_glue(path, task)


def test_glue_keeps_quotes_and_mrpc_bom(tmp_path: Path) -> None:
    path = _write(tmp_path / "sst2.tsv", 'sentence\tlabel\nsays " hi \'\t1\n')
    assert data._parse_glue(path, "sst2") == [{"sentence": 'says " hi \'', "label": 1}]
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    path = _write(tmp_path / "mrpc.tsv", header + "0\t1\t2\ta\tb\n")
    assert data._parse_glue(path, "mrpc") == [{"sentence1": "a", "sentence2": "b", "label": 0}]


def test_piqa_length_mismatch(tmp_path: Path) -> None:
    row = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    questions = _write(tmp_path / "train.jsonl", f"{row}\n{row}\n{row}\n")
    labels = _write(tmp_path / "train-labels.lst", "0\n1\n")
    with pytest.raises(DataFormatError, match=r"train-labels\.lst, line 3: 2 labels for 3 rows"):
        data._parse_piqa(questions, labels)
    labels = _write(tmp_path / "train-labels.lst", "0\n1\n2\n")
    with pytest.raises(DataFormatError, match=r"train-labels\.lst, line 3: label must be 0 or 1"):
        data._parse_piqa(questions, labels)


def _boolq_item(question: str, answer: str) -> dict[str, str]:
    return {"instruction": f"Please answer the following question with true or false, question: {question}"
                           "\n\nAnswer format: true/false",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def test_boolq_array_reports_the_element_line(tmp_path: Path) -> None:
    good = _boolq_item("is it?", "true")
    path = _write(tmp_path / "boolq.json", json.dumps([good, good], indent=4))
    assert data._parse_boolq(path) == [{"question": "is it?", "choices": ["true", "false"], "label": 0}] * 2
    bad = {k: v for k, v in good.items() if k != "answer"}
    path = _write(tmp_path / "boolq.json", json.dumps([good, bad], indent=4))  # 2nd element opens on line 8
    with pytest.raises(DataFormatError, match=r"boolq\.json, line 8: missing field 'answer'"):
        data._parse_boolq(path)
    path = _write(tmp_path / "boolq.json", json.dumps([good, _boolq_item("is it?", "yes")], indent=4))
    with pytest.raises(DataFormatError, match=r"boolq\.json, line 8: answer 'yes' is not one of"):
        data._parse_boolq(path)
    path = _write(tmp_path / "boolq.json", "[\n" + json.dumps(good) + ",\n{oops}\n]")
    with pytest.raises(DataFormatError, match=r"boolq\.json, line 3: invalid JSON"):
        data._parse_boolq(path)
