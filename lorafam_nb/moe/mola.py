"""MoLA: MoE LoRA with Layer-wise Expert Allocation (Gao et al., NAACL Findings 2025; arXiv 2402.08562,
first titled "Higher Layers Need More LoRA Experts").

Mixtures of LoRA experts usually give every layer the same number of experts. MoLA keeps top-2 token
routing over LoRA experts on every adapted linear but lets the count N_j vary with the layer j, and
asks where a fixed total of experts is best spent. For each adapted linear t of layer j:

    h = W_0 x + b_0 + (α/r) Σ_{i ∈ TopK} S_i(x) B_i A_i drop(x),   S = renorm_K(TopK(softmax(W_r x), K))

* One router W_r ∈ R^{N_j×d_in} (no bias) per adapted linear, on that linear's input; K = 2.
* Allocations, with the paper's names: □ uniform, △ more experts low (8-6-4-2), ▽ more experts high
  (2-4-6-8), ⋈ hourglass (8-2-2-8), ◇ diamond (2-8-8-2); equal totals have equal parameter counts.
  ``experts_per_layer`` gives N_j per block; :func:`allocation` spreads a scheme over a model's blocks.
* Load balance (the paper adopts it; the authors' code has it off by default): per layer j, over the
  routing of all of its adapted linears together, ``N_j Σ_i f_i P_i`` with f_i the share of the K·T
  selections that chose i (Σ f = 1) and P_i the mean router probability; summed over layers, weight c.
* Init: A Kaiming-uniform, B = 0, router Kaiming-uniform (the authors' code).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core import MethodCard, Route, block_index, register_method
from .layers import LayerwiseTopKConfig, spread
from .losses import pooled_load_balance

__all__ = ["SCHEMES", "MoLAConfig", "allocation", "spread"]

# Experts per block of layers, the model's blocks split into len(scheme) equal groups.
SCHEMES: dict[str, tuple[int, ...]] = {
    "□": (5, 5, 5, 5), "△": (8, 6, 4, 2), "▽": (2, 4, 6, 8), "⋈": (8, 2, 2, 8), "◇": (2, 8, 8, 2),
}


def allocation(scheme: tuple[int, ...] | str, num_layers: int) -> list[int]:
    """N_j for each of ``num_layers`` layers: each entry of ``scheme`` covers an equal run of layers
    (e.g. ▽ = 2-4-6-8 on 32 layers gives 8 layers of 2 experts, then 8 of 4, …)."""
    counts = SCHEMES[scheme] if isinstance(scheme, str) else tuple(scheme)
    if num_layers % len(counts):
        raise ValueError(f"{num_layers} layers cannot be split into {len(counts)} equal groups")
    return [n for n in counts for _ in range(num_layers // len(counts))]


@register_method
@dataclass
class MoLAConfig(LayerwiseTopKConfig):
    """MoLA's hyperparameters: ``experts_per_layer`` (N_j per block index; empty: ``num_experts`` in every
    layer), ``top_k`` K, rank ``r``, ``lora_alpha``, ``lora_dropout`` and ``router_aux_loss_coef`` c."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    num_experts: int = 4
    top_k: int = 2
    experts_per_layer: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 1e-3

    method = "mola"
    card = MethodCard(
        title="MoLA", paper="Gao et al., NAACL Findings 2025", arxiv="2402.08562", date="2024-02",
        idea=r"top-2 mixtures of LoRA experts on every linear, with a number of experts $N_j$ that varies "
             r"by layer; few experts low, more higher up",
        trains=r"$A_i$, $B_i$ per expert; router $W_r$ per linear", frozen=r"$W_0$", mergeable=False,
        params=r"N_j\,r(d_{in}+d_{out})+N_j\,d_{in}", chapter="mola", bibkey="gao2024mola",
        params_note=r"in layer $j$; the router is counted",
        merge_note="top-2 routing per token",
    )

    def load_balance(self, routes: list[Route]) -> Tensor:
        """Σ_j N_j Σ_i f_i P_i, each layer j over the routing of all of its linears (f over K·T picks)."""
        blocks: dict[int | None, list[Route]] = {}
        for route in routes:
            blocks.setdefault(block_index(route.layer), []).append(route)
        # The pooled Switch term counts F over tokens (Σ F = K); the paper's f counts over K·T picks.
        return torch.stack([pooled_load_balance(group) for group in blocks.values()]).sum() / self.top_k
