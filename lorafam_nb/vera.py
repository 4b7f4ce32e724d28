"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort, Asano, ICLR 2024, arXiv 2310.11454).

LoRA trains its own pair of low-rank matrices in every adapted layer. VeRA draws *one* random pair,
freezes it, shares it between all adapted layers, and trains only two scaling vectors per layer:

    h = W_0 x + Λ_b B Λ_d A x,        Λ_b = diag(b),  Λ_d = diag(d)

with :math:`W_0 \\in \\mathbb{R}^{d_{out} \\times d_{in}}` frozen, :math:`A \\in \\mathbb{R}^{r \\times d_{in}}` and
:math:`B \\in \\mathbb{R}^{d_{out} \\times r}` frozen, random and shared, and :math:`b \\in \\mathbb{R}^{d_{out}}`,
:math:`d \\in \\mathbb{R}^{r}` trained per layer (``vera_lambda_b``, ``vera_lambda_d``: peft's names).

* Init (paper §3.3 and Table 8): A, B Kaiming-uniform as PyTorch implements it, i.e.
  :math:`\\mathcal U(\\pm\\sqrt{6/\\text{fan\\_in}})`; ``b = 0`` so that ΔW = 0 and training starts at the
  pretrained model; ``d = d_initial · 1`` with ``d_initial = 0.1``. Not the other way round: with
  ``d = 0`` (and ``b = 0``) both gradients vanish and nothing ever moves.
* No α/r factor: the two vectors carry the magnitude.
* Layers of different shapes: the pair is sized to the largest input and output width among the
  adapted layers, :math:`A \\in \\mathbb{R}^{r \\times D_{in}}`, :math:`B \\in \\mathbb{R}^{D_{out} \\times r}`, and a
  layer uses the slices ``A[:, :d_in]`` and ``B[:d_out, :]`` (peft's rule; the paper's GLUE runs adapt
  only equal-shaped layers and its text does not say).
* The pair is drawn from a generator seeded with ``projection_prng_key`` (so it could be regenerated),
  lives in the adapted model's scope and, by default, is also saved once with the adapter
  (``save_projection``), because PyTorch does not
  promise the same random stream on every device and version.
* Trainable per layer: ``d_out + r``; frozen, once per model: ``r (D_in + D_out)``.
* Mergeable: :math:`W = W_0 + Λ_b B Λ_d A`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import AdapterConfig, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Site, register_method

__all__ = ["VeraConfig", "VeRALinear", "VeraProjections", "shared_projections"]


class VeraProjections(nn.Module):
    """The frozen random pair (A, B) that all adapted layers of one model share.

    It holds A and B as buffers (never trained, never counted as parameters) and is a submodule of
    every layer, the *same object* everywhere: ``model.to(...)`` converts its buffers in place of
    the old ones, and every layer reads the converted tensors.
    """

    def __init__(self, r: int, projection_prng_key: int) -> None:
        super().__init__()
        self.r, self.projection_prng_key = r, projection_prng_key
        self.register_buffer("vera_A", torch.empty(r, 0))
        self.register_buffer("vera_B", torch.empty(0, r))

    def cover(self, d_in: int, d_out: int, like: Tensor) -> None:
        """Grow to at least ``d_in`` inputs and ``d_out`` outputs, redrawing the pair from the seed.

        The values depend on the final sizes (A's bound is √(6/D_in), and B is drawn after all of A),
        so growing redraws both: the result is what drawing at the largest sizes from the start gives
        (peft's recipe: one CPU generator, A first, then B, float32).
        """
        D_in, D_out = max(d_in, self.vera_A.shape[1]), max(d_out, self.vera_B.shape[0])
        if (D_in, D_out) == (self.vera_A.shape[1], self.vera_B.shape[0]):
            return
        g = torch.Generator().manual_seed(self.projection_prng_key)
        A = nn.init.kaiming_uniform_(torch.empty(self.r, D_in), nonlinearity="relu", generator=g)
        B = nn.init.kaiming_uniform_(torch.empty(D_out, self.r), nonlinearity="relu", generator=g)
        self.vera_A, self.vera_B = A.to(like), B.to(like)

    def extra_repr(self) -> str:
        return (f"A: {tuple(self.vera_A.shape)}, B: {tuple(self.vera_B.shape)}, "
                f"projection_prng_key={self.projection_prng_key}")


VECTORS = ("vera_lambda_b", "vera_lambda_d")  # the trained parameters of a layer, by name


class VeRALinear(AdapterLayer):
    """``nn.Linear`` plus ``Λ_b B Λ_d A x`` with the model's shared frozen (A, B).

    ``projections`` is the pair all layers of one model share: the model's
    :class:`~lorafam_nb.core.AdapterScope` owns it and saves it once (:meth:`VeraConfig.build_layer`).
    A layer built on its own (``projections=None``) draws a pair of its own.
    """

    def __init__(self, base_layer: nn.Linear, r: int, d_initial: float = 0.1, vera_dropout: float = 0.0,
                 projection_prng_key: int = 0, projections: VeraProjections | None = None) -> None:
        super().__init__(base_layer)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"VeRA rank r must be a positive integer, got {r!r}")
        w = base_layer.weight
        self.r = r
        # b = 0 makes ΔW = 0 at step 0; d starts at one constant so that b receives a gradient.
        self.vera_lambda_b = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), dtype=w.dtype, device=w.device))
        # p = 0 skips the dropout call entirely: it would otherwise copy the activation.
        self.vera_dropout = nn.Dropout(vera_dropout) if vera_dropout > 0 else nn.Identity()
        projections = projections if projections is not None else VeraProjections(r, projection_prng_key)
        if (projections.r, projections.projection_prng_key) != (r, projection_prng_key):
            raise ValueError(f"all VeRA layers of a model share one (A, B): r={r}, projection_prng_key="
                             f"{projection_prng_key} differs from r={projections.r}, key={projections.projection_prng_key}")
        projections.cover(base_layer.in_features, base_layer.out_features, like=w)
        # A submodule, so that model.to(...) reaches the pair; its tensors are saved once, by the scope.
        self.vera_projections = projections

    def projections(self) -> tuple[Tensor, Tensor]:
        """This layer's views ``A[:, :d_in]`` and ``B[:d_out, :]`` of the shared pair (no copies)."""
        p = self.vera_projections
        return p.vera_A[:, : self.base_layer.in_features], p.vera_B[: self.base_layer.out_features, :]

    def delta_weight(self) -> Tensor:
        A, B = self.projections()
        # Λ_b B Λ_d A = (b ⊙ rows of B)(d ⊙ rows of A): scale the thin factors, not the d_out × d_in product.
        return (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        if self.merged:
            return h
        A, B = self.projections()
        z = F.linear(self.vera_lambda_d * F.linear(self.vera_dropout(x), A), B)  # B Λ_d A x, through r numbers
        return torch.addcmul(h, self.vera_lambda_b, z)  # h + b ⊙ z, one kernel

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """b and d: the shared A and B are the scope's to save (once per model)."""
        return {k: v for k, v in super().adapter_state_dict().items() if not k.startswith("vera_projections.")}

    def extra_repr(self) -> str:
        return f"r={self.r}"


@register_method
@dataclass
class VeraConfig(AdapterConfig):
    """VeRA hyperparameters, peft's names and defaults: rank ``r`` of the shared pair, its seed
    ``projection_prng_key``, whether to save it (``save_projection``), ``vera_dropout`` on the branch
    input, and ``d_initial``, the constant that d starts at.

    ``head_lr`` (not in peft, a training setting): the paper trains the head (``modules_to_save``)
    and the vectors with separate learning rates instead of LoRA's α (its Table 8). When set, the head
    gets ``head_lr`` and b, d get the trainer's ``lr``; ``None`` trains everything at ``lr``.
    """

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    head_lr: float | None = None

    method = "vera"
    peft_reference = True
    in_smoke_grid = True
    card = MethodCard(
        title="VeRA", paper="Kopiczko, Blankevoort & Asano, ICLR 2024", arxiv="2310.11454", date="2023-10",
        idea=r"one frozen random pair $A, B$ shared by all layers; each layer trains only two scaling vectors",
        trains=r"$b\in\mathbb{R}^{d_{out}}$, $d\in\mathbb{R}^{r}$ per layer",
        frozen=r"$W_0$; the shared random $A$, $B$", mergeable=True,
        params=r"d_{out}+r", chapter="vera", bibkey="kopiczko2024vera",
        params_note=r"plus the shared frozen pair, $r(D_{in}+D_{out})$ once per model",
    )
    peft_type = "VERA"
    # The saved pair: peft keeps it once per model, as base_model.vera_A / vera_B (as our scope does).
    peft_scope_keys = {"vera_projections.vera_A": "vera_A", "vera_projections.vera_B": "vera_B"}

    lr_scale = 30.0  # the chapter's vector LR, 3e-2 against LoRA's 1e-3: b and d start at 0 and 0.1

    @classmethod
    def run_settings(cls, knob: int, steps: int, lr: float) -> dict[str, Any]:
        """The head trains at LoRA's rate while b, d train at :attr:`lr_scale` times it."""
        return {"head_lr": lr}

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"VeRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.vera_dropout < 1:
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout}")
        if self.d_initial == 0:
            raise ValueError("d_initial must be non-zero: b starts at 0, and with d = 0 as well neither vector "
                             "ever receives a gradient")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"head_lr must be positive or None, got {self.head_lr}")

    def make_layer(self, name: str, module: nn.Module) -> VeRALinear:
        return VeRALinear(module, self.r, self.d_initial, self.vera_dropout, self.projection_prng_key)

    def build_layer(self, site: Site, scope: AdapterScope) -> VeRALinear:
        """A layer on the model's one shared pair; the scope saves the pair unless ``save_projection`` is off
        (then a reload redraws it from ``projection_prng_key``)."""
        pair = scope.shared("vera_projections", lambda: VeraProjections(self.r, self.projection_prng_key),
                            persistent=self.save_projection)
        return VeRALinear(site.module, self.r, self.d_initial, self.vera_dropout, self.projection_prng_key, pair)

    def param_groups(self, model: AdapterModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        if self.head_lr is None:
            return super().param_groups(model, lr, weight_decay)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        vectors = [p for n, p in trainable if n.endswith(VECTORS)]
        head = [p for n, p in trainable if not n.endswith(VECTORS)]
        groups = [{"params": vectors, "lr": lr, "weight_decay": weight_decay},
                  {"params": head, "lr": self.head_lr, "weight_decay": weight_decay}]
        return [g for g in groups if g["params"]]

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters VeRA adds to one d_out × d_in linear: d_out + r (b and d)."""
        return d_out + self.r

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "r": self.r, "target_modules": target_modules,
            "projection_prng_key": self.projection_prng_key, "save_projection": self.save_projection,
            "vera_dropout": self.vera_dropout, "d_initial": self.d_initial, "fan_in_fan_out": False,
            "bias": "none", "modules_to_save": self.modules_to_save or None, "init_weights": True,
            "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # Readable: no bias training, nn.Linear layout, targets by name (the pair saved or regenerated).
        return (super().peft_matches(peft_config) and peft_config.get("bias", "none") == "none" and not peft_config.get("fan_in_fan_out")
                and peft_config.get("layers_to_transform") is None)

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> VeraConfig:
        return cls(r=peft_config["r"], target_modules=peft_config["target_modules"],
                   projection_prng_key=peft_config.get("projection_prng_key", 0),
                   save_projection=peft_config.get("save_projection", True),
                   vera_dropout=peft_config.get("vera_dropout", 0.0), d_initial=peft_config.get("d_initial", 0.1),
                   modules_to_save=list(peft_config.get("modules_to_save") or []))


def shared_projections(model: AdapterModel) -> VeraProjections:
    """The one frozen pair (A, B) that all VeRA layers of ``model`` share."""
    pairs = {id(layer.vera_projections): layer.vera_projections
             for layer in model.adapter_layers().values() if isinstance(layer, VeRALinear)}
    if len(pairs) != 1:
        raise ValueError(f"expected one shared VeRA pair in the model, found {len(pairs)}")
    return next(iter(pairs.values()))
