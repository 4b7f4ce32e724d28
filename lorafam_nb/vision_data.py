"""The book's shipped vision data: small, fixed subsamples of four public image sets, as uint8 arrays.

- ``fashion_mnist``: Fashion-MNIST (Zalando, MIT), 28 x 28 grey, 10 classes; 100 train and 50 test
  images per class, from Debian's ``dataset-fashion-mnist``.
- ``textile``: simulated textile images (``conformal-clip-data==0.1.4``, MIT), 3 classes (nominal, local
  defect, global defect); 45 train and 15 test per class, resized from 250 px to 112 px grey (the
  images are grey already: their three channels are equal).
- ``easy_vqa``: easy-VQA (``easy-vqa==1.0``, MIT), 64 x 64 RGB images of one solid shape on a pastel
  background with templated question-answer pairs; 800 train and 200 test images with all their
  questions. The shape's colour is one of eight pure colours, so :func:`shape_masks` recovers the shape
  exactly, and :func:`dense_targets` derives segmentation, edge and distance maps from it:
  ``easy_vqa_shape`` and ``easy_vqa_color`` are its two image-classification views.
- :func:`sample_images`: four photographs from scikit-image (CC0 / public domain), for sanity checks.

``tests/vendor_data.py`` (``make vendor-data``) rebuilds every file from the upstream packages; the book's
data page gives sources and licences. Everything loads offline from inside the package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EASY_VQA_COLORS", "EASY_VQA_PALETTE", "EASY_VQA_SHAPES", "FASHION_MNIST_CLASSES", "SAMPLE_IMAGES",
    "TEXTILE_CLASSES", "VISION_DIR", "VISION_TASKS", "DenseTargets", "VQASet", "VisionTask", "dense_targets",
    "load_easy_vqa", "load_vision_task", "sample_images", "shape_colors", "shape_masks", "vision_manifest",
]

VISION_DIR = Path(__file__).parent / "_data" / "vision"
SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
TEXTILE_CLASSES = ("nominal", "local defect", "global defect")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA draws every shape in one of these exact colours (its generator uses the named colours).
EASY_VQA_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
EASY_VQA_COLORS = tuple(EASY_VQA_PALETTE)
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")

# Classification views: task name -> (file, label array, class names).
_CLASSIFICATION = {
    "fashion_mnist": ("fashion_mnist", "labels", FASHION_MNIST_CLASSES),
    "textile": ("textile", "labels", TEXTILE_CLASSES),
    "easy_vqa_shape": ("easy_vqa", "shape", EASY_VQA_SHAPES),
    "easy_vqa_color": ("easy_vqa", "color", EASY_VQA_COLORS),
}
VISION_TASKS = tuple(_CLASSIFICATION)


@dataclass(frozen=True)
class VisionTask:
    """Labelled images of one split: ``images`` uint8 ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB)."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray  # int64 [N], indices into label_names
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class VQASet:
    """easy-VQA images and their question-answer pairs; pair ``k`` asks about ``images[image_index[k]]``."""

    split: str
    images: np.ndarray  # uint8 [M, 64, 64, 3]
    shapes: np.ndarray  # int64 [M], indices into EASY_VQA_SHAPES
    colors: np.ndarray  # int64 [M], indices into EASY_VQA_COLORS
    image_index: np.ndarray  # int64 [K]
    questions: tuple[str, ...]  # K questions
    answers: tuple[str, ...]  # K answers, each one of answer_names
    answer_names: tuple[str, ...]  # easy-VQA's 13 answers, in its answers.txt order


@dataclass(frozen=True)
class DenseTargets:
    """Per-pixel targets of easy-VQA images, all ``[N, H, W]``."""

    segmentation: np.ndarray  # int64: 0 background, 1 + shape index on the shape
    mask: np.ndarray  # bool: the shape
    edges: np.ndarray  # bool: shape pixels with a 4-neighbour in the background
    distance: np.ndarray  # float32: signed Euclidean distance in pixels, > 0 inside, < 0 outside


