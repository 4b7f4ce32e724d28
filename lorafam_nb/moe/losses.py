"""Auxiliary losses of mixtures, as pure functions of router outputs (no module state).

Shapes: T tokens, E experts, k selections per token. Probabilities are the softmax over all E
experts *before* any top-k, so that the gradient reaches every router logit.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import Route
from ..distributed import global_sum

__all__ = ["cv_squared", "localized_balance", "pooled_load_balance", "router_z_loss", "switch_load_balance"]


def _wide(x: Tensor) -> Tensor:
    """At least float32 (half-precision statistics would round the loss away)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def switch_load_balance(probs: Tensor, selected: Tensor) -> Tensor:
    """Switch Transformer / Mixtral load balance, ``E · Σ_e F_e P_e``.

    ``F_e`` is the fraction of tokens whose top-k set contains e (so Σ_e F_e = k; not differentiable),
    ``P_e`` the mean router probability of e. Perfect balance gives k (k/E of the tokens to each of
    the E experts at P_e = 1/E); all tokens on one expert with probability 1 give E·k.
    """
    num_experts = probs.shape[-1]
    counts = torch.bincount(selected.reshape(-1), minlength=num_experts).to(probs.dtype)
    # Over the whole micro-batch in data-parallel training (a no-op otherwise): F and P are batch statistics.
    counts, total, tokens = global_sum(counts), global_sum(probs.sum(0)), global_sum(probs.new_tensor(probs.shape[0]))
    return num_experts * (counts / tokens * total / tokens).sum()


def pooled_load_balance(routes: Sequence[Route]) -> Tensor:
    """:func:`switch_load_balance` over the tokens of several routed layers at once, their routing
    concatenated (one term for all of them, which is not the sum of per-layer terms)."""
    return switch_load_balance(torch.cat([r.probs for r in routes]), torch.cat([r.selected for r in routes]))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss, ``mean_t (log Σ_e exp z_te)²``: keeps router logits small."""
    return torch.logsumexp(_wide(logits), dim=-1).pow(2).mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(x) / (mean(x)² + eps)`` over all entries (unbiased
    variance; Shazeer et al.'s importance loss, and LoRAMoE's code). 0 when all entries are equal."""
    x = _wide(x).reshape(-1)
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def localized_balance(importance: Tensor, expert_types: Tensor, sample_types: Tensor, delta: float) -> Tensor:
    """LoRAMoE's localized balancing constraint, ``cv²(I ∘ Q)``.

    ``importance`` Q is (E, M): the router mass each expert gets from each of M samples (summed over the
    sample's tokens); ``expert_types`` (E,) and ``sample_types`` (M,) are 0/1 labels; ``I_{n,m} = 1 + δ``
    where the expert's type matches the sample's, else ``1 − δ``. Balancing I∘Q evens the load inside
    each expert group while the (1 ± δ) weights let each group specialise in its type of data.
    """
    match = expert_types[:, None].to(sample_types.device) == sample_types[None, :]
    weights = torch.where(match, 1.0 + delta, 1.0 - delta).to(importance.dtype)
    return cv_squared(weights * importance)
