"""Turning a task's rows into model inputs, scores, losses and metrics.

Three scoring protocols, and every result records which one produced it:

* ``"encoder"`` — an encoder with a head. Multiple choice: each (question, choice) pair is encoded
  and scored by ``AutoModelForMultipleChoice``; softmax over choices. Classification/regression:
  the sequence-classification head.
* ``"label_token"`` — a decoder, following the TUDB-Labs MoE-PEFT protocol that produced the
  reference table: the prompt lists the labelled choices and ends with ``Answer:``; the prediction is
  the argmax of the next-token logits restricted to the label tokens (`` A``, `` B``, …, or
  `` true``/`` false`` for BoolQ). Training is next-token cross-entropy on the gold label token.
* ``"loglik"`` — a decoder scoring each answer text by its summed log-likelihood after a
  ``Question: … Answer:`` prompt (the lm-eval-harness style); training maximises the gold answer's
  likelihood.

A protocol is a :class:`Protocol` in :data:`PROTOCOLS`: how rows become examples, how examples become a
batch, how a batch becomes a loss and scores, and the model head it needs. Modules outside the text core
(the vision tasks, the toy vision-language model; :data:`lorafam_nb.registry.EXTENSION_MODULES`) register
their own with :func:`register_protocol`, so that the text protocols' code, and every record keyed by it,
stays as it is when they change.
"""
from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import TaskInfo, task_info
from .registry import import_extensions

__all__ = ["PROTOCOLS", "EncodedTask", "Encoding", "Protocol", "collate", "encode", "evaluate", "get_protocol", "register_protocol",
           "score_batch"]

LETTERS = string.ascii_uppercase


@dataclass
class EncodedTask:
    """Tokenised examples of one task under one protocol (a list of dicts of python ints)."""

    info: TaskInfo
    protocol: str
    examples: list[dict[str, Any]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.examples)


def _as_choices(row: dict[str, Any], info: TaskInfo) -> tuple[str, list[str]]:
    """Any task as (question, choices): GLUE classes become the choices of a text prompt."""
    if info.kind == "multiple_choice":
        return row["question"], list(row["choices"])
    if info.kind == "regression":
        raise ValueError(f"{info.name} is a regression task; decoder protocols score classes only")
    text = " / ".join(row[f] for f in info.text_fields)
    return f"{text}\nWhich label fits: {' or '.join(info.label_names)}?", list(info.label_names)


def _label_prompt(row: dict[str, Any], info: TaskInfo) -> tuple[str, list[str]]:
    """MoE-PEFT-style prompt and the label strings whose first token is scored.

    Lettered choices are listed and answered by letter; answers that are words (BoolQ's
    true/false, GLUE class names) are answered by the word itself.
    """
    question, choices = _as_choices(row, info)
    if info.kind != "multiple_choice":
        return f"{question}\nAnswer:", [f" {c}" for c in choices]
    if choices == ["true", "false"]:
        return f"Please answer the following question with true or false: {question}\nAnswer:", [" true", " false"]
    listed = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"Please choose the correct answer to the question: {question} {listed}\nAnswer:", [
        f" {LETTERS[i]}" for i in range(len(choices))
    ]


def _first_token(tokenizer: Any, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


@dataclass(frozen=True)
class Encoding:
    """What encoding reads besides the rows: the text length cap, and for image protocols the model (whose
    preprocessing the images get) and the image side (None: the model's default)."""

    max_length: int = 128
    model: str = ""
    image_size: int | None = None


def _encode_encoder(ds: datasets.Dataset, info: TaskInfo, tokenizer: Any, encoding: Encoding) -> list[dict[str, Any]]:
    max_length = encoding.max_length
    examples = []
    for row in ds:
        if info.kind == "multiple_choice":
            enc = tokenizer([row["question"]] * len(row["choices"]), list(row["choices"]),
                            truncation=True, max_length=max_length)
            examples.append({"choices": [dict(zip(enc.keys(), v)) for v in zip(*enc.values())], "label": row["label"]})
        else:
            enc = tokenizer(*(row[f] for f in info.text_fields), truncation=True, max_length=max_length)
            examples.append({**enc, "label": row["label"]})
    return examples


def label_token_example(prompt: str, labels: list[str], label: int, tokenizer: Any, max_length: int,
                        name: str) -> dict[str, Any]:
    """One ``label_token`` example: the prompt's ids (cut from the left: the listed choices and the ``Answer:``
    cue must survive) and the first token of each label string."""
    ids = tokenizer(prompt)["input_ids"][-max_length:]
    label_ids = [_first_token(tokenizer, s) for s in labels]
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"{name}: label strings {labels} share a first token; cannot score them")
    return {"input_ids": ids, "label_ids": label_ids, "label": label}


