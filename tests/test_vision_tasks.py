"""The image and dense protocols: what they feed the model, their losses and metrics against hand computations,
and a real run of each through experiment.run (tiny sizes)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorafam_nb.data import load_task, task_code, task_info
from lorafam_nb.experiment import RunSpec, encode_task, run, run_inputs
from lorafam_nb.lora import LoraConfig
from lorafam_nb.results import key_of
from lorafam_nb.tasks import collate, get_protocol, score_batch
from lorafam_nb.trainer import TrainConfig
from lorafam_nb.vision_data import dense_targets, load_easy_vqa, load_vision_task
from lorafam_nb.vision_models import pixel_values
from lorafam_nb.vision_tasks import DENSE_TARGETS, DISTANCE_SCALE, dense_metrics


def test_the_vision_tasks_are_registered_with_their_protocols():
    for name, classes in (("fashion_mnist", 10), ("textile", 3), ("easy_vqa_shape", 3), ("easy_vqa_color", 8)):
        info = task_info(name)
        assert (info.protocol, info.metric, info.num_labels, info.eval_split) == ("image", "accuracy", classes, "test")
    dense = task_info("easy-VQA dense")  # titles resolve like the text tasks' do
    assert (dense.name, dense.protocol, dense.metric) == ("easy_vqa_dense", "dense", "dense")
    assert not get_protocol("image").tokenized and not get_protocol("dense").tokenized
    assert task_code("sst2") == [] and task_code("fashion_mnist")  # only registered tasks add code to a key


def test_image_examples_are_the_normalised_pixels_and_labels():
    spec = RunSpec(model="dinov2-small", task="textile", train_n=6)
    task = encode_task(spec, "train", 6)
    raw = load_vision_task("textile", "train", 6, seed=0)
    batch = collate(task, task.examples)
    assert batch["pixel_values"].shape == (6, 3, 112, 112)
    torch.testing.assert_close(batch["pixel_values"], pixel_values(raw.images, 112))
    assert batch["labels"].tolist() == raw.labels.tolist()
    # EfficientNet gets its own normalisation ([-1, 1]) and size.
    effnet = encode_task(RunSpec(model="efficientnet-lite0", task="textile"), "train", 2)
    x = collate(effnet, effnet.examples)["pixel_values"]
    assert x.shape[-1] == 128 and x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6


def test_dense_targets_follow_the_image_when_resized():
    rows = load_task("easy_vqa_dense", "train", n=3, seed=0)
    task = encode_task(RunSpec(model="efficientnet-lite0", task="easy_vqa_dense", image_size=128), "train", 3)
    y = collate(task, task.examples)["labels"]
    assert y.shape == (3, 4, 128, 128)
    vqa = load_easy_vqa("train", 3, seed=0)
    t = dense_targets(vqa.images, vqa.shapes)
    assert np.array_equal(rows.targets[:, 0], t.segmentation)
    # Nearest-neighbour ×2: each 64 px target pixel becomes a 2 × 2 block; distances double (pixels of 128 px).
    assert torch.equal(y[:, 0, ::2, ::2], torch.as_tensor(rows.targets[:, 0]))
    torch.testing.assert_close(y[:, 3, ::2, ::2], 2 * torch.as_tensor(rows.targets[:, 3]))


def test_dense_metrics_against_hand_counts():
    gold = torch.zeros(1, 4, 4, 4)
    gold[0, 0, :2, :2] = 1  # a 2 × 2 circle in the corner
    gold[0, 1, :2, :2] = 1
    gold[0, 2, :2, :2] = 1
    gold[0, 3] = torch.arange(16.).view(4, 4)
    logits = torch.where(gold[:, 1:3] > 0, 5.0, -5.0)
    perfect = torch.cat([gold[:, :1], logits, gold[:, 3:]], dim=1)
    m = dense_metrics(perfect, gold)
    assert (m["miou"], m["mask_iou"], m["edge_f1"], m["distance_rmse"], m["dense"]) == (1.0, 1.0, 1.0, 0.0, 1.0)
    wrong = perfect.clone()
    wrong[0, 0, 0, 0] = 0  # one shape pixel called background: class 1 IoU 3/4, background 12/13
    wrong[0, 1, 0, 0] = -5  # mask IoU 3/4
    wrong[0, 2] = 5  # every pixel an edge: precision 4/16, recall 1 → F1 = 2·4/(16+4)
    wrong[0, 3] += 2  # RMSE 2
    m = dense_metrics(wrong, gold)
    # Classes 2 and 3 are absent from both: IoU 1 by convention (empty union).
    assert m["miou"] == pytest.approx((12 / 13 + 3 / 4 + 1 + 1) / 4)
    assert (m["mask_iou"], m["edge_f1"], m["distance_rmse"]) == (pytest.approx(0.75), pytest.approx(0.4), pytest.approx(2.0))
    assert m["dense"] == pytest.approx((m["miou"] + m["mask_iou"] + m["edge_f1"]) / 3)


class _FixedDecoder(torch.nn.Module):
    """Predicts given maps, whatever the image: to check the dense loss by hand."""

    def __init__(self, out: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.out = out

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.out


def test_dense_loss_is_the_sum_of_the_four_targets_losses():
    task = encode_task(RunSpec(model="efficientnet-lite0", task="easy_vqa_dense", image_size=64), "train", 2)
    batch = collate(task, task.examples)
    g = torch.Generator().manual_seed(0)
    out = {k: torch.randn(2, n, 64, 64, generator=g) for k, n in DENSE_TARGETS.items()}
    loss, scores = score_batch(_FixedDecoder(out), task, batch)
    seg, mask, edges, dist = batch["labels"].unbind(1)
    rim = edges.mean()
    want = (F.cross_entropy(out["segmentation"], seg.long()) + F.binary_cross_entropy_with_logits(out["mask"][:, 0], mask)
            + F.binary_cross_entropy_with_logits(out["edges"][:, 0], edges, pos_weight=(1 - rim) / rim)
            + (out["distance"][:, 0] - dist / DISTANCE_SCALE).abs().mean())
    torch.testing.assert_close(loss, want)
    assert torch.equal(scores[:, 0], out["segmentation"].argmax(1).float())
    torch.testing.assert_close(scores[:, 3], out["distance"][:, 0] * DISTANCE_SCALE)


def test_an_image_run_trains_the_head_and_the_adapter_and_keys_the_vision_code():
    spec = RunSpec(model="dinov2-small", task="easy_vqa_shape", finetune=LoraConfig(r=2, target_modules=["q_proj"]),
                   train_n=8, eval_n=8, train=TrainConfig(max_steps=1, batch_size=8, progress=False))
    out = run(spec)
    assert out.row["protocol"] == "image" and out.row["per_task_n"] == {"easy_vqa_shape": 8}
    # 12 blocks × r(d_in + d_out) for q_proj, plus the classifier on [CLS; mean patch] → 3 classes.
    assert out.row["trainable"] == 12 * 2 * (384 + 384) + (2 * 384 + 1) * 3
    inputs = run_inputs(spec, "book")
    assert "lorafam_nb.vision_tasks" in inputs["code"]["modules"]
    text = run_inputs(RunSpec(task="sst2"), "book")
    assert "lorafam_nb.vision_tasks" not in text["code"]["modules"]  # a vision edit leaves text records valid
    assert key_of(inputs) != key_of(run_inputs(dataclasses.replace(spec, image_size=84), "book"))
