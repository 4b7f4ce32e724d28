"""MoE-LLaVA: Mixture of Experts for Large Vision-Language Models (Lin et al., 2024; arXiv 2401.15947).

Not a LoRA: *sparse upcycling* of a finished dense vision-language model. Stages I (train the projector on
captions) and II (tune the whole LLM densely on instructions) build an ordinary LLaVA; stage III,
"MoE-tuning", turns the FFN of every other decoder layer into a mixture of E full FFNs and trains only those
mixtures. This module is stage III on any model with a known FFN layout
(:func:`~lorafam_nb.models.ffn_blocks`): the stages before it are ordinary training of the model itself.

**The layer.** In a layer ℓ ∈ 𝓜 the FFN input x ∈ R^d (the post-attention-norm hidden state) goes to a
router W_r ∈ R^{E×d} (no bias, float32) and to the E experts FFN_1..FFN_E, each initialised as an exact copy
of the stage-II FFN F:

    p = softmax(W_r x)                                      over all E experts
    e_1 = argmax_e p_e
    e_2 = argmax_{e ≠ e_1} (W_r x + γ)_e,   γ ~ Gumbel(0, 1)^E   (sampled second expert, training)
    g_j = p_{e_j} / (p_{e_1} + p_{e_2})                     renormalised over the two
    y   = g_1 FFN_{e_1}(x) + g_2 FFN_{e_2}(x)

**Upcycling is exact.** At the first stage-III step FFN_e = F for every e, so y = (g_1 + g_2) F(x) = F(x):
the upcycled model computes the dense model's function (up to the rounding of g_1 + g_2 = 1). The flip side
(the paper's collapse argument, and a pitfall): with identical experts y does not depend on the gates, so the
LM loss gives the router no gradient at step 0; only the balance loss, the sampled e_2 and capacity drops
break the symmetry.

**Capacity.** Over the T tokens of a forward pass each expert takes at most
cap = max(min_capacity, ⌈k·cf·T/E⌉) assignments; first choices of all tokens queue before second choices,
each in token order. An assignment past the capacity is dropped: its gate becomes 0 and the survivors are
renormalised (a token that loses both experts gets y = 0, and only the residual carries it).

**Balance loss** (Switch/GShard, per MoE layer, summed over layers):

    L_aux^ℓ = E Σ_e f_e P_e,   f_e = (1/T) Σ_t 1[e_1(t) = e],   P_e = (1/T) Σ_t p_{t,e}
    L = L_LM + α Σ_{ℓ ∈ 𝓜} L_aux^ℓ,   α = 0.01 (``router_aux_loss_coef``)

Only the *first* choice counts in f_e (before capacity), so perfect balance gives 1 and collapse onto one
expert gives E; :func:`~lorafam_nb.moe.losses.switch_load_balance` on the first column is exactly this.

Details pinned here (the spec sheet's ⚠; sources: the authors' ``PKU-YuanGroup/MoE-LLaVA``, which pins
``deepspeed==0.9.5`` and builds its MoE layer from DeepSpeed's ``MoE``/``TopKGate``):

* **Placement.** ``moe_mode="sparse"`` is ``range(L)[::2]``: layers 0, 2, 4, … (``initialize_moe_modules``);
  also ``dense``, ``first_half``, ``second_half``, or explicit ``moe_layers_idx``.
* **Router.** ``Linear(d, E, bias=False).float()``: PyTorch's default init, Kaiming-uniform (a = √5), i.e.
  U(−1/√d, 1/√d), kept in float32 (:class:`~lorafam_nb.moe.routers.TopKRouter` with ``init_std=None``).
* **Order.** Softmax over all E first; the first expert is its argmax, the second comes from the Gumbel-noised
  *logits* with e_1 masked out; the two gates are the pre-top-k softmax values renormalised over the kept
  pair (DeepSpeed's top-2 gating; ``eps`` guards the all-dropped case). ``top_k=1`` is DeepSpeed's top-1
  (Switch) gating: g_1 = p_{e_1}, not renormalised.
* **Sampling in eval.** DeepSpeed 0.9.5 samples e_2 in eval as well (newer versions too, behind
  ``top2_2nd_expert_sampling``). We sample in training only by default, so evaluation is deterministic
  (top-2 of p); ``sample_in_eval=True`` restores DeepSpeed's behaviour.
* **Capacity.** cf = 1.5 in training (the stage-III scripts' ``--capacity_factor 1.5``) and 2.0 in eval
  (``eval_capacity_factor``, train.py's default), ``min_capacity=0``, ``use_residual=False``. DeepSpeed queues
  every token of the batch, padding included; here padding neither takes capacity nor counts in T (it is
  routed top-2 and its output is never read). DeepSpeed's top-1 gating additionally picks which tokens keep
  their slot at random (``use_rts``); we keep token order for both k.
* **Aux loss.** DeepSpeed's ``mean(me·ce)·E·E`` over every token; we leave padding out (the spec's advice and
  this library's convention), and sum, not average, over the MoE layers, as the authors' model does.
* **Trained in stage III.** The scripts pass ``--train_modules gate_proj up_proj down_proj wg``: the expert
  FFNs and the routers; attention, norms, embeddings, LM head, projector and vision tower stay frozen. Here
  ``train_modules=["experts", "router"]`` says the same, and the injection freezes everything else.

**Modality.** The forward may carry ``image_mask`` (batch × sequence, 1 for an image token): every MoE layer
then records its routing under ``<layer>[image]`` and ``<layer>[text]`` instead of ``<layer>``, so the
recorder's load matrix splits expert load by modality (:func:`modality_load`). A LLaVA-style model knows the
mask when it splices the projected patches into ``inputs_embeds``: 1 at those positions, 0 at text and padding.
Each forward's :class:`~lorafam_nb.core.Route` of a layer keeps the first choice in column 0 of ``selected``
(-1 if dropped); :func:`first_choice_counts` counts a forward pass's first choices before capacity (the argmax
of p: the top-1 loads f_e that the balance loss sees), split by modality.

Registered (:func:`~lorafam_nb.core.register_method`) as a ``"multimodal"`` method: it is compared on the toy
vision-language model of :mod:`lorafam_nb.vlm`, in its own chapter, not in the text grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (AdapterConfig, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Route, RoutingRecorder,
                    Site, register_method, require_positive_ints)
from ..models import FeedForward, ffn_blocks
from .losses import switch_load_balance
from .routers import TopKRouter, router_dtype, softmax

__all__ = ["MODALITIES", "MOE_MODES", "FFNExperts", "Gating", "MoELLaVAConfig", "MoELLaVAFFN", "first_choice_counts",
           "moe_layer_indices", "modality_load", "top2_gating"]

MOE_MODES = ("sparse", "dense", "first_half", "second_half")
MODALITIES = ("text", "image")  # the image_mask's 0 and 1
TRAIN_MODULES = ("experts", "router")


def moe_layer_indices(mode: str, num_layers: int, custom: list[int] | None = None) -> list[int]:
    """The layers 𝓜 that get experts: ``custom`` when given, else by ``mode`` (the authors' four modes)."""
    if custom is not None:
        bad = [i for i in custom if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"moe_layers_idx {bad} lie outside the model's {num_layers} layers [0, {num_layers})")
        return sorted(custom)
    if mode not in MOE_MODES:
        raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {mode!r}")
    return {"sparse": list(range(0, num_layers, 2)), "dense": list(range(num_layers)),
            "first_half": list(range(num_layers // 2)),
            "second_half": list(range(num_layers // 2, num_layers))}[mode]


@dataclass
class Gating:
    """One layer's routing of T tokens. ``chosen`` (T, k) holds the experts picked before capacity (column 0
    the argmax e_1), ``kept`` (T, k) whether each assignment fit in its expert's capacity, ``weights`` (T, k)
    the gates actually applied (0 where dropped)."""

    logits: Tensor  # (T, E), float32 or wider
    probs: Tensor  # (T, E), softmax over all E
    chosen: Tensor  # (T, k)
    kept: Tensor  # (T, k) bool
    weights: Tensor  # (T, k)
    capacity: int | None  # None: no dropping

    @property
    def selected(self) -> Tensor:
        """``chosen`` with dropped assignments set to -1 (what the routing recorder counts)."""
        return self.chosen.masked_fill(~self.kept, -1)


def top2_gating(logits: Tensor, k: int = 2, capacity_factor: float | None = 1.5, min_capacity: int = 0,
                noise: Tensor | None = None, valid: Tensor | None = None) -> Gating:
    """DeepSpeed-style top-1/top-2 gating of (T, E) router logits as a pure function.

    ``noise`` (T, E): Gumbel draws added to the logits to pick the second expert (None: no sampling, plain
    top-2 of p). ``capacity_factor`` None: nothing is dropped. ``valid`` (T,) bool: the real tokens; only they
    count in T and compete for capacity (padding always keeps its experts).
    """
    if k not in (1, 2):
        raise ValueError(f"top_k must be 1 or 2 (DeepSpeed's gatings), got {k}")
    num_tokens, num_experts = logits.shape
    probs = softmax(logits)
    first = probs.argmax(-1)
    chosen = first[:, None]
    if k == 2:
        pick = logits.to(probs.dtype) if noise is None else logits.to(probs.dtype) + noise.to(probs.dtype)
        second = pick.scatter(1, first[:, None], float("-inf")).argmax(-1)
        chosen = torch.stack([first, second], -1)
    valid = torch.ones(num_tokens, dtype=torch.bool, device=logits.device) if valid is None else valid.bool()
    capacity = None
    kept = torch.ones_like(chosen, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = max(min_capacity, math.ceil(k * capacity_factor * int(valid.sum()) / num_experts))
        # Queue position of each assignment at its expert: all first choices (token order), then all second ones.
        hits = F.one_hot(chosen, num_experts) * valid[:, None, None]  # (T, k, E)
        queue = hits.transpose(0, 1).reshape(k * num_tokens, num_experts)
        position = ((queue.cumsum(0) - 1) * queue).sum(-1).view(k, num_tokens).t()
        kept = (position < capacity) | ~valid[:, None]
    picked = probs.gather(1, chosen) * kept
    if k == 2:  # renormalised over the kept pair: identical experts then reproduce the dense FFN exactly
        weights = picked / picked.sum(-1, keepdim=True).clamp_min(torch.finfo(picked.dtype).eps)
    else:  # Switch: the raw probability, so the router gets a gradient from the task loss
        weights = picked
    return Gating(logits, probs, chosen, kept, weights, capacity)


class FFNExperts(nn.Module):
    """E full copies of one FFN, stacked: ``gate_proj`` (E, d_ff, d) (gated FFNs only), ``up_proj`` (E, d_ff, d),
    ``down_proj`` (E, d, d_ff), and ``<name>_bias`` (E, ·) where the FFN has biases. Every copy starts equal
    to ``ffn``'s weights (sparse upcycling); the activation stays the model's own (no parameters)."""

    PARTS: ClassVar[tuple[str, ...]] = ("gate", "up", "down")

    def __init__(self, ffn: FeedForward, num_experts: int) -> None:
        super().__init__()
        require_positive_ints(num_experts=num_experts)
        self.num_experts = num_experts
        for part in self.PARTS:
            linear = getattr(ffn, part)
            for kind in ("weight", "bias"):
                name = f"{part}_proj" if kind == "weight" else f"{part}_bias"
                tensor = getattr(linear, kind, None) if linear is not None else None
                copies = None if tensor is None else nn.Parameter(
                    tensor.detach().unsqueeze(0).repeat(num_experts, *[1] * tensor.dim()))
                self.register_parameter(name, copies)

    def unbound(self) -> list[dict[str, Tensor | None]]:
        """Each expert's tensors, ``{"<part>_proj": W, "<part>_bias": b or None}``, as views of the stacks. One
        ``unbind`` per stack: its backward stacks the E slices' gradients once, where indexing expert by expert
        would zero-fill a full-size (E, ·, ·) gradient per expert and part (on a CPU, more time than the
        experts' matmuls). Same values and gradients either way."""
        names = [f"{part}_{kind}" for part in self.PARTS for kind in ("proj", "bias")]
        stacks = {n: getattr(self, n) for n in names}
        views = {n: (None,) * self.num_experts if t is None else t.unbind(0) for n, t in stacks.items()}
        return [{n: views[n][e] for n in names} for e in range(self.num_experts)]

    def linear(self, part: str, e: int, x: Tensor, weights: list[dict[str, Tensor | None]] | None = None) -> Tensor:
        w = (weights or self.unbound())[e]
        return F.linear(x, w[f"{part}_proj"], w[f"{part}_bias"])

    def expert(self, e: int, x: Tensor, act: nn.Module, weights: list[dict[str, Tensor | None]] | None = None) -> Tensor:
        """FFN_e(x): ``down(act(gate x) ⊙ up x)`` (gated) or ``down(act(up x))``, with expert e's weights
        (``weights``: :meth:`unbound`'s views, taken once per forward)."""
        weights = weights or self.unbound()
        up = self.linear("up", e, x, weights)
        inner = act(self.linear("gate", e, x, weights)) * up if self.gate_proj is not None else act(up)
        return self.linear("down", e, inner, weights)

    def extra_repr(self) -> str:
        E, d, d_ff = self.down_proj.shape
        return f"num_experts={E}, d={d}, d_ff={d_ff}, gated={self.gate_proj is not None}"


class MoELLaVAFFN(AdapterLayer):
    """The FFN of one layer in 𝓜 (``base_layer``: the dense stage-II FFN, frozen and no longer run) replaced by
    E upcycled ``experts`` and a top-k ``router``. Each expert runs on its own tokens only (a loop over the E
    experts, never over tokens)."""

    def __init__(self, base_layer: FeedForward, num_experts: int = 4, top_k: int = 2, capacity_factor: float = 1.5,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 0, drop_tokens: bool = True,
                 second_expert_sampling: bool = True, sample_in_eval: bool = False,
                 train_modules: tuple[str, ...] | list[str] = TRAIN_MODULES) -> None:
        super().__init__(base_layer)
        w = base_layer.down.weight
        self.top_k, self.min_capacity, self.drop_tokens = top_k, min_capacity, drop_tokens
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.second_expert_sampling, self.sample_in_eval = second_expert_sampling, sample_in_eval
        # DeepSpeed's wg: a bias-free float32 linear with PyTorch's default (Kaiming-uniform) init.
        self.router = TopKRouter(base_layer.up.in_features, num_experts, top_k, dtype=router_dtype(w.dtype),
                                 device=w.device)
        self.experts = FFNExperts(base_layer, num_experts)
        self.router.requires_grad_("router" in train_modules)
        self.experts.requires_grad_("experts" in train_modules)

    def gate(self, flat: Tensor, valid: Tensor | None = None) -> Gating:
        """Route the (T, d) tokens ``flat``: router logits in float32, then :func:`top2_gating` with this mode's
        capacity factor and, where enabled, Gumbel noise for the second expert."""
        logits = flat.to(self.router.weight.dtype) @ self.router.weight.t()
        sample = self.top_k == 2 and self.second_expert_sampling and (self.training or self.sample_in_eval)
        # Gumbel(0, 1) = -log(Exp(1)): the Gumbel-max trick draws e_2 ~ softmax of the other logits.
        noise = -torch.empty_like(logits).exponential_().log() if sample else None
        factor = (self.capacity_factor if self.training else self.eval_capacity_factor) if self.drop_tokens else None
        return top2_gating(logits, self.top_k, factor, self.min_capacity, noise, valid)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        real = self.context.real_tokens(x)
        gating = self.gate(flat, real)
        self.report(gating, x, real)
        out = flat.new_zeros(flat.shape[0], self.experts.down_proj.shape[1])
        act, weights = self.base_layer.act, self.experts.unbound()
        for e in range(self.experts.num_experts):
            # Expert e's tokens (chosen and kept) and its gate on each; a token holds e at most once.
            hit = (gating.chosen == e) & gating.kept
            weight = (gating.weights * hit).sum(-1)
            tokens = hit.any(-1).nonzero().squeeze(1)
            if tokens.numel():
                y = self.experts.expert(e, flat[tokens], act, weights)
                out = out.index_add(0, tokens, y * weight[tokens, None].to(y.dtype))
        return out.view(*x.shape[:-1], -1)

    def report(self, gating: Gating, x: Tensor, real: Tensor | None) -> None:
        """The balance term and the routing record of this forward, real tokens only. With an ``image_mask``
        side input the record is split into ``<site>[text]`` and ``<site>[image]``."""
        ctx = self.context
        keep = torch.ones(gating.chosen.shape[0], dtype=torch.bool, device=x.device) if real is None else real
        probs, selected = gating.probs[keep], gating.selected[keep]
        if probs.shape[0]:  # L_aux^ℓ = E Σ f_e P_e, f_e from the first choice before capacity (DeepSpeed's top-1 mask)
            ctx.add_aux_loss("load_balance", switch_load_balance(probs, gating.chosen[keep, :1]))
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[:-1].numel() // x.shape[0])
        ctx.routes.append(Route(self.site, gating.logits[keep], probs, selected, rows[keep]))
        dropped = (~gating.kept[keep]).sum(-1)
        image = self.image_tokens(x)
        if image is None:
            ctx.recorder.record(self.site, probs, selected, int(dropped.sum()))
            return
        image = image[keep]
        for name, part in zip(MODALITIES, (~image, image)):
            ctx.recorder.record(f"{self.site}[{name}]", probs[part], selected[part], int(dropped[part].sum()))

    def image_tokens(self, x: Tensor) -> Tensor | None:
        """The ``image_mask`` side input as a flat bool mask over the tokens of ``x`` (None when absent)."""
        mask = self.context.side.get("image_mask")
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=x.device)
        if mask.numel() != x.shape[:-1].numel():
            raise ValueError(f"image_mask has {mask.numel()} entries (shape {tuple(mask.shape)}) but "
                             f"{self.site or 'this layer'} sees {x.shape[:-1].numel()} tokens (shape "
                             f"{tuple(x.shape[:-1])}): give one 0/1 entry per token, shaped like input_ids")
        return mask.reshape(-1).bool()

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, capacity_factor={self.capacity_factor}/{self.eval_capacity_factor} "
                f"(train/eval), drop_tokens={self.drop_tokens}, second_expert_sampling={self.second_expert_sampling}")


def modality_load(recorder: RoutingRecorder) -> dict[str, dict[str, Tensor]]:
    """Per MoE layer and modality, each expert's share of the routed assignments (top-k, after capacity), from a
    recorder fed with an ``image_mask``: ``{layer: {"text": (E,), "image": (E,)}}``; a modality with no token
    in that layer is left out."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, stats in recorder.layers.items():
        for modality in MODALITIES:
            suffix = f"[{modality}]"
            if name.endswith(suffix) and stats.tokens.sum() > 0:
                out.setdefault(name[: -len(suffix)], {})[modality] = stats.tokens / stats.tokens.sum()
    return out


def first_choice_counts(model: AdapterModel) -> dict[str, Tensor]:
    """How many real tokens of ``model``'s last forward pass chose each expert *first*, per MoE layer: (E,) counts
    of e_1 = argmax_e p_e before capacity, the counts behind f_e of the balance loss (the recorder counts both
    choices, after capacity). Keys as the recorder's: ``<layer>[text]`` and ``<layer>[image]`` when the forward
    carried an ``image_mask``, else ``<layer>``. Read from the forward's routes, so call it after every forward
    that should count (a forward hook on the model)."""
    ctx = model.context
    image = ctx.side.get("image_mask")
    if image is not None:
        image = torch.as_tensor(image).reshape(-1).bool()
        mask = ctx.token_mask
        if mask is not None and mask.numel() == image.numel():  # the routes keep the real tokens only
            image = image[mask.reshape(-1).to(image.device).bool()]
    out: dict[str, Tensor] = {}
    for route in ctx.routes:
        first = route.probs.detach().argmax(-1)
        E = route.probs.shape[-1]
        if image is None:
            out[route.layer] = torch.bincount(first, minlength=E)
            continue
        if image.numel() != first.numel():
            raise ValueError(f"image_mask marks {image.numel()} real tokens but {route.layer} routed {first.numel()}")
        flags = image.to(first.device)
        for name, part in zip(MODALITIES, (~flags, flags)):
            out[f"{route.layer}[{name}]"] = torch.bincount(first[part], minlength=E)
    return out


@register_method
@dataclass
class MoELLaVAConfig(AdapterConfig):
    """MoE-tuning (stage III) of MoE-LLaVA, the authors' names: ``num_experts`` E (4), ``top_k`` k (2),
    ``moe_mode`` (``sparse``: layers 0, 2, 4, …) or explicit ``moe_layers_idx``, ``capacity_factor`` /
    ``eval_capacity_factor`` (1.5 / 2.0), ``min_capacity`` (0), ``drop_tokens`` (DeepSpeed drops; off: every
    token keeps both experts), ``router_aux_loss_coef`` α (0.01; 0 turns the balance loss off),
    ``top2_2nd_expert_sampling`` (Gumbel-sampled e_2, training) and ``sample_in_eval``.

    ``train_modules``: what stage III trains, a subset of ``["experts", "router"]`` (both: the paper); every
    other parameter of the model is frozen. ``target_modules`` is not used: the sites are the FFN blocks
    (:func:`~lorafam_nb.models.ffn_blocks`) of the layers in 𝓜.
    """

    num_experts: int = 4
    top_k: int = 2
    moe_mode: str = "sparse"
    moe_layers_idx: list[int] | None = None
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    drop_tokens: bool = True
    router_aux_loss_coef: float = 0.01
    top2_2nd_expert_sampling: bool = True
    sample_in_eval: bool = False
    train_modules: list[str] = field(default_factory=lambda: list(TRAIN_MODULES))

    method = "moe_llava"
    side_inputs: ClassVar[tuple[str, ...]] = ("image_mask",)
    modality: ClassVar[str] = "multimodal"  # compared on the toy VLM in its chapter, not in the text grid
    budget_knob: ClassVar[str] = "num_experts"
    card = MethodCard(
        title="MoE-LLaVA", paper="Lin et al., 2024", arxiv="2401.15947", date="2024-01",
        idea=r"after dense LVLM training, copy the FFN of every other layer into $E=4$ experts with a top-2 "
             r"router and a Switch balance loss, and train only those (MoE-tuning)",
        trains=r"$E$ full expert FFNs and a router $W_r\in\mathbb{R}^{E\times d}$ per MoE layer",
        frozen=r"attention, norms, embeddings, LM head, the other layers' FFNs (and the vision tower, projector)",
        mergeable=False, params=r"E\,(3\,d\,d_{ff}+d)", chapter="moe_llava", bibkey="lin2024moellava",
        params_note=r"per upcycled gated FFN block of width $d$ and hidden width $d_{ff}$ (router counted; "
                    r"$2\,d\,d_{ff}+d_{ff}+d$ per expert for a biased GELU FFN); active per token: $k$ experts",
        merge_note="hard per-token routing between full FFNs: no single weight equals it",
    )

    def __post_init__(self) -> None:
        require_positive_ints(num_experts=self.num_experts, top_k=self.top_k)
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2 (DeepSpeed's top-1 and top-2 gatings), got {self.top_k}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.moe_mode not in MOE_MODES:
            raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {self.moe_mode!r}")
        if self.moe_layers_idx is not None:
            idx = self.moe_layers_idx
            if (not isinstance(idx, list) or not idx
                    or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in idx)):
                raise ValueError(f"moe_layers_idx must be a non-empty list of layer indices >= 0, got {idx!r}")
            if len(set(idx)) != len(idx):
                raise ValueError(f"moe_layers_idx has repeated layers: {idx}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"min_capacity must be a non-negative integer, got {self.min_capacity!r}")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef must be non-negative, got {self.router_aux_loss_coef}")
        unknown = sorted(set(self.train_modules) - set(TRAIN_MODULES))
        if unknown or not self.train_modules:
            raise ValueError(f"train_modules must be a non-empty subset of {list(TRAIN_MODULES)}, got "
                             f"{self.train_modules!r}")

    def moe_layers(self, num_layers: int) -> list[int]:
        """𝓜 for a model of ``num_layers`` layers."""
        return moe_layer_indices(self.moe_mode, num_layers, self.moe_layers_idx)

    def sites(self, model: nn.Module) -> list[Site]:
        blocks = ffn_blocks(model)
        chosen = set(self.moe_layers(len(blocks)))
        return [s for s in blocks if s.block in chosen]

    def build_layer(self, site: Site, scope: AdapterScope) -> MoELLaVAFFN:
        return MoELLaVAFFN(site.module, self.num_experts, self.top_k, self.capacity_factor, self.eval_capacity_factor,
                           self.min_capacity, self.drop_tokens, self.top2_2nd_expert_sampling, self.sample_in_eval,
                           self.train_modules)

    def aux_loss_weights(self) -> dict[str, float]:
        """α on the sum over MoE layers of each layer's L_aux (the layers add one term each under one name)."""
        return {"load_balance": self.router_aux_loss_coef}

    def block_parameters(self, d: int, d_ff: int, gated: bool = True, bias: bool = False) -> int:
        """Stage-III trainable parameters of one upcycled FFN block: E P_FFN for the experts, with
        P_FFN = 3 d d_ff (gated, bias-free) or 2 d d_ff (+ d_ff + d of biases, BERT), and E d for the router."""
        ffn = (3 if gated else 2) * d * d_ff + (((2 if gated else 1) * d_ff + d) if bias else 0)
        return (self.num_experts * ffn if "experts" in self.train_modules else 0) + \
            (self.num_experts * d if "router" in self.train_modules else 0)

    def site_parameters(self, site: Site) -> int:
        ffn: FeedForward = site.module
        return self.block_parameters(site.d_in, ffn.up.out_features, ffn.gate is not None, ffn.up.bias is not None)

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, int]]:
        """The expert count E from k to 16: the only size knob (each step adds one full FFN per MoE layer)."""
        return [{"num_experts": e} for e in range(cls.__dataclass_fields__["top_k"].default, 17)]