def _encode_label_token(ds: datasets.Dataset, info: TaskInfo, tokenizer: Any,
                        encoding: Encoding) -> list[dict[str, Any]]:
    return [label_token_example(*_label_prompt(row, info), row["label"], tokenizer, encoding.max_length, info.name)
            for row in ds]


def _encode_loglik(ds: datasets.Dataset, info: TaskInfo, tokenizer: Any, encoding: Encoding) -> list[dict[str, Any]]:
    max_length = encoding.max_length
    examples = []
    for row in ds:
        question, choices = _as_choices(row, info)
        prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
        conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
        # Keep every answer whole; cut the prompt from the left if the longest does not fit.
        keep = max(1, max_length - max(len(c) for c in conts))
        examples.append({"prompt": prompt[-keep:], "continuations": conts, "label": row["label"]})
    return examples


def encode(ds: Any, task: str, tokenizer: Any, protocol: str = "encoder", max_length: int = 128, model: str = "",
           image_size: int | None = None) -> EncodedTask:
    """Encode rows of ``load_task(task, …)`` for ``protocol`` (see the module docstring); ``tokenizer`` is None
    for a protocol that reads no text, ``model`` and ``image_size`` matter to those that read images."""
    how = get_protocol(protocol)
    info = task_info(task)
    pad = getattr(tokenizer, "pad_token_id", None)
    examples = how.encode(ds, info, tokenizer, Encoding(max_length, model, image_size))
    return EncodedTask(info, protocol, examples, 0 if pad is None else pad)


# Per-example fields an example may carry for adapters that route on them -> the forward kwarg.
SIDE_FIELDS = {"task_id": "task_ids", "task_type": "task_types", "cluster_id": "cluster_ids"}


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows)


def labels_of(task: EncodedTask, examples: list[dict[str, Any]]) -> Tensor:
    """The examples' labels as one tensor (float for regression)."""
    return torch.tensor([e["label"] for e in examples],
                        dtype=torch.float32 if task.info.kind == "regression" else torch.long)


