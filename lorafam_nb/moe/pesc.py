"""PESC: Parameter-Efficient Sparsity Crafting from Dense to Mixture-of-Experts for Instruction Tuning on
General Tasks (Wu, Zheng, He and Yu; EMNLP 2024; arXiv 2401.02731).

Sparse upcycling copies a dense FFN into n experts and trains every copy. PESC keeps one frozen FFN F that
all experts share (weights θ_o, one physical copy) and makes the experts differ only by a bottleneck
adapter on F's *output*, routed top-k per token. With x the FFN input (after the post-attention norm):

    F(x) = W_down(SiLU(W_gate x) ⊙ W_up x)          (BERT: W_down GELU(W_up x + b_up) + b_down)
    A_i(u) = s · σ(u W^i_down) W^i_up + u,           W^i_down ∈ R^{d×b}, W^i_up ∈ R^{b×d}, σ = GELU
    R(x) = softmax(KeepTopK(W_r x, k)),              W_r ∈ R^{n×d}, no bias
    y = Σ_{i ∈ TopK} R(x)_i A_i(F(x)) = F(x) + Σ_{i ∈ TopK} R(x)_i · s σ(F(x) W^i_down) W^i_up

* The identity part of the k adapters collapses because the k weights sum to 1: F(x) runs once per token.
* Router order: top-k on the logits, then a softmax over the k survivors. That equals Mixtral's order
  (softmax over all n, top k, renormalise): exp(z_i)/Σ_{j∈S} exp(z_j) either way; so :class:`TopKRouter`
  serves, and its probabilities over all n experts feed the load balance.
* The adapter reads the FFN output; the router reads the FFN input. Adapter-input dropout 0.1 (on the
  branch only), no biases, s = ``moe_scaling`` = 1 (the released training script).
* Load balance (Switch): ``L_b = α n Σ_i f_i P_i`` with f_i the share of tokens whose top k holds i (Σ f = k)
  and P_i the mean full-softmax probability, α = 10⁻² (the paper). The released script runs with
  ``output_router_logits=False``, i.e. without it, and its loss function softmaxes the top-k logits only;
  we follow the paper's text, pool all layers' routing into one term (as Mixtral-style code does) and leave
  padding out.
* Init (the released script): W^i_up = 0, so the mixture equals the dense FFN at step 0; W^i_down and W_r
  Kaiming-uniform (a = √5).
* The paper also trains QLoRA (r = 64) on every linear, the shared FFN included. This module is the
  adapter mixture alone; a plain LoRA beside it is another config, and the chapter's comparison with LoRA
  at a matched budget is cleaner without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..core import AdapterConfig, AdapterLayer, AdapterScope, MethodCard, Site, register_method, require_positive_ints
from ..models import FeedForward, ffn_blocks
from .experts import BottleneckAdapters, Dispatch
from .layers import PATHS, PooledLoadBalance, mixture_budget_candidates, mixture_budget_order
from .routers import TopKRouter, router_dtype

__all__ = ["PESCConfig", "PESCFFN"]


class PESCFFN(AdapterLayer):
    """A frozen FFN (``base_layer``, a :class:`~lorafam_nb.models.FeedForward`) upcycled into n experts that
    share it and differ by their bottleneck adapters (``experts``), mixed by a top-k ``router``.

    ``path="dense"`` runs every expert's adapter on every token (weight 0 off the top k), ``"sparse"``
    dispatches each token to its k experts; both give the same output. The adapters are thin (n·b hidden
    units against the FFN's d_ff), so dense is cheap and the default.
    """

    def __init__(self, base_layer: FeedForward, num_experts: int, top_k: int, adapter_dim: int, scaling: float,
                 adapter_dropout: float = 0.1, path: str = "dense") -> None:
        super().__init__(base_layer)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        w = base_layer.down.weight
        d_in, d = base_layer.up.in_features, base_layer.down.out_features
        self.path = path
        self.router = TopKRouter(d_in, num_experts, top_k, dtype=router_dtype(w.dtype), device=w.device)
        self.experts = BottleneckAdapters(d, adapter_dim, num_experts, num_experts, bias=False, scaling=scaling,
                                          dtype=w.dtype, device=w.device)
        self.adapter_dropout = nn.Dropout(adapter_dropout) if adapter_dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)  # on the FFN input
        self.context.route(self.site, routing.logits, routing.probs, routing.selected, x)
        u = self.base_layer(flat)  # F(x), shared by every expert, once per token
        branch = self.adapter_dropout(u)
        if self.path == "sparse":
            delta = self.experts.sparse(branch, Dispatch.build(routing.selected, routing.weights,
                                                               self.experts.num_down))
        else:
            gates = routing.probs.new_zeros(routing.probs.shape).scatter(1, routing.selected, routing.weights)
            delta = self.experts.dense(branch, gates)
        return (u + delta.to(u.dtype)).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"path={self.path}"


@register_method
@dataclass
class PESCConfig(PooledLoadBalance, AdapterConfig):
    """PESC's hyperparameters (the authors' names where they have one): ``num_experts`` n, ``top_k`` k,
    ``adapter_dim`` b, ``moe_scaling`` s, ``adapter_dropout`` and ``router_aux_loss_coef`` α. The sites are
    every FFN block (:func:`~lorafam_nb.models.ffn_blocks`, BERT and Llama layouts); ``target_modules`` is
    not used. ``path``: ``"dense"`` or ``"sparse"`` (see :class:`PESCFFN`)."""

    num_experts: int = 8
    top_k: int = 2
    adapter_dim: int = 64
    moe_scaling: float = 1.0
    adapter_dropout: float = 0.1
    router_aux_loss_coef: float = 0.01
    path: str = "dense"

    method = "pesc"
    budget_knob: ClassVar[str] = "adapter_dim"
    card = MethodCard(
        title="PESC", paper="Wu et al., EMNLP 2024", arxiv="2401.02731", date="2024-01",
        idea=r"upcycle every FFN into a top-2 mixture whose experts share the frozen FFN and differ by a "
             r"bottleneck adapter on its output",
        trains=r"$W^i_{down}$, $W^i_{up}$ per expert; router $W_r$ per FFN",
        frozen=r"all base weights (the FFN is shared by all experts)", mergeable=False,
        params=r"n(2\,d_{out}\,b+d_{in})", chapter="pesc", bibkey="wu2024pesc",
        params_note=r"per FFN block ($d_{in}=d_{out}=d$, $b$ the adapter dim, router counted); the paper's "
                    r"QLoRA on every linear is not part of this config",
        merge_note="token-routed nonlinear adapters: no single weight equals them",
    )

    def __post_init__(self) -> None:
        require_positive_ints(num_experts=self.num_experts, top_k=self.top_k, adapter_dim=self.adapter_dim)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not 0 <= self.adapter_dropout < 1:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be non-negative, got {self.router_aux_loss_coef}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")

    def sites(self, model: nn.Module) -> list[Site]:
        return ffn_blocks(model)

    def build_layer(self, site: Site, scope: AdapterScope) -> PESCFFN:
        return PESCFFN(site.module, self.num_experts, self.top_k, self.adapter_dim, self.moe_scaling,
                       self.adapter_dropout, self.path)

    def site_parameters(self, site: Site) -> int:
        """n (2 d_out b) for the experts' adapters plus n d_in for the router."""
        return self.num_parameters(site.d_in, site.d_out)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Per FFN block of input width d_in and output width d_out: n (2 d_out b + d_in)."""
        return self.num_experts * (2 * d_out * self.adapter_dim + d_in)

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, int]]:
        """Adapter dim b and expert count n together (at the paper's n = 8 a step of b moves MiniLM's count by
        ±5.6 %); b up to 64, the released script's."""
        return mixture_budget_candidates(cls, max_rank=64)

    @classmethod
    def budget_order(cls, values: dict[str, int], count: int, target: int) -> tuple[float, ...]:
        return mixture_budget_order(cls, values, count, target)

