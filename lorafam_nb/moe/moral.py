"""MoRAL: MoE Augmented LoRA for LLMs' Lifelong Learning (Yang et al., 2024, arXiv 2402.11260).

MoRAL's contribution is a *setting*: update an LLM's knowledge from plain question–answer pairs (not
fact triplets), one chunk of new knowledge after another, with a mixture of LoRA experts on the frozen
model, and measure both learning (the current chunk) and retention (earlier chunks), open-book (with
the supporting passage) and closed-book. Its layer is the standard token-routed top-k mixture of LoRA
experts; the paper's text does not give its layer placement, router or loss, so this module follows the
common recipe and says so (the chapter discusses it):

    h = W_0 x + b_0 + (α/r) Σ_{i ∈ TopK} g_i(x) B_i A_i drop(x),   g = renorm_k(TopK(softmax(W_g x), k))

* One router per adapted linear (no bias, Kaiming-uniform), on that linear's input; k = 2 of N = 4.
* A Switch load-balance term over the routing of all adapted linears (weight ``router_aux_loss_coef``),
  which keeps a token router from collapsing onto one expert over a long stream of chunks.
* The lifelong protocol (chunks in sequence, the accuracy matrix R_{s,j} and backward transfer) lives in
  :func:`lifelong`; it works for any adapter config, so that LoRA runs the same stream.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import MethodCard, register_method
from .layers import TopKLinearConfig

__all__ = ["LifelongResult", "MoRALConfig", "backward_transfer", "lifelong"]


@register_method
@dataclass
class MoRALConfig(TopKLinearConfig):
    """MoRAL's mixture: ``num_experts`` N, ``top_k`` k, rank ``r``, ``lora_alpha``, ``lora_dropout`` and the
    load-balance weight ``router_aux_loss_coef`` (⚠ not given in the paper: the common 0.01)."""

    r: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    num_experts: int = 4
    top_k: int = 2
    router_aux_loss_coef: float = 0.01

    method = "moral"
    card = MethodCard(
        title="MoRAL", paper="Yang et al., arXiv 2024", arxiv="2402.11260", date="2024-02",
        idea=r"lifelong knowledge updates from plain question–answer pairs with a top-$k$ mixture of LoRA "
             r"experts on a frozen model; learning and retention, open- and closed-book",
        trains=r"$A_i$, $B_i$ per expert; router $W_g$ per linear", frozen=r"$W_0$", mergeable=False,
        params=r"N\,r(d_{in}+d_{out})+N\,d_{in}", chapter="moral", bibkey="yang2024moral",
        params_note=r"the router is counted",
        merge_note="top-k routing per token",
    )


# --- the lifelong protocol -------------------------------------------------------------------------

@dataclass
class LifelongResult:
    chunks: list[str]
    accuracy: list[list[float]]  # R[s][j]: accuracy on chunk j after training on chunks 0..s
    runs: list[dict[str, Any]]  # each stage's experiment row

    @property
    def learning(self) -> float:
        """Mean accuracy on each chunk right after learning it, (1/S) Σ_s R_{s,s}."""
        return sum(self.accuracy[s][s] for s in range(len(self.chunks))) / len(self.chunks)


def backward_transfer(accuracy: Sequence[Sequence[float]]) -> float:
    """BWT = (1/(S−1)) Σ_{j<S} (R_{S,j} − R_{j,j}): negative when later chunks make the model forget."""
    S = len(accuracy)
    if S < 2:
        raise ValueError("backward transfer needs at least two chunks")
    return sum(accuracy[-1][j] - accuracy[j][j] for j in range(S - 1)) / (S - 1)


def lifelong(specs: Sequence[Any], run: Callable[..., Any]) -> LifelongResult:
    """Train ``specs`` (one :class:`~lorafam_nb.experiment.RunSpec` per chunk, in order) on one model, each
    stage continuing from the last, and evaluate every chunk after every stage.

    ``run`` is :func:`lorafam_nb.experiment.run` (passed in so that stages are recorded like every run of
    the book). Stage s trains on ``specs[s].task`` and is evaluated on every chunk (``eval_on``).
    """
    chunks = [s.task for s in specs]
    if len(set(chunks)) != len(chunks):
        raise ValueError(f"each stage trains on its own chunk; got {chunks}")
    model, accuracy, rows = None, [], []
    for spec in specs:
        out = run(dataclasses.replace(spec, eval_on=tuple(chunks)), model)
        model = out.model
        accuracy.append([out.row["per_task"][c] for c in chunks])
        rows.append(out.row)
    return LifelongResult(chunks, accuracy, rows)
