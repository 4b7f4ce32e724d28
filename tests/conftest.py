"""Shared fixtures: a tiny randomly initialised BERT (fast, real transformers code) and toy tasks."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lorafam_nb.data import task_info
from lorafam_nb.tasks import EncodedTask


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


@pytest.fixture
def bert():
    return tiny_bert()
