"""Refresh ``lorafam_nb/_data`` from the upstream files: ``python tests/vendor_data.py <shared/data>``.

A maintainers' tool, not part of the installed package. It copies every shipped file byte for byte,
xz-compressed, and writes ``MANIFEST.json`` with each file's sha256, size, row count, source (repository
and commit), upstream path and licence, as ``shared/data``'s README documents them. Idempotent: unchanged
files are not rewritten. Every split is parsed from the originals first, so a malformed source fails here,
and the row counts in the manifest are those the loaders see.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import sys
from dataclasses import dataclass
from pathlib import Path

from lorafam_nb.data import DATA_DIR, TASK_NAMES, parse_files, split_files

_TRAIN_VAL_TEST = ("train", "validation", "test")
_TRAIN_TEST = ("train", "test")


@dataclass(frozen=True)
class _Origin:
    """Provenance of one shipped file, as documented in shared/data/README.md."""

    source: str  # "owner/repo@commit" the bytes were taken from
    upstream: str  # path inside that repository (and how it was converted, if it was)
    licence: str


_SCP = "parth20031/scp@fa1da68c38ae39a034bcc12a185438ebfb89b5f4"
_OBQA = "katulevskiy/NLP-OpenBookQA@eac0c145529af1a4e7924c979bbbba0b10354de3"
_YBISK = "ybisk/ybisk.github.io@21edab439af693b961be2f069e8690a88d3b4e37"
_LLM_ADAPTERS = "AGI-Edgerunners/LLM-Adapters@816657208af4db747803f87ba40a4c71383fed7a"
_GLUE = "F0restL1n/BERT@0d0288be08079531c7b3a85af3d532f9adb0f13a"
_CONVERTED = "converted from a Hugging Face datasets Arrow cache to JSONL, one json.dumps(row) per line"
_GLUE_RESEARCH = (
    "no licence file with the GLUE data; GLUE asks users to respect the original dataset's terms (research use)"
)
_GLUE_LICENCES = {
    "CoLA": _GLUE_RESEARCH,
    "SST-2": _GLUE_RESEARCH,
    "RTE": _GLUE_RESEARCH,
    "MRPC": "Microsoft Research Paraphrase Corpus licence terms (Microsoft Shared Source)",
    "STS-B": "scores CC BY-SA 4.0; sentence texts under their own source licences (see STS-B/LICENSE.txt)",
}

# Keyed by path under shared/data; the shipped copy is the same path plus ".xz".
_VENDORED: dict[str, _Origin] = {
    **{
        f"commonsense/{folder}/{split}.jsonl": _Origin(
            _SCP,
            f"ai2_arc.zip: ai2_arc/{title}/0.0.0/210d026faf9955653af8916fad021475a3f00453/ai2_arc-{split}.arrow"
            f" ({_CONVERTED})",
            "CC BY-SA 4.0",
        )
        for folder, title in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge"))
        for split in _TRAIN_VAL_TEST
    },
    **{
        f"commonsense/openbookqa/{split}.jsonl": _Origin(
            _OBQA, f"OpenBookQA-V1-Sep2018/Data/Main/{upstream}.jsonl", "Apache-2.0"
        )
        for split, upstream in (("train", "train"), ("validation", "dev"), ("test", "test"))
    },
    "commonsense/piqa/train.jsonl": _Origin(
        _SCP, f"piqa.zip: piqa/plain_text/1.1.0/6c611c1a.../piqa-train.arrow ({_CONVERTED})", "AFL-3.0"
    ),
    "commonsense/piqa/train-labels.lst": _Origin(_YBISK, "piqa/data/train-labels.lst", "AFL-3.0"),
    "commonsense/piqa/validation.jsonl": _Origin(_YBISK, "piqa/data/valid.jsonl", "AFL-3.0"),
    "commonsense/piqa/validation-labels.lst": _Origin(_YBISK, "piqa/data/valid-labels.lst", "AFL-3.0"),
    **{
        f"commonsense/llm_adapters/boolq/{split}.json": _Origin(
            _LLM_ADAPTERS,
            f"dataset/boolq/{split}.json",
            "ODC-By 1.0 (LLM-Adapters formatting); BoolQ itself is CC BY-SA 3.0",
        )
        for split in _TRAIN_TEST
    },
    "commonsense/llm_adapters/DATA_LICENSE": _Origin(_LLM_ADAPTERS, "DATA_LICENSE", "ODC-By 1.0 (the licence text)"),
    "commonsense/boolq/validation.jsonl": _Origin(
        "d-eremeev/BoolQ-Question-Answering@72c347852e309ad087cf9f57517b769712a7a2a4",
        "data/dev.jsonl (the original BoolQ dev file, with passages)", "CC BY-SA 3.0"),
    **{
        f"glue/{folder}/{split}.tsv": _Origin(_GLUE, f"glue_data/{folder}/{split}.tsv", licence)
        for folder, licence in _GLUE_LICENCES.items()
        for split in ("train", "dev")
    },
    "glue/STS-B/LICENSE.txt": _Origin(_GLUE, "glue_data/STS-B/LICENSE.txt", _GLUE_LICENCES["STS-B"]),
}


def vendor(shared_data_dir: Path, out_dir: Path = DATA_DIR) -> None:
    """Copy the shipped files from ``shared_data_dir`` into ``out_dir`` as ``.xz`` plus ``MANIFEST.json``."""
    shared_data_dir, out_dir = Path(shared_data_dir), Path(out_dir)
    rows: dict[str, int] = {}
    for task in TASK_NAMES:
        for rels in split_files(task).values():
            count = len(parse_files(task, [shared_data_dir / rel for rel in rels]))
            rows.update(dict.fromkeys(rels, count))

    entries = []
    for rel, origin in _VENDORED.items():
        raw = (shared_data_dir / rel).read_bytes()
        target = out_dir / f"{rel}.xz"
        if not (target.exists() and lzma.decompress(target.read_bytes()) == raw):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
        entries.append(
            {
                "path": f"{rel}.xz",
                "original": rel,
                "sha256": hashlib.sha256(raw).hexdigest(),
                "bytes": len(raw),
                "rows": rows.get(rel),  # None for licence texts
                "source": origin.source,
                "upstream": origin.upstream,
                "licence": origin.licence,
            }
        )
    manifest = {
        "about": "Byte-for-byte copies of files under shared/data, xz-compressed; "
        "sha256 and bytes refer to the decompressed (original) file.",
        "files": entries,
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    manifest_path = out_dir / "MANIFEST.json"
    if not (manifest_path.exists() and manifest_path.read_text(encoding="utf-8") == text):
        manifest_path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/vendor_data.py <path to shared/data>")
    vendor(Path(sys.argv[1]))
