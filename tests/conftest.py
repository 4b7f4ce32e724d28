"""Shared fixtures: a tiny randomly initialised BERT (fast, real transformers code), toy tasks, and the
checks of parity with peft that the LoRA-type methods share."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lorafam_nb import AdapterConfig, AdapterModel, get_adapter_model
from lorafam_nb.data import task_info
from lorafam_nb.tasks import EncodedTask
from lorafam_nb.trainer import Callback, Trainer


def text_methods() -> dict[str, type[AdapterConfig]]:
    """The registered methods that adapt a text model's linears (the grid's, the benchmark's, peft's); the
    vision and multimodal ones are checked in their own test files, on their own models."""
    from lorafam_nb.registry import import_methods
    return {name: cls for name, cls in import_methods().items() if cls.modality == "text"}


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def toy_task(n: int = 48, seed: int = 0) -> EncodedTask:
    """A learnable SST-2-shaped task: label 1 sequences draw tokens from 10–54, label 0 from 55–99."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        label = i % 2
        ids = torch.randint(10, 55, (12,), generator=g) + (0 if label else 45)
        ids = ids.tolist()
        examples.append({"input_ids": [1] + ids, "attention_mask": [1] * 13, "label": label})
    return EncodedTask(task_info("sst2"), "encoder", examples, pad_id=0)


class Interrupt(Callback):
    """Stops a run with KeyboardInterrupt after optimizer step ``at`` (for checkpoint/resume tests)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.at:
            raise KeyboardInterrupt


@pytest.fixture
def bert():
    return tiny_bert()


# --- parity with peft's LoRA-type layers (LoRA, rsLoRA, LoRA-FA, DoRA, QLoRA share these checks) ---
PEFT_NAMES = {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": "lora_magnitude_vector"}


def peft_tensor(theirs: nn.Module, name: str, tensor: str) -> torch.Tensor:
    """peft's copy of our ``tensor`` (``lora_A``, ``lora_B`` or DoRA's ``magnitude``) in layer ``name``."""
    return getattr(theirs.base_model.model.get_submodule(name), PEFT_NAMES[tensor])["default"].weight


def copy_into_peft(ours: AdapterModel, theirs: nn.Module, tensors: tuple[str, ...] = ("lora_A", "lora_B")) -> None:
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            for tensor in tensors:
                peft_tensor(theirs, name, tensor).copy_(getattr(layer, tensor))


def peft_pair(ours_config: AdapterConfig, peft_config: Any,
              peft_base: Callable[[nn.Module, AdapterModel], nn.Module] | None = None) -> tuple[AdapterModel, nn.Module]:
    """Ours and peft's adapter on copies of one tiny BERT, with B moved off zero and A, B copied into peft.

    ``peft_base(base, ours)`` gives peft a different base model (QLoRA: the de-quantised weights)."""
    from peft import get_peft_model
    base = tiny_bert()
    ours = get_adapter_model(copy.deepcopy(base), ours_config)
    theirs = get_peft_model(peft_base(base, ours) if peft_base else copy.deepcopy(base), peft_config)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in ours.adapter_layers().values():
            layer.lora_B.normal_(0, 0.3)
    copy_into_peft(ours, theirs)
    return ours, theirs


def assert_peft_parity(ours: AdapterModel, theirs: nn.Module, x: torch.Tensor,
                       tensors: tuple[str, ...] = ("lora_A", "lora_B"), dropout_seed: int | None = None) -> None:
    """Same logits (1e-6) and the same gradients of ``tensors`` in every layer; the base weight gets none.
    ``dropout_seed`` reseeds before each forward so both draw the same dropout masks."""
    labels = torch.arange(len(x)) % 2
    outputs = []
    for model in (ours, theirs):
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed)
        outputs.append(model(input_ids=x, labels=labels))
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, atol=1e-6, rtol=0)
    for out in outputs:
        out.loss.backward()
    for name, layer in ours.adapter_layers().items():
        for tensor in tensors:
            torch.testing.assert_close(getattr(layer, tensor).grad, peft_tensor(theirs, name, tensor).grad,
                                       atol=1e-6, rtol=0)
        assert getattr(layer.base_layer, "weight", None) is None or layer.base_layer.weight.grad is None


def gradient_receivers(model: AdapterModel, x: torch.Tensor) -> set[str]:
    """Moves every B off zero, back-propagates once and returns the parameters that got a non-zero
    gradient, after checking that they are exactly the trainable ones."""
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_()
    model(input_ids=x, labels=torch.arange(len(x)) % 2).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    return got


def mixture_layer(config: AdapterConfig, d_in: int = 12, d_out: int = 10):
    """``config``'s layer on one float64 linear with random non-zero expert B (for checks against the
    dense equation): a mixture on single linears (LoRAMoE, MoLA, MoRAL)."""
    from lorafam_nb.core import AdapterScope, site_of

    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(d_in, d_out)).double().requires_grad_(False)
    layer = config.build_layer(site_of(host, "0"), AdapterScope()).double()
    with torch.no_grad():
        layer.experts.lora_B.normal_(0, 0.5)
    return layer


def assert_mixture_gradients(model: AdapterModel,
                             tensors: tuple[str, ...] = ("router.weight", "experts.lora_A", "experts.lora_B"),
                             **inputs: Any) -> None:
    """One backward of the task loss plus the auxiliary losses reaches exactly what a mixture trains: every
    layer's router and experts (``tensors``, by default a mixture of LoRA experts on single linears), and
    the classifier head; nothing else."""
    out = model(**inputs)
    (out.loss + model.aux_loss()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.{site}.{t}" for site in model.adapter_layers() for t in tensors}
    expected |= {n for n in trainable if ".classifier." in n}
    assert got == trainable == expected


def layer_io(model: AdapterModel) -> dict[str, list[torch.Tensor]]:
    """Hook every adapter layer of ``model``: per layer, its input and output of each forward, in order."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.adapter_layers().items():
        layer.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).extend((args[0], out)))
    return seen


def assert_sparse_equals_dense(sparse: AdapterModel, **inputs: Any) -> None:
    """The sparse dispatch and the dense path of a top-k mixture give the same logits and the same gradient
    for every trainable tensor (task loss plus auxiliary losses); ``sparse`` runs every layer sparse."""
    dense = copy.deepcopy(sparse)
    for layer in dense.adapter_layers().values():
        layer.path = "dense"
    outs = []
    for m in (sparse, dense):
        out = m(**inputs)
        (out.loss + m.aux_loss()).backward()
        outs.append(out.logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (sparse, dense)]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0)


# --- the book, built once per test run (test_book checks the build, test_browser opens its pages) ---
@dataclass
class BookBuild:
    """A strict (``-W -n``) Jupyter Book build of a copy of the book with the committed chapter outputs."""

    root: Path
    returncode: int
    log: str  # the tail of the build's output

    @property
    def html(self) -> Path:
        return self.root / "_build" / "html"


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> BookBuild:
    # A copy, with the committed (smoke-profile) chapter outputs in place of `make book`'s.
    repo, root = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(repo / name, root / name)
    shutil.copytree(repo / "book", root / "book", ignore=shutil.ignore_patterns("chapters", "_build"))
    (root / "book" / "chapters").mkdir()
    for notebook in (repo / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, root / "book" / "chapters" / notebook.name)
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(root), "--builder", "html", "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=900)
    return BookBuild(root, proc.returncode, proc.stdout[-4000:] + proc.stderr[-4000:])
