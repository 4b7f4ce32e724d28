"""The shipped images as tasks that :func:`lorafam_nb.experiment.run` trains on, under two protocols.

* ``"image"``: classify an image, the vision backbone with a classification head (DINOv2's linear on
  [CLS, mean patch token], EfficientNet's ``_fc``); cross-entropy, accuracy. Tasks: ``fashion_mnist``,
  ``textile``, ``easy_vqa_shape``, ``easy_vqa_color`` (:data:`lorafam_nb.vision_data.VISION_TASKS`).
* ``"dense"``: easy-VQA's per-pixel targets (:func:`lorafam_nb.vision_data.dense_targets`) predicted
  together by a multi-task decoder whose forward gives ``{target: (B, outputs, H, W)}`` (MLoRE's):
  segmentation into background and the three shapes (cross-entropy), the shape mask and its edges (binary
  cross-entropy, edges weighted by how rare they are), and the signed distance to the shape's rim (an L1
  loss in units of :data:`DISTANCE_SCALE` pixels). Task ``easy_vqa_dense``; its metric ``dense`` is the mean
  of the segmentation mIoU, the mask IoU and the edge F1 (each in [0, 1]), with the distance's RMSE in
  pixels reported beside it.

Images are resized to ``image_size`` (default :data:`IMAGE_SIZE`, per model) and normalised as each
backbone was trained (:func:`lorafam_nb.vision_models.pixel_values`). This module registers its tasks and
protocols when imported; the text core imports it only when a name it does not know is asked for
(:data:`lorafam_nb.registry.EXTENSION_MODULES`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import TaskInfo, register_task
from .tasks import EncodedTask, Encoding, Protocol, register_protocol
from .vision_data import VISION_TASKS, dense_targets, load_easy_vqa, load_vision_task
from .vision_models import DINOV2_MEAN, DINOV2_STD, EFFICIENTNET_MEAN, EFFICIENTNET_STD, pixel_values

__all__ = ["DENSE_TARGETS", "DISTANCE_SCALE", "IMAGE_SIZE", "DenseRows", "ImageRows", "dense_metrics"]

IMAGE_SIZE = {"dinov2-small": 112, "efficientnet-lite0": 128}  # the side images are resized to, by model
_NORMALISE = {"efficientnet-lite0": (EFFICIENTNET_MEAN, EFFICIENTNET_STD)}  # others: ImageNet's (DINOv2's)
# The dense targets, in the order of their label channels, with the decoder's outputs for each.
DENSE_TARGETS = {"segmentation": 4, "mask": 1, "edges": 1, "distance": 1}
DISTANCE_SCALE = 8.0  # pixels: the distance loss and its targets are in these units


@dataclass(frozen=True)
class ImageRows:
    """Images (uint8) and their class labels: what the ``"image"`` protocol encodes."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class DenseRows:
    """Images (uint8, N × H × W × 3) and their dense targets stacked as (N, 4, H, W) float: segmentation class,
    mask, edges, signed distance in pixels."""

    images: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _pixels(images: np.ndarray, encoding: Encoding) -> Tensor:
    size = encoding.image_size or IMAGE_SIZE.get(encoding.model, 112)
    mean, std = _NORMALISE.get(encoding.model, (DINOV2_MEAN, DINOV2_STD))
    return pixel_values(images, size, mean, std)


# --- "image": classification ---------------------------------------------------------------------------------

def _encode_image(rows: ImageRows, info: TaskInfo, tokenizer: Any, encoding: Encoding) -> list[dict[str, Any]]:
    x = _pixels(rows.images, encoding)
    return [{"pixel_values": x[i], "label": int(rows.labels[i])} for i in range(len(x))]


