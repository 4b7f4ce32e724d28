"""MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning (Zhang, Zou, An, Liu and Zhang; arXiv 2312.02923,
2023; its third version is titled "Split & Merge: Unlocking the Potential of Visual Adapters via Sparse Training").

The adapter is AdaptFormer's, one per ViT block, beside the MLP. With h the block's stream after the attention
residual (T tokens × d),

    out = h + MLP(LN_2 h) + s · (drop(φ(LN_a(h) W_dᵀ + b_d)) W_uᵀ + b_u),   W_d ∈ R^{b×d}, W_u ∈ R^{d×b}

φ = GELU, LN_a the adapter's own (trained) LayerNorm, s = 0.1 fixed, dropout 0.1 on the bottleneck. MoSA keeps
this adapter and its size and changes only how it is trained:

* **Split.** Fixed random masks M_1..M_N cut the entries of a split tensor θ (W_u; W_d as well when it is not
  shared) into N disjoint pieces of equal size (±1 entry): M_i ⊙ M_j = 0 for i ≠ j and Σ_i M_i = 1 (uniform
  scores, sorted into N quantile bins, drawn once per tensor and block). Sparse module i is

      θ^(i) = θ_0 ⊙ (1 − M_i) + θ ⊙ M_i

  the initial value θ_0 everywhere except on its own piece, where it holds the trained entries of θ.
* **Sparse training.** Each forward pass draws i ~ U{1..N} in every block (independently for W_d and W_u when
  both are split) and runs the adapter with θ^(i): only piece i, 1/N of the tensor, receives a gradient.
* **Merge.** Inference uses the mean of the modules, θ̄ = (1/N) Σ_i θ^(i) = θ_0 + (θ − θ_0)/N. For the
  zero-initialised W_u that is θ/N: the pieces put back together, at the scale training saw on average
  (θ̄ = E_i[θ^(i)], the rule of non-inverted dropout). With W_d shared the adapter is linear in W_u, so the merged
  adapter's output is exactly the mean of the N single-module outputs. One adapter of the original shape is
  left: inference costs what a plain adapter costs.
* **Consistency.** Every released script runs a second forward pass (fresh draws) and adds
  ``consistency_weight`` × AdaMix's symmetric KL between the two passes' class distributions (stop-gradient
  targets, ``batchmean``), the same term as :class:`~lorafam_nb.moe.adamix.AdaMixConsistency`, reused here.
  A training step with it updates the pieces drawn in either pass (at most two per block).

Readings pinned against the authors' code (``Theia-4869/MoSA``; the paper's body was not readable here):

* Defaults are those of the released scripts: N = 4, ``share="down"`` (W_d is one dense matrix trained every
  step; only W_u is split), b = 64 (FGVC; 16 for VTAB), s = 0.1, dropout 0.1, consistency weight 1, an adapter in
  every block. The optional second-pass cross-entropy (weight 0 in every script) and the hidden-state MSE
  (``DEEPREG``, off) are not implemented.
* Biases are not partitioned by default (the code's ``BIAS=True`` gives them all-ones masks): each module has
  its own full bias, trained on the steps that draw it and averaged at the merge. ``split_bias=True`` cuts them
  into pieces like the weights, and the trained parameters then equal a plain adapter's exactly.
* Storage: the code keeps N full copies of θ and multiplies their gradients by the masks after ``backward``.
  Here each piece is its own Parameter holding only its entries, so a module that was not drawn has no
  gradient at all and AdamW leaves it alone. (Under the code's PyTorch 1.11, ``zero_grad()`` keeps zero
  gradients, so copies that were not drawn keep moving on stale Adam moments and weight decay: an artefact we
  do not reproduce.) Weight decay therefore only reaches the entries of drawn pieces, never θ_0.
* "Hierarchical sparse strategy" (abstract): nothing in the released code carries that name; it is not
  implemented beyond the consistency term above.

Where the adapter goes: for DINOv2 and ViT (``VISION_BLOCKS``) exactly as above: its input is what enters the
block's second LayerNorm (read by a forward pre-hook on that LayerNorm) and its output is added to the MLP branch
right before the residual add (after DINOv2's layer scale, so the adapter keeps its own scale s). Any other model
lorafam_nb knows gets it beside each feed-forward block (:func:`~lorafam_nb.models.ffn_blocks`), reading the
block's input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (AdapterConfig, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Site, block_index,
                    register_method, require_positive_ints, site_type)
from ..models import ffn_blocks
from ..trainer import Callback
from .adamix import AdaMixConsistency
from .experts import BottleneckAdapters

__all__ = ["MosaConfig", "MoSALayer", "ParallelSite", "PieceLog", "SparseModules", "VISION_BLOCKS", "VisionBlock",
           "mosa_layers"]

LN_EPS = 1e-6  # LN_a's eps in the released code (the ViT's own)
SHARES = ("down", "up", None)


class SparseModules(nn.Module):
    """The N sparse modules θ^(1..N) of one tensor θ: a fixed random partition of its entries into N pieces.

    Piece k is the Parameter ``pieces[k]``, the entries of θ on M_k (flat positions ``index_k``, saved with the
    adapter so that a reload keeps the masks); off its piece, module k holds the initial value θ_0 (the buffer
    ``init``, None when θ_0 = 0). ``disjoint=False`` (the code's unsplit biases) or N = 1 gives all-ones masks:
    each module is a full copy of its own, and N = 1 is one dense tensor.
    """

    def __init__(self, init: Tensor, num_modules: int, disjoint: bool = True, name: str = "tensor") -> None:
        super().__init__()
        require_positive_ints(num_modules=num_modules)
        self.shape, self.numel, self.num_modules = tuple(init.shape), init.numel(), num_modules
        self.disjoint = disjoint and num_modules > 1
        if not self.disjoint:
            self.pieces = nn.ParameterList([nn.Parameter(init.clone()) for _ in range(num_modules)])
            self.register_buffer("init", None)
            return
        if self.numel < num_modules:
            raise ValueError(f"cannot cut {name} ({self.numel} entries) into {num_modules} non-empty pieces; use fewer "
                             "modules, a wider adapter, or split_bias=False for biases")
        # The released pruner: scores u ~ U(0, 1), piece k = the entries whose score falls in the k-th of N equal
        # quantile bins. Sorting positions by score and cutting the order in N runs is the same partition.
        order = torch.rand(self.numel, device=init.device).argsort()
        cuts = [k * self.numel // num_modules for k in range(num_modules + 1)]
        flat = init.reshape(-1)
        self.pieces = nn.ParameterList()
        for k in range(num_modules):
            index = order[cuts[k]:cuts[k + 1]].sort().values
            self.register_buffer(f"index_{k}", index)
            self.pieces.append(nn.Parameter(flat[index].clone()))
        self.register_buffer("init", init.detach().clone() if bool(init.any()) else None)

    def index(self, k: int) -> Tensor:
        """The flat positions of piece k (the support of M_k)."""
        return getattr(self, f"index_{k}")

    def module(self, k: int) -> Tensor:
        """θ^(k) = θ_0 ⊙ (1 − M_k) + θ ⊙ M_k, differentiable in piece k only."""
        if not self.disjoint:
            return self.pieces[k]
        piece = self.pieces[k]
        base = self.init.reshape(-1) if self.init is not None else piece.new_zeros(self.numel)
        return base.index_put((self.index(k),), piece).view(self.shape)

    def assembled(self) -> Tensor:
        """θ: every piece put back in its place (the tensor the masks partition)."""
        if not self.disjoint:
            if self.num_modules == 1:
                return self.pieces[0]
            raise ValueError("full copies (all-ones masks) are not pieces of one tensor; see merged()")
        flat = self.pieces[0].new_zeros(self.numel)
        for k, piece in enumerate(self.pieces):
            flat = flat.index_put((self.index(k),), piece)
        return flat.view(self.shape)

    def masks(self) -> Tensor:
        """(N, *shape) bool: M_1..M_N."""
        if not self.disjoint:
            return torch.ones(self.num_modules, *self.shape, dtype=torch.bool, device=self.pieces[0].device)
        out = torch.zeros(self.num_modules, self.numel, dtype=torch.bool, device=self.pieces[0].device)
        for k in range(self.num_modules):
            out[k, self.index(k)] = True
        return out.view(self.num_modules, *self.shape)

    def merged(self) -> Tensor:
        """θ̄ = (1/N) Σ_k θ^(k), the released code's merge (``MERGE='add'``)."""
        if self.num_modules == 1:
            return self.module(0)
        return torch.stack([self.module(k) for k in range(self.num_modules)]).mean(0)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, num_modules={self.num_modules}, disjoint={self.disjoint}"


class MoSALayer(AdapterLayer):
    """A frozen module (``base_layer``) plus MoSA's adapter added to its output.

    The adapter reads h: the input of ``tap`` (a pre-hook keeps it until this layer runs) when given, else this
    layer's own input (a feed-forward block's). Training: module i of W_d (and its bias) and module j of W_u (and
    its bias) drawn uniformly per forward pass, each split projection's draw reported to the routing recorder
    (``<site>.down`` / ``<site>.up``: every token to the drawn module). Evaluation: the merged adapter.
    """

    def __init__(self, base_layer: nn.Module, d: int, adapter_dim: int, num_experts: int, share: str | None = "down",
                 split_bias: bool = False, adapter_scale: float | None = 0.1, adapter_dropout: float = 0.1,
                 tap: nn.Module | None = None) -> None:
        super().__init__(base_layer)
        ref = next(base_layer.parameters())
        kw = {"dtype": ref.dtype, "device": ref.device}
        b, n_down, n_up = adapter_dim, (1 if share == "down" else num_experts), (1 if share == "up" else num_experts)
        self.num_experts, self.share = num_experts, share
        self.norm = nn.LayerNorm(d, eps=LN_EPS, **kw)
        w_down = torch.empty(b, d, **kw)
        nn.init.kaiming_uniform_(w_down, a=math.sqrt(5))  # every module starts from the same draw, as in the code
        self.down = SparseModules(w_down, n_down, name="W_down")
        self.down_bias = SparseModules(torch.zeros(b, **kw), n_down, disjoint=split_bias, name="b_down")
        self.up = SparseModules(torch.zeros(d, b, **kw), n_up, name="W_up")  # 0: the adapter starts silent
        self.up_bias = SparseModules(torch.zeros(d, **kw), n_up, disjoint=split_bias, name="b_up")
        self.dropout = nn.Dropout(adapter_dropout)
        # The code's SCALAR=None: a learnable scalar starting at 1.
        self.scaling: float | nn.Parameter = (nn.Parameter(torch.ones(1, **kw)) if adapter_scale is None
                                              else adapter_scale)
        self._h: Tensor | None = None
        self._tap_hook = tap.register_forward_pre_hook(self._remember_input) if tap is not None else None

    def _remember_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._h = args[0]

    def _adapter_input(self, x: Tensor) -> Tensor:
        if self._tap_hook is None:
            return x
        h, self._h = self._h, None  # taken once: a stale h from another forward must never be reused
        if h is None:
            raise RuntimeError(f"MoSA layer {self.site or type(self.base_layer).__name__} ran before its block's "
                               "LayerNorm: call the whole block (or model), not this layer alone")
        return h

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        h = self._adapter_input(x)
        return self.base_layer(x, *args, **kwargs) + self.adapter(h)

    def adapter(self, h: Tensor) -> Tensor:
        """The adapter branch on h: one random module per split projection in training, merged in evaluation."""
        if not self.training:
            return self.merged_branch(h)
        i, j = self._draw("down", self.down.num_modules, h), self._draw("up", self.up.num_modules, h)
        return self.branch(h, i, j)

    def _draw(self, name: str, n: int, h: Tensor) -> int:
        if n == 1:
            return 0
        k = int(torch.randint(n, (1,)))
        tokens = h.shape[:-1].numel()
        probs = torch.full((tokens, n), 1 / n, device=h.device)
        self.context.route(f"{self.site}.{name}", probs.log(), probs,
                           torch.full((tokens, 1), k, dtype=torch.long, device=h.device), h)
        return k

    def _run(self, h: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor) -> Tensor:
        z = self.dropout(F.gelu(F.linear(self.norm(h), w_down, b_down)))
        return self.scaling * F.linear(z, w_up, b_up)

    def branch(self, h: Tensor, i: int, j: int) -> Tensor:
        """s · (drop(φ(LN_a(h) W_d^(i)ᵀ + b_d^(i))) W_u^(j)ᵀ + b_u^(j)): module i of W_d, module j of W_u."""
        return self._run(h, self.down.module(i), self.down_bias.module(i), self.up.module(j), self.up_bias.module(j))

    def merged_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W̄_d, b̄_d, W̄_u, b̄_u): each tensor's mean over its modules, a shared one itself (not ``merged``: that
        name is the core's merge flag)."""
        return self.down.merged(), self.down_bias.merged(), self.up.merged(), self.up_bias.merged()

    def merged_branch(self, h: Tensor) -> Tensor:
        return self._run(h, *self.merged_weights())

    @torch.no_grad()
    def merged_adapter(self) -> BottleneckAdapters:
        """The inference adapter as a plain bottleneck adapter (applied after ``norm``, LN_a): one W_d, one W_u."""
        w_down, b_down, w_up, b_up = self.merged_weights()
        plain = BottleneckAdapters(w_down.shape[1], w_down.shape[0], 1, 1, bias=True, scaling=float(self.scaling),
                                   dtype=w_down.dtype, device=w_down.device)
        for target, value in ((plain.down, w_down), (plain.down_bias, b_down), (plain.up, w_up), (plain.up_bias, b_up)):
            target.copy_(value[None])
        return plain

    def extra_repr(self) -> str:
        scale = "learned" if isinstance(self.scaling, nn.Parameter) else f"{self.scaling:g}"
        tapped = self._tap_hook is not None
        return f"num_experts={self.num_experts}, share={self.share!r}, scaling={scale}, tapped={tapped}"


