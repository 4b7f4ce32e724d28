"""The reference table's base models by architecture: shapes without weights, and tiny random twins.

The comparison table we reproduce fine-tuned ``google/gemma-2b`` and ``meta-llama/Llama-2-7b-hf``. Users
with the weights load them by hub id like any model. Everything that depends only on their shapes (the
"all linear layers" targets, the FFN view, parameter budgets and every method's matched size) needs no
weights: :func:`meta_model` builds the architecture on the meta device from its configuration, which is
written out here (the upstream ``config.json`` values that shape the network), so it works offline.

``tiny-gemma`` and ``tiny-llama`` are the same two architectures scaled down (2 layers, width 64) with
random weights from the caller's seed and SmolLM2's tokenizer, so a real training step, and the
experiments grid's smoke cells, run on them on a CPU. They check that the code paths work on these
architectures; their accuracies mean nothing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

__all__ = ["REFERENCE_CONFIGS", "TINY", "meta_model", "reference_config", "tiny_config"]

# The upstream config.json fields that shape each network (dtype, token ids and the like left out).
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "google/gemma-2b": dict(
        model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
}

# Short name -> the architecture it scales down. Vocabulary: SmolLM2's tokenizer, which these models use.
TINY: dict[str, str] = {"tiny-gemma": "google/gemma-2b", "tiny-llama": "meta-llama/Llama-2-7b-hf"}
_TINY_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, vocab_size=49152)


def reference_config(model_id: str) -> PretrainedConfig:
    """The configuration of a reference model: written out here for the two reference ids, else from the
    hub (or a local path) through transformers."""
    if model_id in REFERENCE_CONFIGS:
        fields = dict(REFERENCE_CONFIGS[model_id])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(model_id)


def meta_model(model_id: str) -> nn.Module:
    """The base network (no LM head) of ``model_id`` on the meta device: every module and shape, no memory."""
    with torch.device("meta"):
        return AutoModel.from_config(reference_config(model_id))


def tiny_config(name: str) -> PretrainedConfig:
    """``name`` (``tiny-gemma``/``tiny-llama``): its architecture at width 64, 2 layers, 4 heads (Gemma keeps
    its single key-value head), SmolLM2's vocabulary."""
    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r}; allowed: {', '.join(TINY)}")
    fields = dict(REFERENCE_CONFIGS[TINY[name]]) | _TINY_SIZE
    if fields["model_type"] == "gemma":
        fields["head_dim"] = 16
    else:
        fields["num_key_value_heads"] = _TINY_SIZE["num_attention_heads"]
    fields.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