def _collate_image(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def _score_image(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor],
                 side: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    out = model(batch["pixel_values"], **side)
    logits = out.logits if hasattr(out, "logits") else out  # DINOv2's output object, or EfficientNet's tensor
    return F.cross_entropy(logits, batch["labels"]), logits


def _image_head(info: TaskInfo) -> tuple[str, int]:
    return "image_classification", info.num_labels


# --- "dense": easy-VQA's per-pixel targets -----------------------------------------------------------------

def _encode_dense(rows: DenseRows, info: TaskInfo, tokenizer: Any, encoding: Encoding) -> list[dict[str, Any]]:
    x = _pixels(rows.images, encoding)
    size = tuple(x.shape[-2:])
    y = torch.as_tensor(rows.targets)
    if tuple(y.shape[-2:]) != size:  # targets follow the image: classes and masks by nearest neighbour
        scale = size[0] / y.shape[-2]
        y = F.interpolate(y, size=size, mode="nearest")
        y[:, 3] *= scale  # distances are in pixels of the resized image
    return [{"pixel_values": x[i], "label": y[i]} for i in range(len(x))]


def _dense_losses(out: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    segmentation, mask, edges, distance = y.unbind(1)
    rim = edges.mean().clamp(min=1e-3)  # edges are a few per cent of the pixels: weight them up to balance
    return {
        "segmentation": F.cross_entropy(out["segmentation"], segmentation.long()),
        "mask": F.binary_cross_entropy_with_logits(out["mask"][:, 0], mask),
        "edges": F.binary_cross_entropy_with_logits(out["edges"][:, 0], edges, pos_weight=(1 - rim) / rim),
        "distance": F.l1_loss(out["distance"][:, 0], distance / DISTANCE_SCALE),
    }


def _score_dense(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor],
                 side: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Loss: the sum of the four targets' losses. Scores: (B, 4, H, W), one channel per target (the
    segmentation's argmax class, then the mask's and edges' logits, the distance in pixels)."""
    out = model(batch["pixel_values"], **side)
    loss = torch.stack(list(_dense_losses(out, batch["labels"]).values())).sum()
    scores = torch.cat([out["segmentation"].argmax(1, keepdim=True).to(out["mask"].dtype), out["mask"],
                        out["edges"], out["distance"] * DISTANCE_SCALE], dim=1)
    return loss, scores


def _collate_dense(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack([e["label"] for e in examples])}


def _iou(pred: Tensor, gold: Tensor) -> float:
    union = (pred | gold).sum()
    return float((pred & gold).sum() / union) if union else 1.0


def dense_metrics(pred: Tensor, gold: Tensor, info: TaskInfo | None = None) -> dict[str, float]:
    """Segmentation mIoU over the four classes, mask IoU, edge F1, distance RMSE (pixels), and ``dense``,
    the mean of the first three: for (N, 4, H, W) predictions and targets in the channel order of
    :data:`DENSE_TARGETS` (predictions as the ``"dense"`` protocol scores them: logits for mask and edges)."""
    seg, gold_seg = pred[:, 0].long(), gold[:, 0].long()
    miou = float(np.mean([_iou(seg == c, gold_seg == c) for c in range(DENSE_TARGETS["segmentation"])]))
    mask_iou = _iou(pred[:, 1] > 0, gold[:, 1] > 0.5)
    edge, gold_edge = pred[:, 2] > 0, gold[:, 2] > 0.5
    hits = float((edge & gold_edge).sum())
    f1 = 2 * hits / max(float(edge.sum() + gold_edge.sum()), 1.0)
    rmse = float(((pred[:, 3] - gold[:, 3]) ** 2).mean().sqrt())
    return {"dense": (miou + mask_iou + f1) / 3, "miou": miou, "mask_iou": mask_iou, "edge_f1": f1,
            "distance_rmse": rmse}


def _dense_predict(scores: Tensor, info: TaskInfo) -> Tensor:
    return scores.float().cpu()


def _dense_head(info: TaskInfo) -> tuple[str, int]:
    return "base", 0  # the backbone's feature maps: the method's decoder is the head


# --- the tasks ---------------------------------------------------------------------------------------------

_SPLITS = ("train", "test")


def _classification_loader(name: str) -> Any:
    def load(split: str, n: int | None, seed: int) -> ImageRows:
        task = load_vision_task(name, split, n, seed)
        return ImageRows(task.images, task.labels)
    return load


def _load_dense(split: str, n: int | None, seed: int) -> DenseRows:
    vqa = load_easy_vqa(split, n, seed)
    t = dense_targets(vqa.images, vqa.shapes)
    targets = np.stack([t.segmentation, t.mask, t.edges, t.distance], axis=1).astype(np.float32)
    return DenseRows(vqa.images, targets)


_TITLES = {"fashion_mnist": "Fashion-MNIST", "textile": "Textile defects", "easy_vqa_shape": "easy-VQA shape",
           "easy_vqa_color": "easy-VQA colour"}

register_protocol(Protocol("image", _encode_image, _collate_image, _score_image, _image_head, tokenized=False))
register_protocol(Protocol("dense", _encode_dense, _collate_dense, _score_dense, _dense_head,
                           predict=_dense_predict, metrics=dense_metrics, tokenized=False))
for _name in VISION_TASKS:
    _labels = load_vision_task(_name, "test", 1).label_names
    register_task(TaskInfo(_name, _TITLES[_name], "classification", len(_labels), (), _SPLITS, "test", _labels,
                           protocol="image"), _classification_loader(_name))
register_task(TaskInfo("easy_vqa_dense", "easy-VQA dense", "dense", 0, (), _SPLITS, "test", (), metric="dense",
                       protocol="dense"), _load_dense)
