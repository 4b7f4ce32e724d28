"""LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation (Zhou et al., COLING 2025,
arXiv 2402.07721).

Not every layer's LoRA matters equally. LoRA-drop judges a layer's LoRA by what it *outputs* on the
task's data, not by its parameters, keeps a dedicated LoRA only where that output is large, and lets
all other layers of the same kind share one LoRA. Two stages:

1. **Probe.** Train plain LoRA (:class:`~lorafam_nb.lora.LoraConfig`) briefly on a stratified sample
   :math:`\\mathcal D_s` of the training set, then measure, for every adapted layer :math:`i` with
   :math:`\\Delta W_i = s B_i A_i` and layer input :math:`x_i` (one token),

       g_i = Σ_{x ∈ D_s} ‖ΔW_i x_i‖²          (all non-padding tokens, eval mode)
       I_i = g_i / Σ_{j ∈ τ(i)} g_j           (normalised within the module type τ(i): Σ I = 1 per type)

2. **Select and retrain.** Within each module type sort :math:`I` in decreasing order and keep the
   shortest prefix whose cumulative importance reaches the threshold :math:`T` (0.9 by default):

       k* = min { k : I_(1) + … + I_(k) ≥ T }

   Kept layers get their own LoRA :math:`(A_i, B_i)`; every other layer of that type uses one shared
   pair :math:`(A_{sh}, B_{sh})`, the *same* tensors, so gradients from all of them add up:

       h_i = W_0^i x_i + s B_i A_i x_i        (i kept)
       h_i = W_0^i x_i + s B_sh A_sh x_i      (i dropped)

   This configuration (:class:`LoraDropConfig`) is trained from a fresh LoRA initialisation.

A module type with :math:`L` instances of shape :math:`d_{out} \\times d_{in}`, :math:`k < L` of them
kept, costs :math:`r(d_{in}+d_{out})(k+1)` parameters instead of LoRA's :math:`r(d_{in}+d_{out})L`.
Every layer still computes a plain LoRA update, so each merges exactly into its own :math:`W_0^i`.

Module types are the target names with the block index replaced by ``*``
(``bert.encoder.layer.*.attention.self.query``); selection, normalisation and sharing all happen
within a type, because only layers of one shape can share a matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .core import AdapterModel, AdapterScope, MethodCard, Site, register_method, site_type
from .lora import LoraConfig, LoRALinear
from .tasks import EncodedTask, batch_to, collate, score_batch

if TYPE_CHECKING:
    from .experiment import RunSpec
    from .trainer import TrainResult

__all__ = [
    "LoraDropConfig",
    "Probe",
    "SharedLoRALinear",
    "SharedPair",
    "importance",
    "module_type",
    "output_energy",
    "probe",
    "select_layers",
    "stratified_sample",
]


def module_type(name: str) -> str:
    """The type τ of an adapted module: its name with the block index replaced by ``*``."""
    return site_type(name)


# --- stage 1: probe data and output-based importance ---------------------------------------------

def stratified_sample(task: EncodedTask, n: int, seed: int = 0) -> EncodedTask:
    """``n`` examples of ``task`` with each label's share of the whole kept (the paper's :math:`\\mathcal D_s`).

    Quotas are the largest-remainder rounding of ``n · share``; regression targets are stratified by
    their rounded value. The sample keeps the examples' original order.
    """
    if not 0 < n <= len(task):
        raise ValueError(f"sample size must be in [1, {len(task)}], got {n}")
    regression = task.info.kind == "regression"
    strata: dict[Any, list[int]] = {}
    for i, example in enumerate(task.examples):
        strata.setdefault(round(example["label"]) if regression else example["label"], []).append(i)
    labels = sorted(strata)
    quota = {y: n * len(strata[y]) / len(task) for y in labels}
    take = {y: math.floor(q) for y, q in quota.items()}
    for y in sorted(labels, key=lambda y: take[y] - quota[y])[: n - sum(take.values())]:
        take[y] += 1
    g = torch.Generator().manual_seed(seed)
    picked = sorted(strata[y][j] for y in labels for j in torch.randperm(len(strata[y]), generator=g)[: take[y]].tolist())
    return replace(task, examples=[task.examples[i] for i in picked])


@torch.no_grad()
def output_energy(model: AdapterModel, task: EncodedTask, batch_size: int = 32) -> dict[str, float]:
    """:math:`g_i = \\sum_x \\|\\Delta W_i x_i\\|^2` for every LoRA layer of ``model`` over all of ``task``.

    The sum runs over every non-padding token (``attention_mask``) of every example. The model is
    scored in eval mode, so dropout does not perturb the measurement; every module's mode is restored after.
    The branch output is formed in its factored form :math:`s\\,B(Ax)`, which costs
    :math:`r(d_{in}+d_{out})` per token instead of :math:`d_{in}d_{out}`.
    """
    layers = {n: m for n, m in model.adapter_layers().items() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA layers to score")
    device = next(model.parameters()).device
    energy = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
    mask: dict[str, Tensor] = {}

    def hook(name: str):
        def accumulate(layer: LoRALinear, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0]
            delta = layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
            tokens = mask["tokens"].reshape(x.shape[:-1]).to(delta.dtype)  # one entry per token
            energy[name] += (delta.pow(2).sum(-1) * tokens).sum().double()
        return accumulate

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    # Remember every module's own mode: a wrapper in train mode may hold a model in eval mode.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for start in range(0, len(task), batch_size):
            batch = batch_to(collate(task, task.examples[start:start + batch_size]), device)
            tokens = batch["attention_mask"]
            if tokens.dim() == 3:  # multiple choice, (batch, choices, seq): the padding choices do not count
                tokens = tokens * batch["choice_mask"][..., None]
            mask["tokens"] = tokens
            score_batch(model, task, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return {n: e.item() for n, e in energy.items()}


def importance(energy: dict[str, float]) -> dict[str, float]:
    """:math:`I_i = g_i / \\sum_{j \\in \\tau(i)} g_j`: output energies normalised to sum to 1 within each module type."""
    totals: dict[str, float] = {}
    for name, g in energy.items():
        if g < 0 or not math.isfinite(g):
            raise ValueError(f"output energy of {name} must be finite and non-negative, got {g}")
        totals[module_type(name)] = totals.get(module_type(name), 0.0) + g
    empty = [t for t, total in totals.items() if total == 0]
    if empty:
        raise ValueError(f"every LoRA output of {empty} is zero (B = 0?): train the probe before scoring it")
    return {name: g / totals[module_type(name)] for name, g in energy.items()}


# --- stage 2: selection by cumulative importance --------------------------------------------------

TOLERANCE = 1e-12  # relative slack on the threshold test, for binary rounding of decimal importances


def select_layers(importance: dict[str, float], threshold: float = 0.9) -> list[str]:
    """Layers that keep their own LoRA: per module type, the shortest prefix of the layers sorted by
    decreasing importance whose cumulative importance reaches ``threshold`` (:math:`k^\\star`).

    Ties are broken by the order of ``importance`` (model order: the earlier layer first). Sums are
    exact (``math.fsum``) and compared with ``threshold`` times the type's total, less
    :data:`TOLERANCE` of that total, so a prefix that reaches :math:`T` in decimal arithmetic
    (0.7 + 0.2 ≥ 0.9) is not rejected for binary rounding. ``threshold=1`` therefore keeps every layer
    except those whose importances together are within that tolerance of zero. Names come back in
    the order of ``importance``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold T must be in (0, 1], got {threshold}")
    groups: dict[str, list[str]] = {}
    for name, value in importance.items():
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"importance of {name} must be finite and non-negative, got {value}")
        groups.setdefault(module_type(name), []).append(name)
    kept: set[str] = set()
    for names in groups.values():
        ranked = sorted(names, key=lambda n: -importance[n])  # stable: ties keep model order
        total = math.fsum(importance[n] for n in names)
        target = (threshold - TOLERANCE) * total
        for k in range(1, len(ranked) + 1):
            if math.fsum(importance[n] for n in ranked[:k]) >= target:
                kept.update(ranked[:k])
                break
    return [n for n in importance if n in kept]


