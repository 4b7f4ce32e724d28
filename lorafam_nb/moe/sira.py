"""SiRA: Sparse Mixture of Low Rank Adaptation (Zhu, Wichers, Lin, Wang, Chen, Shu, Lu, Liu, Luo, Chen and
Meng; Google and MIT CSAIL; arXiv 2311.09179, 2023).

Making LoRA's dense update larger stops paying off; SiRA spends extra parameters *sparsely*: each adapted
linear gets E LoRA experts, each token is routed to its top k of them, every expert processes at most C
tokens of a group (GShard's capacity), and a new *expert dropout* on the gate values curbs over-fitting.
For a group of S tokens x_1..x_S at one frozen linear W_0 (here: the real tokens of one forward pass):

    p_t = softmax(W_g x_t),   g̃_t = renorm_k(TopK(p_t, k))                    (zeros off the top k)
    C = ⌈γ k S / E⌉                                                            (capacity factor γ)
    g_{t,e} = 0 if (t, e) arrives after expert e is full, else g̃_{t,e}        (dropped assignments)
    g_t ← Dropout_{p_ed}(g_t)  in training                                     (expert dropout)
    h_t = W_0 x_t + b_0 + Σ_e g_{t,e} (α/r) B_e A_e x_t

    L_aux = E Σ_e (c_e / S) m_e,   c_e = #{t : argmax_e p_t = e},   m_e = (1/S) Σ_t p_{t,e}

* Experts: A_e Kaiming-uniform, B_e = 0 (the model starts as the base model); router W_g ∈ R^{E×d_in}, no bias.
* Capacity order (GShard): every token's first choice is placed before any second choice, tokens in order
  within a choice; padding uses no capacity. A dropped assignment contributes nothing; a token whose every
  assignment is dropped passes through W_0 alone. Drops are reported to the routing recorder.
* Expert dropout zeroes each kept gate value with probability p_ed and scales the survivors by 1/(1 − p_ed)
  (inverted dropout, ⚠ the paper's rescaling is not recovered); the top-k weights are not renormalised
  afterwards, which would undo it.
* The auxiliary loss is GShard's (first choices, before capacity), one term per adapted linear, averaged over
  the linears and weighted by λ (``router_aux_loss_coef``).
* At evaluation expert dropout is off, and capacity is off unless ``eval_capacity_factor`` is set, so that a
  prediction does not depend on what else is in the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterScope, MethodCard, Route, Site, register_method
from .layers import LayerwiseTopKConfig, MoELoRALinear
from .losses import switch_load_balance
from .routers import Routing, TopKRouter

__all__ = ["SiRAConfig", "SiRALinear", "capacity_mask", "expert_capacity"]


def expert_capacity(num_tokens: int, num_experts: int, k: int, factor: float) -> int:
    """C = ⌈γ k S / E⌉: how many of a group's S tokens one expert may process (γ = 1: exactly the k S / E
    assignments a perfectly balanced router gives each expert)."""
    return math.ceil(factor * k * num_tokens / num_experts)


def capacity_mask(selected: Tensor, num_experts: int, capacity: int, real: Tensor | None = None) -> Tensor:
    """(T, k) bool: whether each of the T·k assignments ``selected`` fits in its expert's ``capacity``.

    Priority as in GShard: all first choices before any second choice, tokens in order within a choice.
    ``real`` (T,) marks non-padding tokens; padding takes no capacity and always fits."""
    num_tokens, k = selected.shape
    order = selected.t().reshape(-1)  # choice-major: token t's j-th choice sits at j·T + t
    counts = F.one_hot(order, num_experts)
    if real is not None:
        counts = counts * real.repeat(k)[:, None]
    before = (counts.cumsum(0) - counts).gather(1, order[:, None]).squeeze(1)  # earlier picks of that expert
    fits = before < capacity
    if real is not None:
        fits = fits | ~real.repeat(k)
    return fits.view(k, num_tokens).t()


class SiRALinear(MoELoRALinear):
    """:class:`~lorafam_nb.moe.layers.MoELoRALinear` with SiRA's routing: a capacity per expert (``capacity_factor``
    γ in training, ``eval_capacity_factor`` in evaluation; None: no limit) and expert dropout on the gates."""

    def __init__(self, base_layer: nn.Linear, router: TopKRouter, num_experts: int, r: int, scaling: float,
                 lora_dropout: float, path: str, capacity_factor: float | None,
                 eval_capacity_factor: float | None, expert_dropout: float) -> None:
        super().__init__(base_layer, router, num_experts, r, scaling, lora_dropout, path)
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.expert_dropout = expert_dropout

    def route(self, flat: Tensor, x: Tensor) -> Routing:
        routing = self.router(flat)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        weights, reported, dropped = routing.weights, routing.selected, 0
        if factor is not None:
            real = self.context.real_tokens(flat)
            tokens = int(real.sum()) if real is not None else flat.shape[0]
            capacity = expert_capacity(tokens, self.experts.num_experts, self.router.k, factor)
            fits = capacity_mask(routing.selected, self.experts.num_experts, capacity, real)
            weights = weights * fits
            reported = routing.selected.masked_fill(~fits, -1)  # the recorder counts kept assignments only
            dropped = int((~fits).sum())  # padding always fits, so these are real tokens' assignments
        self.context.route(self.site, routing.logits, routing.probs, reported, x, dropped=dropped)
        if self.training and self.expert_dropout > 0:
            weights = F.dropout(weights, self.expert_dropout)
        return Routing(routing.logits, routing.probs, weights, routing.selected)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, expert_dropout={self.expert_dropout}")


@register_method
@dataclass
class SiRAConfig(LayerwiseTopKConfig):
    """SiRA's hyperparameters (⚠ the paper's values are not recovered; these follow GShard and the spec):
    ``num_experts`` E, ``top_k`` k, expert rank ``r``, ``lora_alpha``, ``capacity_factor`` γ (None: no limit),
    ``eval_capacity_factor`` (None: no limit at evaluation), ``expert_dropout`` p_ed on the gate values and
    ``router_aux_loss_coef`` λ. ``experts_per_layer`` exists for budget matching (the paper uses one E)."""

    r: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = 1.0
    eval_capacity_factor: float | None = None
    expert_dropout: float = 0.1
    router_aux_loss_coef: float = 0.01

    method = "sira"
    card = MethodCard(
        title="SiRA", paper="Zhu et al., arXiv 2023", arxiv="2311.09179", date="2023-11",
        idea=r"a sparse top-$k$ mixture of LoRA experts per linear with a token capacity per expert "
             r"(GShard) and expert dropout on the gate values against over-fitting",
        trains=r"$A_e$, $B_e$ per expert; router $W_g$ per linear", frozen=r"$W_0$", mergeable=False,
        params=r"E\,r(d_{in}+d_{out})+E\,d_{in}", chapter="sira", bibkey="zhu2023sira",
        params_note=r"the router is counted",
        merge_note="top-k routing per token, with capacity drops",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None for no capacity limit), got {value}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")

    def build_layer(self, site: Site, scope: AdapterScope) -> SiRALinear:
        n = self.experts_at(site)
        return SiRALinear(site.module, self.router(site, n), n, self.r, self.lora_alpha / self.r, self.lora_dropout,
                          self.path, self.capacity_factor, self.eval_capacity_factor, self.expert_dropout)

    def load_balance(self, routes: list[Route]) -> Tensor:
        """GShard's E Σ_e (c_e/S) m_e per adapted linear, c_e over first choices before capacity; mean over linears."""
        return torch.stack([switch_load_balance(r.probs, r.probs.topk(1, dim=-1).indices) for r in routes]).mean()
