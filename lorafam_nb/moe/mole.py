"""MoLE: Mixture of LoRA Experts (Wu, Huang, Wei; ICLR 2024; arXiv 2404.13628).

Composing already-trained LoRAs by arithmetic either disturbs the base model (a plain sum) or dilutes each
LoRA (a normalised average). MoLE keeps N separately trained LoRAs and the base frozen and learns, per
layer, a gate that reads the LoRAs' own outputs and weighs them per input sample:

    E_Ω(x) = Norm(E_0(x) ⊕ … ⊕ E_{N−1}(x)),   ε = E_Ω(x)ᵀ e ∈ R^N,   G_i = exp(ε_i/τ) / Σ_j exp(ε_j/τ)
    O(x) = F_θ(x) + Σ_i G_i E_i(x),           E_i(x) = s_i B_i A_i drop(x) on every adapted linear
    L = L_D + α L_balance,   L_balance = −log Π_i q_i = −Σ_i log q_i,   q_i = (1/M) Σ_{k=1}^{M} mean_batch G_i^{(k)}

with e ∈ R^{ξ×N} and a learnable temperature τ per gate, M gates. Only e and τ train (stage 2); stage 1
trains the N LoRAs, each on its own task (:mod:`.separate`). At inference any set S of LoRAs can be
masked without retraining: Ĝ_i = G_i 1[i ∉ S] / Σ_{j ∉ S} G_j (:func:`mask_loras`).

Choices where the paper leaves room (⚠), and why:

* **Granularity:** one gate per transformer layer (l-MoLE, the paper's best with b-MoLE); ``layers_per_gate``
  g > 1 lets g consecutive layers share one gate (the coarser b-/n-MoLE levels). The gate of a group reads
  the N LoRA outputs E_i of the group's *first* adapted linear (the attention query), the only outputs that
  exist before the group's linears need their weights; its G weighs every adapted linear of the group.
* **Pooled, not flattened:** E_i is averaged over each sample's real tokens before the gate (ξ = N·d_out
  instead of N·L·d_out: the paper's flatten would tie the gate to one sequence length); Norm is a layer
  normalisation without parameters over the concatenated N·d_out vector (the released code L2-normalises
  its input; a layer norm keeps the logits' scale independent of N and d).
* e starts with columns of norm 0.01 (the released code's initialiser), so the gate starts uniform; τ starts
  at 1 and is clamped to [1, 3] after every optimizer step (the released training script's range).
* The loss is the paper's Eq. (balance), weight α = 0.5, not the entropy bonus of the released text-to-image
  script; q averages over the M gates and the batch, and −Σ log clamps q at 1e-8.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterContext, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Site, register_method
from ..trainer import Callback, Trainer
from .routers import router_dtype
from .separate import RankedLoRAs, SeparateLoRAsConfig, pool_rows

__all__ = ["ClampTemperature", "MoLEConfig", "MoLEGate", "MoLELinear", "gates_of", "mask_loras"]

GATE_INIT_NORM = 0.01  # each column of e starts with this L2 norm (the released code's initialiser)


class MoLEGate(nn.Module):
    """One gate: ``e`` (N·d × N) and the temperature τ, in at least float32. Reads the N LoRA outputs of
    each sample pooled over its tokens, (rows, N, d), and returns (logits ε, weights G), each (rows, N).
    ``mask`` (N,) is 0 for LoRAs masked at inference (not saved); ``weights`` holds the current forward's G
    for the other linears of the gate's group."""

    def __init__(self, num_loras: int, d: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        e = torch.randn(num_loras * d, num_loras, dtype=dtype, device=device)
        self.e = nn.Parameter(e * GATE_INIT_NORM / e.norm(dim=0, keepdim=True))
        self.temperature = nn.Parameter(torch.ones((), dtype=dtype, device=device))
        self.register_buffer("mask", torch.ones(num_loras, dtype=dtype, device=device), persistent=False)
        self.weights: Tensor | None = None

    @property
    def num_loras(self) -> int:
        return self.e.shape[1]

    def forward(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        v = outputs.reshape(outputs.shape[0], -1).to(self.e.dtype)
        logits = F.layer_norm(v, v.shape[-1:]) @ self.e
        weights = torch.softmax(logits / self.temperature, -1)
        if not bool((self.mask == 1).all()):
            kept = weights * self.mask
            weights = kept / kept.sum(-1, keepdim=True)
        return logits, weights

    def extra_repr(self) -> str:
        return f"num_loras={self.num_loras}, d={self.e.shape[0] // self.num_loras}"


class MoLELinear(AdapterLayer):
    """``nn.Linear`` plus N frozen LoRAs weighted per sample by its group's gate:
    ``h = W_0 x + b_0 + Σ_i G_i s B_i A_i drop(x)``. The group's first adapted linear (``reads_gate``) feeds the
    gate its N LoRA outputs; the other linears of the group use the G of the same forward."""

    def __init__(self, base_layer: nn.Linear, experts: RankedLoRAs, gate: MoLEGate, reads_gate: bool,
                 lora_dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        self.experts, self.reads_gate = experts, reads_gate
        self.gate = gate  # a submodule for model.to(...); saved once, by the scope
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        rows = x.shape[0]
        flat = self.lora_dropout(x.reshape(-1, x.shape[-1]))
        per_row = flat.shape[0] // rows
        if self.reads_gate:
            outputs = self.experts.outputs(flat)  # (T, N, d_out): E_i of every token
            pooled = pool_rows(outputs.view(rows, per_row, -1), self.context).view(rows, *outputs.shape[1:])
            logits, weights = self.gate(pooled)
            self.gate.weights = weights
            self.context.route(self.site, logits, weights, None, weights)  # one routing per sample
            delta = (outputs * weights.repeat_interleave(per_row, 0).to(outputs.dtype)[..., None]).sum(1)
        else:
            weights = self.gate.weights
            if weights is None or weights.shape[0] != rows:
                raise ValueError(f"{self.site}: its gate reads the first adapted linear of its group, which did not "
                                 f"run for this forward ({rows} rows here)")
            delta = self.experts.mix(flat, weights.repeat_interleave(per_row, 0))
        return h + delta.view(h.shape).to(h.dtype)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The LoRAs: the gate is the scope's to save (once per group)."""
        return {k: v for k, v in super().adapter_state_dict().items() if not k.startswith("gate.")}


class ClampTemperature(Callback):
    """After every optimizer step, clamp each gate's τ to [low, high] (the released training script: [1, 3])."""

    def __init__(self, model: AdapterModel, low: float, high: float) -> None:
        self.gates, self.low, self.high = gates_of(model), low, high

    def on_step_end(self, trainer: Trainer) -> None:
        with torch.no_grad():
            for gate in self.gates:
                gate.temperature.clamp_(self.low, self.high)


@register_method
@dataclass
class MoLEConfig(SeparateLoRAsConfig):
    """MoLE's hyperparameters: ``num_experts`` N LoRAs of rank ``r`` (or ``ranks``), ``lora_alpha``,
    ``lora_dropout``; ``layers_per_gate`` (1: l-MoLE, a gate per layer), the balance weight α
    ``balance_weight`` and τ's range [``temperature_min``, ``temperature_max``]."""

    layers_per_gate: int = 1
    balance_weight: float = 0.5
    temperature_min: float = 1.0
    temperature_max: float = 3.0

    method = "mole"
    card = MethodCard(
        title="MoLE", paper="Wu, Huang, Wei, ICLR 2024", arxiv="2404.13628", date="2024-04",
        idea=r"keep separately trained LoRAs frozen and learn per layer a gate that weighs their outputs per "
             r"sample (softmax with a learnable temperature, a balance loss); masking a LoRA renormalises the rest",
        trains=r"$A_i$, $B_i$ per task (stage 1, each on its own data); each gate's $e$ and $\tau$ (stage 2)",
        frozen=r"$W_0$; the LoRAs in stage 2", mergeable=False,
        params=r"N\,r(d_{in}+d_{out})", chapter="mole", bibkey="wu2024mole",
        params_note=r"N LoRAs (stage 1); plus one gate $N^2d_{out}+1$ per layer, on its first linear's LoRA "
                    r"outputs; stage 2 trains only the gates",
        merge_note="the gate weighs the LoRAs per input sample",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layers_per_gate, int) or self.layers_per_gate < 1:
            raise ValueError(f"layers_per_gate must be a positive integer, got {self.layers_per_gate!r}")
        if self.balance_weight < 0:
            raise ValueError(f"balance_weight α must be non-negative, got {self.balance_weight}")
        if not 0 < self.temperature_min <= 1 <= self.temperature_max:
            raise ValueError(f"τ starts at 1: need 0 < temperature_min ≤ 1 ≤ temperature_max, got "
                             f"[{self.temperature_min}, {self.temperature_max}]")

    def gate_key(self, site: Site) -> str:
        """The gate of ``site``: its layer's group of ``layers_per_gate`` consecutive layers."""
        return "mole_gate_out" if site.block is None else f"mole_gate_{site.block // self.layers_per_gate}"

    def build_layer(self, site: Site, scope: AdapterScope) -> MoLELinear:
        key = self.gate_key(site)
        first = key not in scope.entries
        w = site.module.weight
        gate = scope.shared(key, lambda: MoLEGate(self.num_experts, site.d_out, dtype=router_dtype(w.dtype),
                                                  device=w.device))
        return MoLELinear(site.module, self.make_experts(site), gate, first, self.lora_dropout)

    def model_parameters(self, sites: list[Site]) -> int:
        """The N LoRAs on every site, plus one gate N·N·d_out + 1 per group, d_out that of its first site."""
        readers: dict[str, Site] = {}
        for site in sites:
            readers.setdefault(self.gate_key(site), site)
        return super().model_parameters(sites) + sum(self.num_experts ** 2 * s.d_out + 1 for s in readers.values())

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """One adapted d_out × d_in linear: the N LoRAs, Σ_i r_i (d_in + d_out) (gates are per layer group)."""
        return sum(self.expert_ranks()) * (d_in + d_out)

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, Any]]:
        """:meth:`~SeparateLoRAsConfig.expert_candidates` × the gate granularities (one g per distinct
        number of gates, ⌈L/g⌉)."""
        layers = len({s.block for s in sites})
        spans: dict[int, int] = {}
        for g in range(1, layers + 1):
            spans.setdefault(-(-layers // g), g)
        return [{**values, "layers_per_gate": g} for values in cls.expert_candidates() for g in spans.values()]

    @classmethod
    def budget_order(cls, values: dict[str, Any], count: int, target: int) -> tuple[float, ...]:
        """Matched first, then the number of LoRAs nearest the default, then the finest gates (l-MoLE), then
        the nearest count."""
        return (*cls.expert_order(values, count, target), values["layers_per_gate"], abs(count - target), -values["r"])

    def aux_loss_weights(self) -> dict[str, float]:
        return {"balance": self.balance_weight}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        """−Σ_i log q_i, q_i the weight of LoRA i averaged over the samples and the M gates of the forward."""
        routes = [r for r in context.routes if r.probs.shape[0]]
        if not routes or self.balance_weight == 0:
            return {}
        q = torch.stack([r.probs.mean(0) for r in routes]).mean(0)
        return {"balance": -q.clamp_min(1e-8).log().sum()}

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        return [ClampTemperature(model, self.temperature_min, self.temperature_max)]


def gates_of(model: AdapterModel) -> list[MoLEGate]:
    """The model's gates, in layer order."""
    return [m for m in model.adapter_scope.entries.values() if isinstance(m, MoLEGate)]


@torch.no_grad()
def mask_loras(model: AdapterModel, masked: Sequence[int] = ()) -> None:
    """Mask the LoRAs ``masked`` (indices) in every gate: the others keep their relative weights,
    Ĝ_i = G_i 1[i ∉ S] / Σ_{j ∉ S} G_j. ``()`` unmasks all."""
    gates = gates_of(model)
    n = gates[0].num_loras
    bad = [i for i in masked if not 0 <= i < n]
    if bad:
        raise ValueError(f"LoRA indices must lie in [0, {n}), got {bad}")
    if len(set(masked)) >= n:
        raise ValueError(f"masking every one of the {n} LoRAs leaves nothing to renormalise; keep at least one")
    for gate in gates:
        gate.mask.fill_(1)
        gate.mask[list(masked)] = 0