def _collate_encoder(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    batch: dict[str, Tensor] = {"labels": labels_of(task, examples)}
    if task.info.kind == "multiple_choice":
        n_choices = max(len(e["choices"]) for e in examples)
        flat = [c for e in examples for c in e["choices"] + [e["choices"][0]] * (n_choices - len(e["choices"]))]
        for key in flat[0]:
            fill = task.pad_id if key == "input_ids" else 0
            batch[key] = _pad([c[key] for c in flat], fill).view(len(examples), n_choices, -1)
        batch["choice_mask"] = torch.tensor([[i < len(e["choices"]) for i in range(n_choices)] for e in examples])
    else:
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in examples[0]:
                batch[key] = _pad([e[key] for e in examples], task.pad_id if key == "input_ids" else 0)
    return batch


def collate_label_token(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Left padding puts every prompt's last token at position -1 (RoPE only sees relative offsets)."""
    ids = [e["input_ids"] for e in examples]
    label_ids = _pad([e["label_ids"] for e in examples], -1)
    return {"labels": labels_of(task, examples), "input_ids": _pad(ids, task.pad_id, left=True),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, left=True),
            "choice_mask": label_ids >= 0, "label_ids": label_ids.clamp(min=0)}


def _collate_loglik(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """One row per (example, choice), left-padded so every answer ends at position -1."""
    n_choices = max(len(e["continuations"]) for e in examples)
    seqs, answer = [], []
    for e in examples:
        conts = e["continuations"] + [e["continuations"][0]] * (n_choices - len(e["continuations"]))
        for c in conts:
            seqs.append(e["prompt"] + c)
            answer.append([0] * len(e["prompt"]) + [1] * len(c))
    return {"labels": labels_of(task, examples), "input_ids": _pad(seqs, task.pad_id, left=True),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0, left=True),
            "answer_mask": _pad(answer, 0, left=True),
            "choice_mask": torch.tensor([[i < len(e["continuations"]) for i in range(n_choices)] for e in examples])}


def _choice_rows(task: EncodedTask, batch: dict[str, Tensor]) -> int:
    """Rows the model's layers see per example: multiple-choice encoders and log-likelihood batches flatten
    each example's choices into rows."""
    return batch["choice_mask"].shape[1] if "choice_mask" in batch else 1


def collate(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack examples into padded tensors; ``labels`` always present, and each per-example side input
    (:data:`SIDE_FIELDS`) with one entry per row the model's layers see."""
    how = get_protocol(task.protocol)
    batch = how.collate(task, examples)
    rows = how.rows(task, batch)
    for field, key in SIDE_FIELDS.items():
        if field in examples[0]:
            batch[key] = torch.tensor([e[field] for e in examples]).repeat_interleave(rows)
    return batch


def _side_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    wanted = getattr(getattr(model, "adapter_config", None), "side_inputs", ())
    return {k: batch[k] for k in wanted if k in batch}


def _score_encoder(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor],
                   side: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    logits = model(**inputs, **side).logits
    if task.info.kind == "regression":
        scores = logits.squeeze(-1)
        return F.mse_loss(scores, labels), scores
    if "choice_mask" in batch:
        logits = logits.masked_fill(~batch["choice_mask"], float("-inf"))
    return F.cross_entropy(logits, labels), logits


def label_token_scores(last: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(loss, scores) from the next-token logits ``last`` (B, V): cross-entropy on the gold label token over
    the whole vocabulary; the scores are the label tokens' logits."""
    scores = last.gather(1, batch["label_ids"]).masked_fill(~batch["choice_mask"], float("-inf"))
    gold = batch["label_ids"].gather(1, batch["labels"][:, None]).squeeze(1)
    return F.cross_entropy(last, gold), scores


def _score_label_token(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor],
                       side: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    # logits_to_keep=1: only the last position's vocabulary projection is computed.
    last = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 logits_to_keep=1, **side).logits[:, -1, :]
    return label_token_scores(last, batch)


def _score_loglik(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor],
                  side: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    # Answers sit at the end (left padding): project only the last k+1 positions onto the vocabulary.
    labels = batch["labels"]
    k = int(batch["answer_mask"].sum(1).max())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=k + 1, **side).logits[:, :-1]
    targets, mask = batch["input_ids"][:, -k:], batch["answer_mask"][:, -k:].to(torch.float32)
    logp = torch.log_softmax(logits.float(), -1).gather(2, targets[..., None]).squeeze(2)
    seq = (logp * mask).sum(1).view(labels.shape[0], -1)
    scores = seq.masked_fill(~batch["choice_mask"], float("-inf"))
    n_tokens = mask.sum(1).view(labels.shape[0], -1).gather(1, labels[:, None]).squeeze(1)
    return -(seq.gather(1, labels[:, None]).squeeze(1) / n_tokens).mean(), scores


def score_batch(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(training loss, scores): scores are (B, C) choice scores, or (B,) for regression (a protocol of its
    own may score otherwise: see its :class:`Protocol`)."""
    return get_protocol(task.protocol).score(model, task, batch, _side_inputs(model, batch))


def batch_to(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def predict_classes(scores: Tensor, info: TaskInfo) -> Tensor:
    """Predictions from scores: the argmax class, or the score itself for regression."""
    return scores.float().cpu() if info.kind == "regression" else scores.argmax(-1).cpu()


def accuracy_or_pearson(pred: Tensor, gold: Tensor, info: TaskInfo) -> dict[str, float]:
    """Accuracy (classification, multiple choice) or Pearson r (regression)."""
    if info.kind == "regression":
        return {"pearson": float(torch.corrcoef(torch.stack([pred, gold]))[0, 1])}
    return {"accuracy": int((pred == gold).sum()) / len(gold)}


@torch.no_grad()
def evaluate(model: nn.Module, task: EncodedTask, batch_size: int = 32,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """The task's metrics on ``task`` (``task.info.metric`` among them; for the text protocols accuracy, or
    Pearson r for regression)."""
    how = get_protocol(task.protocol)
    was_training = model.training
    model.eval()
    preds, golds = [], []
    for start in range(0, len(task), batch_size):
        batch = batch_to(collate(task, task.examples[start:start + batch_size]), device)
        _, scores = score_batch(model, task, batch)
        preds.append(how.predict(scores, task.info))
        golds.append(batch["labels"].cpu())
    model.train(was_training)
    pred, gold = torch.cat(preds), torch.cat(golds)
    return {"task": task.info.name, "protocol": task.protocol, "n": len(gold), **how.metrics(pred, gold, task.info)}


def one_row(task: EncodedTask, batch: dict[str, Tensor]) -> int:
    return 1


@dataclass(frozen=True)
class Protocol:
    """How one kind of task meets a model. ``encode(rows, info, tokenizer, encoding)`` → examples (plain
    dicts; :class:`Encoding`); ``collate(task, examples)`` → batch tensors, ``labels`` among them; ``score(model, task, batch,
    side)`` → (training loss, scores); ``head(info)`` → the :func:`~lorafam_nb.models.load_model` head and its
    number of labels; ``rows(task, batch)``: rows the model's layers see per example (side inputs are repeated
    to match); ``predict(scores, info)`` and ``metrics(pred, gold, info)`` turn scores into the task's metrics;
    ``tokenized``: whether it reads text (False: no tokenizer is loaded)."""

    name: str
    encode: Callable[[Any, TaskInfo, Any, Encoding], list[dict[str, Any]]]
    collate: Callable[[EncodedTask, list[dict[str, Any]]], dict[str, Tensor]]
    score: Callable[[nn.Module, EncodedTask, dict[str, Tensor], dict[str, Tensor]], tuple[Tensor, Tensor]]
    head: Callable[[TaskInfo], tuple[str, int]]
    rows: Callable[[EncodedTask, dict[str, Tensor]], int] = one_row
    predict: Callable[[Tensor, TaskInfo], Tensor] = predict_classes
    metrics: Callable[[Tensor, Tensor, TaskInfo], dict[str, float]] = accuracy_or_pearson
    tokenized: bool = True


def _encoder_head(info: TaskInfo) -> tuple[str, int]:
    if info.kind == "multiple_choice":
        return "multiple_choice", 0
    return "sequence_classification", 1 if info.kind == "regression" else info.num_labels


def causal_lm_head(info: TaskInfo) -> tuple[str, int]:
    return "causal_lm", 0


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(how: Protocol) -> Protocol:
    """Make ``how`` available by its name (a module outside the text core registers its own when imported)."""
    PROTOCOLS[how.name] = how
    return how


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (importing the extension modules that register protocols, if needed)."""
    if name not in PROTOCOLS:
        import_extensions()
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {tuple(PROTOCOLS)}")
    return PROTOCOLS[name]


register_protocol(Protocol("encoder", _encode_encoder, _collate_encoder, _score_encoder, _encoder_head,
                           rows=_choice_rows))
register_protocol(Protocol("label_token", _encode_label_token, collate_label_token, _score_label_token,
                           causal_lm_head))
register_protocol(Protocol("loglik", _encode_loglik, _collate_loglik, _score_loglik, causal_lm_head,
                           rows=_choice_rows))
