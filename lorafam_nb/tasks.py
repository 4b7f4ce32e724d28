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
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import TaskInfo, task_info

__all__ = ["PROTOCOLS", "EncodedTask", "encode", "evaluate", "score_batch"]

PROTOCOLS = ("encoder", "label_token", "loglik")
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


def encode(ds: datasets.Dataset, task: str, tokenizer: Any, protocol: str = "encoder",
           max_length: int = 128) -> EncodedTask:
    """Tokenise rows of ``load_task(task, …)`` for ``protocol`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    info = task_info(task)
    examples: list[dict[str, Any]] = []
    for row in ds:
        label = row["label"]
        if protocol == "encoder":
            if info.kind == "multiple_choice":
                enc = tokenizer([row["question"]] * len(row["choices"]), list(row["choices"]),
                                truncation=True, max_length=max_length)
                examples.append({"choices": [dict(zip(enc.keys(), v)) for v in zip(*enc.values())], "label": label})
            else:
                enc = tokenizer(*(row[f] for f in info.text_fields), truncation=True, max_length=max_length)
                examples.append({**enc, "label": label})
        elif protocol == "label_token":
            prompt, labels = _label_prompt(row, info)
            # Cut long prompts from the left: the listed choices and the "Answer:" cue must survive.
            ids = tokenizer(prompt)["input_ids"][-max_length:]
            label_ids = [_first_token(tokenizer, s) for s in labels]
            if len(set(label_ids)) != len(label_ids):
                raise ValueError(f"{info.name}: label strings {labels} share a first token; cannot score them")
            examples.append({"input_ids": ids, "label_ids": label_ids, "label": label})
        else:  # loglik
            question, choices = _as_choices(row, info)
            prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
            conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
            # Keep every answer whole; cut the prompt from the left if the longest does not fit.
            keep = max(1, max_length - max(len(c) for c in conts))
            examples.append({"prompt": prompt[-keep:], "continuations": conts, "label": label})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedTask(info, protocol, examples, pad)


# Per-example fields an example may carry for adapters that route on them -> the forward kwarg.
SIDE_FIELDS = {"task_id": "task_ids", "task_type": "task_types", "cluster_id": "cluster_ids"}


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows)


def collate(task: EncodedTask, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack examples into padded tensors; ``labels`` always present."""
    labels = torch.tensor([e["label"] for e in examples],
                          dtype=torch.float32 if task.info.kind == "regression" else torch.long)
    batch: dict[str, Tensor] = {"labels": labels}
    if task.protocol == "encoder" and task.info.kind == "multiple_choice":
        n_choices = max(len(e["choices"]) for e in examples)
        flat = [c for e in examples for c in e["choices"] + [e["choices"][0]] * (n_choices - len(e["choices"]))]
        for key in flat[0]:
            fill = task.pad_id if key == "input_ids" else 0
            batch[key] = _pad([c[key] for c in flat], fill).view(len(examples), n_choices, -1)
        batch["choice_mask"] = torch.tensor([[i < len(e["choices"]) for i in range(n_choices)] for e in examples])
    elif task.protocol == "encoder":
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in examples[0]:
                batch[key] = _pad([e[key] for e in examples], task.pad_id if key == "input_ids" else 0)
    elif task.protocol == "label_token":
        # Left padding puts every prompt's last token at position -1 (RoPE only sees relative offsets).
        ids = [e["input_ids"] for e in examples]
        batch["input_ids"] = _pad(ids, task.pad_id, left=True)
        batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0, left=True)
        label_ids = _pad([e["label_ids"] for e in examples], -1)
        batch["choice_mask"] = label_ids >= 0
        batch["label_ids"] = label_ids.clamp(min=0)
    else:  # loglik: one row per (example, choice), left-padded so every answer ends at position -1
        n_choices = max(len(e["continuations"]) for e in examples)
        seqs, answer = [], []
        for e in examples:
            conts = e["continuations"] + [e["continuations"][0]] * (n_choices - len(e["continuations"]))
            for c in conts:
                seqs.append(e["prompt"] + c)
                answer.append([0] * len(e["prompt"]) + [1] * len(c))
        batch["input_ids"] = _pad(seqs, task.pad_id, left=True)
        batch["attention_mask"] = _pad([[1] * len(s) for s in seqs], 0, left=True)
        batch["answer_mask"] = _pad(answer, 0, left=True)
        batch["choice_mask"] = torch.tensor([[i < len(e["continuations"]) for i in range(n_choices)] for e in examples])
    # Per-example side inputs, one entry per row the model's layers see: multiple-choice encoders and
    # log-likelihood batches flatten each example's choices into rows.
    rows = batch["choice_mask"].shape[1] if task.protocol in ("encoder", "loglik") and "choice_mask" in batch else 1
    for field, key in SIDE_FIELDS.items():
        if field in examples[0]:
            batch[key] = torch.tensor([e[field] for e in examples]).repeat_interleave(rows)
    return batch