@cache
def _arrays(file: str) -> dict[str, np.ndarray]:
    with np.load(VISION_DIR / f"{file}.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def vision_manifest() -> dict:
    """Sources, licences, selection rules and content hashes of the shipped files."""
    return json.loads((VISION_DIR / "MANIFEST.json").read_text(encoding="utf-8"))


def _subsample(count: int, n: int | None, seed: int) -> np.ndarray:
    """``n`` indices out of ``count`` drawn without replacement by ``seed``; all, in order, when ``n`` is None."""
    if n is None:
        return np.arange(count)
    if not 0 < n <= count:
        raise ValueError(f"n must be in 1..{count}, got {n}")
    return np.sort(np.random.default_rng(seed).choice(count, size=n, replace=False))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def load_vision_task(name: str, split: str = "train", n: int | None = None, seed: int = 0) -> VisionTask:
    """A classification view of the shipped images (see :data:`VISION_TASKS`); ``n`` draws a subsample by ``seed``."""
    if name not in _CLASSIFICATION:
        raise ValueError(f"unknown vision task {name!r}; allowed: {', '.join(VISION_TASKS)}")
    _check_split(split)
    file, label_key, label_names = _CLASSIFICATION[name]
    arrays = _arrays(file)
    keep = _subsample(len(arrays[f"{split}_images"]), n, seed)
    return VisionTask(name, split, arrays[f"{split}_images"][keep],
                      arrays[f"{split}_{label_key}"][keep].astype(np.int64), label_names)


def load_easy_vqa(split: str = "train", n_images: int | None = None, seed: int = 0) -> VQASet:
    """easy-VQA images of one split with all their question-answer pairs; ``n_images`` draws images by ``seed``."""
    _check_split(split)
    arrays = _arrays("easy_vqa")
    keep = _subsample(len(arrays[f"{split}_images"]), n_images, seed)
    new_index = np.full(len(arrays[f"{split}_images"]), -1)
    new_index[keep] = np.arange(len(keep))
    qa_image = new_index[arrays[f"{split}_qa_image"]]
    pairs = qa_image >= 0
    vocab, answer_names = arrays["question_vocab"], tuple(str(a) for a in arrays["answer_names"])
    return VQASet(
        split=split,
        images=arrays[f"{split}_images"][keep],
        shapes=arrays[f"{split}_shape"][keep].astype(np.int64),
        colors=arrays[f"{split}_color"][keep].astype(np.int64),
        image_index=qa_image[pairs].astype(np.int64),
        questions=tuple(str(q) for q in vocab[arrays[f"{split}_qa_question"][pairs]]),
        answers=tuple(answer_names[a] for a in arrays[f"{split}_qa_answer"][pairs]),
        answer_names=answer_names,
    )


def sample_images() -> dict[str, np.ndarray]:
    """scikit-image's photographs ``astronaut``, ``chelsea`` (a cat), ``coffee`` and ``rocket``, uint8 RGB,
    downscaled so that the longer side is 256 px."""
    arrays = _arrays("skimage")
    return {name: arrays[name].copy() for name in SAMPLE_IMAGES}  # copies: the loaded arrays are cached


# --- exact dense targets from easy-VQA's pure colours ------------------------------------------------------

def shape_colors(images: np.ndarray) -> np.ndarray:
    """Index into :data:`EASY_VQA_COLORS` of each image's shape: the palette colour with the most pixels."""
    palette = np.array(list(EASY_VQA_PALETTE.values()), dtype=np.uint8)
    hits = (images[:, :, :, None, :] == palette).all(-1).sum((1, 2))  # [N, 8]
    if (hits.max(1) == 0).any():
        raise ValueError("an image has no pixel of any easy-VQA palette colour")
    return hits.argmax(1)


def shape_masks(images: np.ndarray) -> np.ndarray:
    """Bool ``[N, H, W]``: pixels nearer (in RGB) to the shape's colour than to the background's.

    The background is the image's most frequent colour; pixels of exactly either colour are classified
    exactly, and the anti-aliased rim of blends goes to the nearer of the two.
    """
    flat = images.reshape(len(images), -1, 3).astype(np.int32)
    shape = np.array(list(EASY_VQA_PALETTE.values()), dtype=np.int32)[shape_colors(images)]
    # The mode of each image's colours, vectorised: sort the packed colours, find the longest run.
    packed = np.sort((flat[..., 0] << 16) | (flat[..., 1] << 8) | flat[..., 2], axis=1)
    position = np.arange(packed.shape[1])
    starts = np.concatenate([np.ones((len(packed), 1), bool), packed[:, 1:] != packed[:, :-1]], axis=1)
    run = position - np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    mode = packed[np.arange(len(packed)), run.argmax(1)]
    background = np.stack([mode >> 16, (mode >> 8) & 255, mode & 255], axis=1)
    to_shape = ((flat - shape[:, None]) ** 2).sum(-1)
    to_background = ((flat - background[:, None]) ** 2).sum(-1)
    return (to_shape < to_background).reshape(images.shape[:3])


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it; the image border does not count as outside."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    inner = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    return mask & ~inner


def _distance_to(points: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``points`` ``[N, H, W]`` (exact, batched).

    Squared distances are |g|^2 + |p|^2 - 2 g.p over integer coordinates, which float32 holds exactly.
    """
    n, height, width = points.shape
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1).reshape(-1, 2)
    grid = torch.from_numpy(grid).float()
    out = np.empty((n, height * width), dtype=np.float32)
    for start in range(0, n, chunk):
        part = points[start:start + chunk].reshape(-1, height * width)
        # Pad every image's point set to the longest with a point far outside the image.
        count = part.sum(1)
        padded = torch.full((len(part), int(count.max()), 2), 1000.0)
        for i, row in enumerate(part):
            padded[i, : count[i]] = grid[torch.from_numpy(row)]
        square = (grid**2).sum(1)[None, :, None] + (padded**2).sum(2)[:, None, :]
        square = torch.baddbmm(square, grid.expand(len(part), -1, -1), padded.transpose(1, 2), alpha=-2)
        out[start:start + chunk] = square.amin(-1).sqrt().numpy()
    return out.reshape(n, height, width)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each pixel to the nearest pixel of the other region (+ inside, - outside).

    The nearest pixel of the other region always lies on that region's rim (a pixel with a 4-neighbour in
    this region), so measuring to the two rims is exact and cheap.
    """
    return np.where(mask, _distance_to(_edges(~mask)), -_distance_to(_edges(mask)))


def dense_targets(images: np.ndarray, shapes: np.ndarray) -> DenseTargets:
    """Segmentation, shape mask, edges and signed distance of easy-VQA images (``shapes``: their shape indices)."""
    mask = shape_masks(images)
    return DenseTargets(
        segmentation=np.where(mask, 1 + np.asarray(shapes)[:, None, None], 0).astype(np.int64),
        mask=mask,
        edges=_edges(mask),
        distance=_signed_distance(mask),
    )
