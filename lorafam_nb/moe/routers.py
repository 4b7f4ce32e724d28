"""Routers: which experts see a token, and with what weight.

Every router maps T tokens (or T task ids) to a :class:`Routing`: the logits, the softmax
probabilities over all E experts (what load-balancing losses average), and the weights actually used.
A top-k router also returns the selected experts; a dense router weighs every expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DenseRouter", "Routing", "TaskRouter", "TopKRouter", "router_dtype", "top_k"]


@dataclass
class Routing:
    logits: Tensor  # (T, E)
    probs: Tensor  # (T, E), softmax over all E experts, in float32 or wider
    weights: Tensor  # (T, k) for top-k (renormalised over the k), (T, E) for a dense mixture
    selected: Tensor | None  # (T, k) expert indices, or None (dense: every expert)


def router_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """A router's parameter dtype for a model in ``weight_dtype``: at least float32 (bf16/fp16 models keep
    their routers in float32, as the authors' code does), float64 for a float64 model."""
    return torch.promote_types(weight_dtype, torch.float32)


def softmax(logits: Tensor) -> Tensor:
    """Softmax over experts in at least float32, whatever the activations' dtype (bf16 logits are upcast)."""
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def top_k(logits: Tensor, k: int) -> Routing:
    """Softmax over all E logits first, then the k largest, renormalised to sum to 1 (the Mixtral
    order, which MixLoRA and MoLA use)."""
    probs = softmax(logits)
    weights, selected = probs.topk(k, dim=-1)
    return Routing(logits, probs, weights / weights.sum(-1, keepdim=True), selected)


def _check(num_experts: int, top: int | None = None) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if top is not None and not 1 <= top <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top}")


class TopKRouter(nn.Module):
    """``W_r ∈ R^{E×d}`` (no bias) then :func:`top_k`. ``jitter_noise`` ε multiplies the router's input by
    U(1−ε, 1+ε) in training only (Switch Transformer), on a copy: the FFN still sees the clean input.
    ``init_std`` None draws ``W_r`` Kaiming-uniform (a=√5, a linear layer's default), else N(0, std²)."""

    def __init__(self, d: int, num_experts: int, k: int, jitter_noise: float = 0.0, init_std: float | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        _check(num_experts, k)
        self.k, self.jitter_noise = k, jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, d, dtype=dtype, device=device))
        if init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
        return top_k(x.to(self.weight.dtype) @ self.weight.t(), self.k)

    def extra_repr(self) -> str:
        return f"d={self.weight.shape[1]}, num_experts={self.weight.shape[0]}, k={self.k}"


class DenseRouter(nn.Module):
    """Soft routing: G(x) = softmax(W_g x / τ) over all E experts, every expert weighted (LoRAMoE)."""

    def __init__(self, d: int, num_experts: int, temperature: float = 1.0, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        _check(num_experts)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.weight = nn.Parameter(torch.empty(num_experts, d, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Routing:
        logits = x.to(self.weight.dtype) @ self.weight.t() / self.temperature
        probs = softmax(logits)
        return Routing(logits, probs, probs, None)


class TaskRouter(nn.Module):
    """A gate that sees only the task: a learned embedding per task, mapped to E weights by a softmax
    (the task-conditioned routers of multi-task mixtures). Input: (T,) task ids, one per token."""

    def __init__(self, num_tasks: int, num_experts: int, task_dim: int = 64, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        _check(num_experts)
        self.task_embedding = nn.Embedding(num_tasks, task_dim, dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(num_experts, task_dim, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, task_ids: Tensor) -> Routing:
        logits = self.task_embedding(task_ids) @ self.weight.t()
        probs = softmax(logits)
        return Routing(logits, probs, probs, None)
