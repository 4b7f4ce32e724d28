"""AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning (Wang, Agarwal, Mukherjee, Liu, Gao,
Awadallah and Gao; EMNLP 2022; arXiv 2205.12410).

One adapter per layer underfits; AdaMix trains M copies of it per layer, routes each forward pass through
a randomly chosen copy (no router, no balance loss), ties two random passes together with a consistency
loss, and at inference averages the copies' weights into one adapter, so serving costs one adapter.

The adapter flavour (the paper's GLUE experiments), on the output h = F(x) of every FFN block (BERT: after
``output.dense``, before dropout, residual and LayerNorm; Llama: after ``down_proj``):

    AdaMix(h) = h + W^up_j GELU(W^down_i h + b^down_i) + b^up_j,   W^down_i ∈ R^{b×d}, W^up_j ∈ R^{d×b}

* **Stochastic routing (training).** Every forward pass draws i ~ U{1..M} and, independently, j ~ U{1..N},
  separately in every layer and for the whole batch. The released code's default shares the
  up-projection (``sharing_up=1``: N = 1) and keeps M = 4 down-projections.
* **Consistency.** The same batch runs twice with independent draws, giving scores z^A, z^B, and

      L = CE(z^A, y) + w · ½ [KL(sg[p^B] ‖ p^A) + KL(sg[p^A] ‖ p^B)],   p = softmax(z), w = 1

  (the released ``symmetric_KL_loss``: targets detached, ``batchmean``; CE on the first pass only). The
  scores here are the task's choice scores (a classifier's logits, or a decoder's per-choice scores).
* **Merging (inference).** The copies are averaged, W̄^down = (1/M) Σ_i W^down_i, b̄^down likewise (and the
  up-projections), and one adapter runs (``inference_level=3``). Each single copy can be evaluated too
  (:func:`use_module`), for the paper's comparison of the average with its members.
* **Init (the released GLUE code).** BERT's ``init_weights`` draws every copy's weights from N(0, 0.02²),
  independently, biases 0: the copies differ from step 0 (the spec sheet's "identical deep copies" is
  the constructor's deep copy, which ``init_weights`` then redraws).

The LoRA flavour (GPT-2 experiments: M copies of A, shared B, merged as W_0 + s B Ā) is not implemented.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Site, register_method, require_positive_ints
from ..models import FeedForward, ffn_blocks
from ..tasks import score_batch
from ..trainer import Callback
from .experts import BottleneckAdapters

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["AdaMixConfig", "AdaMixConsistency", "AdaMixFFN", "adamix_layers", "symmetric_kl", "use_module"]

INFERENCE_AVERAGE = "average"


class AdaMixFFN(AdapterLayer):
    """A frozen FFN (``base_layer``) with AdaMix's M adapters on its output (``adapters``: M or 1
    down-projections, M or 1 up-projections, with biases).

    Training: a random (down, up) pair per forward pass, reported to the routing recorder as the chosen
    copy of the projection that has M copies (every token of the pass). Evaluation: ``inference`` is
    ``"average"`` (the merged adapter: one down- and one up-projection with the averaged weights) or a copy
    index m (adapter m alone: down m and up m, a shared projection's only copy where shared).
    """

    def __init__(self, base_layer: FeedForward, num_modules: int, adapter_dim: int, share_up: bool = True,
                 share_down: bool = False, init_std: float = 0.02) -> None:
        super().__init__(base_layer)
        w = base_layer.down.weight
        self.num_modules = num_modules
        self.adapters = BottleneckAdapters(base_layer.down.out_features, adapter_dim,
                                           1 if share_down else num_modules, 1 if share_up else num_modules,
                                           bias=True, init_std=init_std, dtype=w.dtype, device=w.device)
        self.inference: str | int = INFERENCE_AVERAGE

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        if self.training:
            i = int(torch.randint(self.adapters.num_down, (1,)))
            j = int(torch.randint(self.adapters.num_up, (1,)))
            self._report(i if self.adapters.num_down > 1 else j, x)
            return h + self.adapters.branch(h, i, j)
        if self.inference == INFERENCE_AVERAGE:
            return h + self.adapters.averaged_branch(h)
        m = self.inference
        return h + self.adapters.branch(h, m if self.adapters.num_down > 1 else 0, m if self.adapters.num_up > 1 else 0)

    def _report(self, module: int, x: Tensor) -> None:
        """The random choice as a routing decision: every token to ``module``, router probability 1/M each."""
        tokens = x.shape[:-1].numel()
        probs = torch.full((tokens, self.num_modules), 1 / self.num_modules, device=x.device)
        chosen = torch.full((tokens, 1), module, dtype=torch.long, device=x.device)
        self.context.route(self.site, probs.log(), probs, chosen, x)

    def extra_repr(self) -> str:
        return f"num_modules={self.num_modules}, inference={self.inference!r}"


def adamix_layers(model: AdapterModel) -> dict[str, AdaMixFFN]:
    return {n: layer for n, layer in model.adapter_layers().items() if isinstance(layer, AdaMixFFN)}


@contextmanager
def use_module(model: AdapterModel, which: str | int) -> Iterator[None]:
    """Evaluate ``model`` with every AdaMix layer's ``which``: ``"average"`` (the merged adapter, the default)
    or a copy index m in [0, M) (adapter m alone in every layer); restored on exit."""
    layers = adamix_layers(model)
    if not layers:
        raise ValueError("the model has no AdaMix layers")
    num_modules = next(iter(layers.values())).num_modules
    if which != INFERENCE_AVERAGE and (not isinstance(which, int) or not 0 <= which < num_modules):
        raise ValueError(f"which must be {INFERENCE_AVERAGE!r} or a module index in [0, {num_modules}), got {which!r}")
    before = {n: layer.inference for n, layer in layers.items()}
    for layer in layers.values():
        layer.inference = which
    try:
        yield
    finally:
        for n, layer in layers.items():
            layer.inference = before[n]


def symmetric_kl(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """½ [KL(sg[p_B] ‖ p_A) + KL(sg[p_A] ‖ p_B)], p = softmax over the last axis, summed over it and averaged
    over rows (``batchmean``). Scores of −inf (a multiple-choice row's absent choices) have p = 0 and add
    nothing.

    A regression head (one score per row, STS-B) has no class distribution. Our reading: each prediction is
    the mean of a unit-variance Gaussian, for which KL(N(b, 1) ‖ N(a, 1)) = (a − b)² / 2, so the term is
    ¼ [(a − sg[b])² + (sg[a] − b)²] averaged over rows (the paper evaluates STS-B without writing this case)."""
    if scores_a.shape != scores_b.shape or scores_a.dim() not in (1, 2):
        raise ValueError(f"AdaMix's consistency compares two (rows, classes) score tensors, or two (rows,) "
                         f"regression outputs; got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")
    a, b = scores_a.float(), scores_b.float()
    if a.dim() == 1:
        return 0.25 * ((a - b.detach()) ** 2 + (a.detach() - b) ** 2).mean()
    keep = torch.isfinite(a) & torch.isfinite(b)
    log_a = a.log_softmax(-1).masked_fill(~keep, 0.0)
    log_b = b.log_softmax(-1).masked_fill(~keep, 0.0)
    p_a, p_b = log_a.exp() * keep, log_b.exp() * keep
    kl_b_a = (p_b.detach() * (log_b.detach() - log_a)).sum(-1)  # KL(sg[p_B] ‖ p_A): the gradient reaches pass A
    kl_a_b = (p_a.detach() * (log_a.detach() - log_b)).sum(-1)  # KL(sg[p_A] ‖ p_B): the gradient reaches pass B
    return 0.5 * (kl_b_a + kl_a_b).mean()


class AdaMixConsistency(Callback):
    """The consistency term: a second forward pass on the trainer's micro-batch (fresh random modules in every
    layer) and ``weight · symmetric_kl`` between its scores and the first pass's."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def extra_loss(self, trainer: Trainer) -> dict[str, Tensor]:
        _, again = score_batch(trainer.model, trainer.train_task, trainer.batch)
        return {"consistency": self.weight * symmetric_kl(trainer.scores, again)}


@register_method
@dataclass
class AdaMixConfig(AdapterConfig):
    """AdaMix's hyperparameters (the released code's names where it has one): ``num_modules`` M
    (``num_experts``), ``adapter_dim`` b (``adapter_size``), ``share_up`` / ``share_down`` (``sharing_up``,
    ``sharing_down``: one copy of that projection), ``consistency_weight`` w (0: no second pass) and
    ``init_std`` of the adapters' weights. M = 1 is a single adapter (Houlsby-style, on the FFN output).
    The sites are every FFN block (:func:`~lorafam_nb.models.ffn_blocks`); ``target_modules`` is not used."""

    num_modules: int = 4
    adapter_dim: int = 16
    share_up: bool = True
    share_down: bool = False
    consistency_weight: float = 1.0
    init_std: float = 0.02

    method = "adamix"
    budget_knob: ClassVar[str] = "adapter_dim"
    card = MethodCard(
        title="AdaMix", paper="Wang et al., EMNLP 2022", arxiv="2205.12410", date="2022-05",
        idea=r"$M$ copies of an adapter per layer, one picked at random per forward pass, two passes tied by a "
             r"consistency loss; the copies are averaged into one adapter for inference",
        trains=r"$W^{down}_i$, $b^{down}_i$ ($M$ copies); shared $W^{up}$, $b^{up}$",
        frozen=r"all base weights", mergeable=False,
        params=r"M(d_{out}\,b+b)+b\,d_{out}+d_{out}", chapter="adamix", bibkey="wang2022adamix",
        params_note=r"per FFN block, up-projection shared; after merging one adapter, $2d_{out}b+b+d_{out}$",
        merge_note="the copies merge into one adapter, but an adapter is nonlinear: it does not fold into W",
    )

    def __post_init__(self) -> None:
        require_positive_ints(num_modules=self.num_modules, adapter_dim=self.adapter_dim)
        if self.share_up and self.share_down and self.num_modules > 1:
            raise ValueError("share_up and share_down together leave one copy of each projection: that is a single "
                             "adapter (num_modules=1), not a mixture")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be non-negative, got {self.consistency_weight}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")

    def copies(self) -> tuple[int, int]:
        """(down-projections, up-projections) per layer."""
        return (1 if self.share_down else self.num_modules), (1 if self.share_up else self.num_modules)

    def sites(self, model: nn.Module) -> list[Site]:
        return ffn_blocks(model)

    def build_layer(self, site: Site, scope: AdapterScope) -> AdaMixFFN:
        return AdaMixFFN(site.module, self.num_modules, self.adapter_dim, self.share_up, self.share_down,
                         self.init_std)

    def site_parameters(self, site: Site) -> int:
        return self.num_parameters(site.d_in, site.d_out)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trained per FFN block of output width d_out: downs · (d_out b + b) + ups · (b d_out + d_out)."""
        downs, ups = self.copies()
        return downs * (d_out * self.adapter_dim + self.adapter_dim) + ups * (self.adapter_dim * d_out + d_out)

    def inference_parameters(self, sites: list[Site]) -> int:
        """What the merged model keeps: one adapter per FFN block, 2 d_out b + b + d_out."""
        return sum(2 * s.d_out * self.adapter_dim + self.adapter_dim + s.d_out for s in sites)

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        return [AdaMixConsistency(self.consistency_weight)] if self.consistency_weight > 0 else []