# --- the final architecture: own LoRA for kept layers, one shared LoRA per type for the rest ------

class SharedPair(nn.Module):
    """The LoRA pair that the dropped layers of one module type share; the model's scope owns it."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter) -> None:
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B


class SharedLoRALinear(LoRALinear):
    """A dropped layer: :math:`h = W_0 x + b_0 + s B_{sh} A_{sh} x` with the type's shared pair.

    ``lora_A``/``lora_B`` are the same ``nn.Parameter`` objects in every member of the group and in the
    :class:`SharedPair` that the model's :class:`~lorafam_nb.core.AdapterScope` holds, so forward,
    backward, merge and the optimizer all see one tensor, and the scope saves it once.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, scaling: float,
                 group: str, shared: SharedPair) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, scaling)
        self.group = group
        self.lora_A, self.lora_B = shared.lora_A, shared.lora_B

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {}  # the pair is the scope's to save

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared by {self.group}"


@register_method
@dataclass
class LoraDropConfig(LoraConfig):
    """LoRA-drop's final architecture: LoRA's hyperparameters plus ``kept_modules``, the full names of the
    target layers that keep their own LoRA (what :func:`select_layers` returns). Every other target
    layer shares one LoRA with the dropped layers of its module type and shape.
    """

    kept_modules: list[str] = field(default_factory=list)
    # Stage 1, run by :meth:`resolve` when ``kept_modules`` is empty: the probe's optimizer steps, the size of
    # the stratified sample D_s it trains and is scored on, and the threshold T.
    probe_steps: int = 20
    probe_n: int = 64
    threshold: float = 0.9

    method = "lora_drop"
    card = MethodCard(
        title="LoRA-drop", paper="Zhou et al., COLING 2025", arxiv="2402.07721", date="2024-02",
        idea=r"score each layer's LoRA by its output energy after a short probe; keep own LoRAs where it is "
             r"large, one shared LoRA for the other layers of a type",
        trains=r"$A_i$, $B_i$ of the kept layers; one shared $A$, $B$ per module type", frozen=r"$W_0$",
        mergeable=True, params=r"r(d_{in}+d_{out})", chapter="lora_drop", bibkey="zhou2025loradrop",
        params_note=r"per kept layer; the other layers of a module type share one pair: "
                    r"$r(d_{in}+d_{out})(k+1)$ per type with $k$ kept",
        merge_note="each layer adds its own or the shared update to its own weight",
    )
    peft_type = None  # peft has no shared LoRA; merge_and_unload() gives a plain model to export

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.kept_modules, list) or not all(isinstance(n, str) for n in self.kept_modules):
            raise ValueError(f"kept_modules must be a list of module names, got {self.kept_modules!r}")
        if len(set(self.kept_modules)) != len(self.kept_modules):
            raise ValueError("kept_modules lists a module twice")
        if self.probe_steps < 1 or self.probe_n < 1:
            raise ValueError(f"probe_steps and probe_n must be positive, got {self.probe_steps}, {self.probe_n}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold T must be in (0, 1], got {self.threshold}")

    @classmethod
    def run_settings(cls, knob: int, steps: int, lr: float) -> dict[str, Any]:
        """The probe is a short first stage: a quarter of the main run's steps."""
        return {"probe_steps": max(1, steps // 4)}

    def resolve(self, spec: RunSpec) -> LoraDropConfig:
        """Stage 1 on ``spec``'s training data when no layers are chosen yet (:func:`probe`); else ``self``."""
        return self if self.kept_modules else probe(spec, self).config

    @classmethod
    def from_importance(cls, importance: dict[str, float], threshold: float = 0.9, **kwargs: Any) -> LoraDropConfig:
        """The config that :func:`select_layers` at ``threshold`` picks from probe importances."""
        return cls(kept_modules=select_layers(importance, threshold), **kwargs)

    def build_layer(self, site: Site, scope: AdapterScope) -> LoRALinear:
        """Own LoRA for a kept layer; otherwise the pair of its (module type, shape) from the model's scope,
        drawn by the first dropped layer of that type (the lowest block: LoRA's own init)."""
        args = (site.module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())
        if site.name in self.kept_modules:
            return LoRALinear(*args)

        def draw() -> SharedPair:
            first = LoRALinear(*args)
            return SharedPair(first.lora_A, first.lora_B)

        d_out, d_in = site.module.weight.shape
        pair = scope.shared(f"lora_drop {site.module_type} {d_out}x{d_in}", draw)
        return SharedLoRALinear(*args, group=site.module_type, shared=pair)

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        raise NotImplementedError("LoRA-drop's shared LoRA has no peft equivalent; merge_and_unload() to export")


@dataclass
class Probe:
    """What LoRA-drop's stage 1 produced: the config with the kept layers, every layer's importance I_i,
    the probe model, D_s (what it trained on and was scored on) and its training result."""

    config: LoraDropConfig
    importance: dict[str, float]
    model: AdapterModel
    sample: EncodedTask
    result: TrainResult


def probe(spec: RunSpec, config: LoraDropConfig) -> Probe:
    """LoRA-drop's stage 1 on ``spec``'s training data: draw the stratified sample D_s of ``probe_n``
    examples, train plain LoRA of ``config``'s rank on it for ``probe_steps`` steps (``spec``'s training
    settings), score each layer's output energy on D_s, and keep the layers that cover ``threshold`` of it
    within their module type. The chapter and the experiments grid both run this."""
    from .experiment import build_model, training_set
    from .trainer import Trainer

    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                      modules_to_save=config.modules_to_save)
    data = training_set(spec)
    sample = stratified_sample(data, min(config.probe_n, len(data)), seed=spec.seed)
    model = build_model(replace(spec, finetune=lora))
    result = Trainer(model, sample, replace(spec.train, max_steps=config.probe_steps, seed=spec.seed)).train()
    scores = importance(output_energy(model, sample))
    kept = replace(config, kept_modules=select_layers(scores, config.threshold))
    return Probe(kept, scores, model, sample, result)