def _side_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    wanted = getattr(getattr(model, "adapter_config", None), "side_inputs", ())
    return {k: batch[k] for k in wanted if k in batch}


def score_batch(model: nn.Module, task: EncodedTask, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(training loss, scores): scores are (B, C) choice scores, or (B,) for regression."""
    side = _side_inputs(model, batch)
    labels = batch["labels"]
    if task.protocol == "encoder":
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs, **side).logits
        if task.info.kind == "regression":
            scores = logits.squeeze(-1)
            return F.mse_loss(scores, labels), scores
        if "choice_mask" in batch:
            logits = logits.masked_fill(~batch["choice_mask"], float("-inf"))
        return F.cross_entropy(logits, labels), logits
    if task.protocol == "label_token":
        # logits_to_keep=1: only the last position's vocabulary projection is computed.
        last = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     logits_to_keep=1, **side).logits[:, -1, :]
        scores = last.gather(1, batch["label_ids"]).masked_fill(~batch["choice_mask"], float("-inf"))
        gold = batch["label_ids"].gather(1, labels[:, None]).squeeze(1)
        return F.cross_entropy(last, gold), scores
    # Answers sit at the end (left padding): project only the last k+1 positions onto the vocabulary.
    k = int(batch["answer_mask"].sum(1).max())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=k + 1, **side).logits[:, :-1]
    targets, mask = batch["input_ids"][:, -k:], batch["answer_mask"][:, -k:].to(torch.float32)
    logp = torch.log_softmax(logits.float(), -1).gather(2, targets[..., None]).squeeze(2)
    seq = (logp * mask).sum(1).view(labels.shape[0], -1)
    scores = seq.masked_fill(~batch["choice_mask"], float("-inf"))
    n_tokens = mask.sum(1).view(labels.shape[0], -1).gather(1, labels[:, None]).squeeze(1)
    return -(seq.gather(1, labels[:, None]).squeeze(1) / n_tokens).mean(), scores


def batch_to(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, task: EncodedTask, batch_size: int = 32,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy (classification, multiple choice) or Pearson r (regression) on ``task``."""
    was_training = model.training
    model.eval()
    preds, golds = [], []
    for start in range(0, len(task), batch_size):
        batch = batch_to(collate(task, task.examples[start:start + batch_size]), device)
        _, scores = score_batch(model, task, batch)
        preds.append(scores.float().cpu() if task.info.kind == "regression" else scores.argmax(-1).cpu())
        golds.append(batch["labels"].cpu())
    model.train(was_training)
    pred, gold = torch.cat(preds), torch.cat(golds)
    result: dict[str, Any] = {"task": task.info.name, "protocol": task.protocol, "n": len(gold)}
    if task.info.kind == "regression":
        result["pearson"] = float(torch.corrcoef(torch.stack([pred, gold]))[0, 1])
    else:
        result["accuracy"] = int((pred == gold).sum()) / len(gold)
    return result