def mosa_layers(model: AdapterModel) -> dict[str, MoSALayer]:
    return {n: layer for n, layer in model.adapter_layers().items() if isinstance(layer, MoSALayer)}


@dataclass(frozen=True)
class VisionBlock:
    """Where a vision transformer's block keeps what AdaptFormer needs, by names relative to the block: ``tap``
    is the LayerNorm whose input is h (the stream after attention), ``out`` the module whose output is the MLP
    branch just before the residual add (only dropout or drop-path between them)."""

    block: str  # the block's class name
    tap: str
    out: str


VISION_BLOCKS: dict[str, VisionBlock] = {
    # After DINOv2's layer scale: the adapter's scale is s alone.
    "dinov2": VisionBlock("Dinov2Layer", tap="norm2", out="layer_scale2"),
    "vit": VisionBlock("ViTLayer", tap="layernorm_after", out="mlp"),
}


@dataclass(frozen=True)
class ParallelSite(Site):
    """A :class:`~lorafam_nb.core.Site` whose adapter reads the input of another module of the block (``tap``)."""

    tap: nn.Module | None = field(default=None, compare=False, repr=False)


@register_method
@dataclass
class MosaConfig(AdapterConfig):
    """MoSA's hyperparameters (the released config's names in brackets): ``num_experts`` N (``EXPERT_NUM``),
    ``adapter_dim`` b (``BOTTLENECK_SIZE``), ``share`` the projection kept dense (``SHARE``: "down", "up", or None
    to split both), ``split_bias`` (the opposite of ``BIAS``), ``adapter_scale`` s (``SCALAR``; None: learned),
    ``adapter_dropout`` (``DROPOUT``) and ``consistency_weight`` λ_reg (``REG_WEIGHT``; 0: no second pass).
    N = 1 is a plain AdaptFormer adapter, the baseline at equal parameters. The sites are every block of a
    DINOv2/ViT (or every feed-forward block of a text model); ``target_modules`` is not used."""

    num_experts: int = 4
    adapter_dim: int = 64
    share: str | None = "down"
    split_bias: bool = False
    adapter_scale: float | None = 0.1
    adapter_dropout: float = 0.1
    consistency_weight: float = 1.0

    method = "mosa"
    modality: ClassVar[str] = "vision"
    budget_knob: ClassVar[str] = "adapter_dim"
    card = MethodCard(
        title="MoSA", paper="Zhang et al., 2023", arxiv="2312.02923", date="2023-12",
        idea=r"cut one adapter's entries into $N$ disjoint random sparse modules, train one module drawn at random "
             r"per forward pass, and average the modules back into one adapter for inference",
        trains=r"$W_{down}$ (shared), the $N$ disjoint pieces of $W_{up}$, one $b_{up}$ per module, $\mathrm{LN}_a$",
        frozen=r"all base weights", mergeable=False,
        params=r"2\,b\,d_{out}+b+N\,d_{out}+2d_{out}", chapter="mosa", bibkey="zhang2023mosa",
        params_note=r"per block, $W_{down}$ shared and biases not split; after merging (or with split biases) "
                    r"a plain adapter with its LayerNorm, $2d_{out}b+b+3d_{out}$",
        merge_note="the sparse modules merge into one adapter, but an adapter is nonlinear: it does not fold into W",
    )

    def __post_init__(self) -> None:
        require_positive_ints(num_experts=self.num_experts, adapter_dim=self.adapter_dim)
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES} (the projection kept dense; None splits both), "
                             f"got {self.share!r}")
        if self.adapter_scale is not None and not (isinstance(self.adapter_scale, (int, float))
                                                   and math.isfinite(self.adapter_scale) and self.adapter_scale > 0):
            raise ValueError(f"adapter_scale must be a positive number (or None for a learned scale), "
                             f"got {self.adapter_scale!r}")
        if not 0 <= self.adapter_dropout < 1:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be non-negative, got {self.consistency_weight}")

    def splits(self) -> tuple[bool, bool]:
        """Whether (W_down, W_up) are split into N modules."""
        return self.num_experts > 1 and self.share != "down", self.num_experts > 1 and self.share != "up"

    def sites(self, model: nn.Module) -> list[Site]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        layout = VISION_BLOCKS.get(model_type)
        if layout is None:
            try:
                return ffn_blocks(model)
            except ValueError as err:
                raise ValueError(f"MoSA adapts the blocks of {sorted(VISION_BLOCKS)} vision transformers or the "
                                 f"feed-forward blocks of a model lorafam_nb.models knows; {type(model).__name__} "
                                 f"is neither ({err})") from err
        d = model.config.hidden_size
        sites: list[Site] = []
        for name, block in model.named_modules():
            if type(block).__name__ == layout.block:
                out = f"{name}.{layout.out}"
                sites.append(ParallelSite(name=out, module=block.get_submodule(layout.out), block=block_index(out),
                                          module_type=site_type(out), d_in=d, d_out=d, kind="parallel",
                                          tap=block.get_submodule(layout.tap)))
        if not sites:
            raise ValueError(f"found no {layout.block} block in {type(model).__name__} (model_type {model_type!r})")
        return sites

    def build_layer(self, site: Site, scope: AdapterScope) -> MoSALayer:
        tap = getattr(site, "tap", None)
        if site.kind not in ("parallel", "ffn") or (site.kind == "parallel" and tap is None):
            raise ValueError(f"MoSA needs the sites of MosaConfig.sites (a vision block, or a feed-forward block); "
                             f"got a {site.kind!r} site at {site.name}")
        return MoSALayer(site.module, site.d_out, self.adapter_dim, self.num_experts, self.share, self.split_bias,
                         self.adapter_scale, self.adapter_dropout, tap=tap)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trained per block of width d = d_out: W_d and W_u (b d each: the pieces of a split one add up to it), the
        biases (N copies of a split projection's bias unless ``split_bias``), LN_a (2d) and a learned scale."""
        b, N, d = self.adapter_dim, self.num_experts, d_out
        split_down, split_up = self.splits()
        down_copies, up_copies = (N if split and not self.split_bias else 1 for split in (split_down, split_up))
        return 2 * b * d + down_copies * b + up_copies * d + 2 * d + (self.adapter_scale is None)

    def inference_parameters(self, sites: list[Site]) -> int:
        """What the merged model keeps: one plain adapter and LN_a per block, 2 d b + b + d + 2d (+ a learned scale)."""
        return sum(2 * s.d_out * self.adapter_dim + self.adapter_dim + 3 * s.d_out + (self.adapter_scale is None)
                   for s in sites)

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        return [AdaMixConsistency(self.consistency_weight)] if self.consistency_weight > 0 else []


class PieceLog(Callback):
    """What a chapter reads off MoSA's pieces of W_u during a run, kept in the run's record (``record`` /
    ``restore``), so that a run read back from the results store gives it too.

    Per optimizer step and MoSA layer (``names``): ``drawn``, the W_u modules the routing recorder saw drawn in
    that step's forward passes (one, or two with the consistency pass; always [0] when N = 1), and ``updated``,
    the pieces whose entries the step changed. At the end of training, per layer: ``piece_norms`` (‖θ ⊙ M_k‖
    for each piece k), ``merged_norms`` (‖W̄_u‖, the served up-projection) and ``down_change``
    (‖W̄_d − W_d(0)‖ / ‖W_d(0)‖)."""

    record_name = "mosa_pieces"
    FIELDS = ("names", "drawn", "updated", "piece_norms", "merged_norms", "down_change")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.drawn: list[list[list[int]]] = []
        self.updated: list[list[list[int]]] = []
        self.piece_norms: list[list[float]] = []
        self.merged_norms: list[float] = []
        self.down_change: list[float] = []

    def settings(self) -> dict[str, Any]:
        return {}  # it is given nothing: the key needs no settings

    def on_train_begin(self, trainer: Any) -> None:
        self._layers = mosa_layers(trainer.model)
        self.names = list(self._layers)
        self._before = self._pieces()
        self._down0 = {n: layer.down.merged().detach().clone() for n, layer in self._layers.items()}
        self._seen: dict[str, tuple[Any, Tensor]] = {}

    def _pieces(self) -> dict[str, list[Tensor]]:
        return {n: [p.detach().clone() for p in layer.up.pieces] for n, layer in self._layers.items()}

    def _drawn(self, trainer: Any, name: str) -> list[int]:
        """The W_u modules drawn since the previous step: the recorder's counts, less what it held then (the
        trainer resets it at each logged step, so the counts are this step's alone when ``log_every`` = 1)."""
        if self._layers[name].up.num_modules == 1:
            return [0]
        stats = trainer.model.recorder.layers.get(f"{name}.up")
        if stats is None:
            return []
        tokens = stats.tokens.clone()
        last = self._seen.get(name)
        delta = tokens - last[1] if last is not None and last[0] is stats else tokens
        self._seen[name] = (stats, tokens)
        return [k for k, n in enumerate(delta.tolist()) if n > 0]

    def on_step_end(self, trainer: Any) -> None:
        after = self._pieces()
        self.drawn.append([self._drawn(trainer, n) for n in self.names])
        self.updated.append([[k for k, (a, b) in enumerate(zip(self._before[n], after[n])) if not torch.equal(a, b)]
                             for n in self.names])
        self._before = after

    @torch.no_grad()
    def on_train_end(self, trainer: Any) -> None:
        layers = self._layers
        self.piece_norms = [[float(p.norm()) for p in layer.up.pieces] for layer in layers.values()]
        self.merged_norms = [float(layer.up.merged().norm()) for layer in layers.values()]
        self.down_change = [float((layer.down.merged() - self._down0[n]).norm() / self._down0[n].norm())
                            for n, layer in layers.items()]

    def record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def restore(self, data: dict[str, Any]) -> None:
        for name in self.FIELDS:
            setattr(self, name, data[name])
