"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023, arXiv 2303.10512).

LoRA gives every adapted matrix the same rank. AdaLoRA writes the update of each frozen
:math:`W_0^k \\in \\mathbb{R}^{d_{out} \\times d_{in}}` (k = 1..n) in an SVD-like form and moves rank to
the matrices where it helps, under one global budget:

    h = W_0 x + b_0 + (α / r) · P Λ Q drop_p(x),     P ∈ R^{d_out×r},  Λ = diag(λ_1..λ_r),  Q ∈ R^{r×d_in}

* Init (reference code and peft): Λ = 0, so ΔW = 0 at step 0; P, Q ~ N(0, 0.02²), both random.
  The divisor stays the *initial* rank r for the whole run (peft: ``scaling / ranknum``).
* Orthogonality regulariser, so that Λ behaves like singular values and zeroing λ_i is a clean
  rank-one removal without an SVD. The paper writes
  γ Σ_k (‖P_kᵀP_k − I‖²_F + ‖Q_kQ_kᵀ − I‖²_F); the released code and peft compute
  γ/(2n) Σ_k (‖P_kᵀP_k − I‖_F + ‖Q_kQ_kᵀ − I‖_F) and the paper's γ values were tuned with that form.
  ``orth_reg_form`` picks one ("peft", the default, or "paper").
* Importance of every entry w of P, Λ, Q at step t, smoothed by two EMAs:

      I = |w · ∂L/∂w|,   Ī ← β₁ Ī + (1 − β₁) I,   Ū ← β₂ Ū + (1 − β₂) |I − Ī|,   s(w) = Ī · Ū

  and of triplet i of matrix k:  S_{k,i} = s(λ_{k,i}) + mean_j s(P_{k,ji}) + mean_j s(Q_{k,ij}).
* Cubic global budget b(t) (kept triplets over *all* matrices), t = optimizer steps done (1..T):

      b(t) = b(0)                                                    t ≤ t_i
      b(t) = b(T) + ⌊(b(0) − b(T)) (1 − (t − t_i) / (T − t_i − t_f))³⌋   t_i < t ≤ T − t_f
      b(t) = b(T)                                                    t > T − t_f

  with b(0) = n r and b(T) = n r_target. Every ΔT steps of the middle phase (and at t = T − t_f) the
  b(t) triplets with the highest S keep their λ; every other λ is set to 0. Masking is soft: P and Q
  are kept and a zeroed λ receives gradients again, so the next allocation may pick it back up. From
  T − t_f on, scores are no longer updated and the mask chosen at T − t_f is re-applied after every
  step, which fixes the rank pattern.

The layer is LoRA with ``lora_A`` = Q, ``lora_B`` = P (peft's names) and a vector ``lora_E`` = Λ
between them, so it reuses LoRA's fused GEMM with ΛQ in place of A. The schedule, scores and masks
live in :class:`RankAllocator`, the training callback the config hands to the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import AdapterConfig, AdapterModel, MethodCard, register_method
from .lora import LoRALinear, _FusedLoRA
from .trainer import Callback, Trainer

__all__ = ["AdaLoraConfig", "AdaLoRALinear", "RankAllocator", "adalora_layers", "effective_parameters",
           "orthogonality_residuals", "rank_pattern"]

ORTH_REG_FORMS = ("peft", "paper")
# The three factors of a triplet, under peft's names: Q, Λ, P.
FACTORS = ("lora_A", "lora_E", "lora_B")


class AdaLoRALinear(LoRALinear):
    """``nn.Linear`` plus ``(α/r) · P Λ Q`` with P = ``lora_B`` (d_out × r), Λ = ``lora_E`` (r × 1, peft's
    shape), Q = ``lora_A`` (r × d_in).

    ``rank_mask`` (a buffer, saved with the adapter) records which triplets the last allocation kept;
    the masked λ are zero in ``lora_E`` itself, so the forward pass needs no mask.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, scaling=lora_alpha / r)
        w = base_layer.weight
        # Both singular-vector factors random and Λ = 0: ΔW = 0 at start, yet every factor can move
        # (∂L/∂λ_i ∝ P_{:,i}ᵀ g Q_{i,:} x ≠ 0). P, Q start near 0, far from orthonormal: the
        # regulariser pulls them there while Λ grows.
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=w.dtype, device=w.device))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device))

    @property
    def rank(self) -> int:
        """Triplets kept by the last allocation (r before the first one)."""
        return int(self.rank_mask.sum())

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        # P Λ Q = P (ΛQ): scaling the rows of Q by λ turns the update into LoRA's B A with A = ΛQ.
        lam_q = self.lora_A * self.lora_E
        if self._can_fuse():
            return _FusedLoRA.apply(x, self.base_layer.weight, self.base_layer.bias, lam_q, self.lora_B, self.scaling)
        return self.base_layer(x) + self.scaling * F.linear(F.linear(self.lora_dropout(x), lam_q), self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    """The AdaLoRA layers of ``model``, named as :meth:`AdapterModel.adapter_layers` names them."""
    modules = model.adapter_layers() if isinstance(model, AdapterModel) else dict(model.named_modules())
    return {n: m for n, m in modules.items() if isinstance(m, AdaLoRALinear)}


def orthogonality_residuals(layer: AdaLoRALinear) -> tuple[Tensor, Tensor]:
    """(PᵀP − I, QQᵀ − I), both r × r: zero exactly when P has orthonormal columns and Q orthonormal rows."""
    P, Q = layer.lora_B, layer.lora_A
    eye = torch.eye(layer.r, dtype=P.dtype, device=P.device)
    return P.T @ P - eye, Q @ Q.T - eye


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Kept triplets per adapted matrix."""
    return {n: layer.rank for n, layer in adalora_layers(model).items()}


def effective_parameters(model: nn.Module) -> int:
    """Σ_k r_k (d_in + d_out + 1): what the kept triplets cost (masked ones could be dropped for storage)."""
    return sum(layer.rank * (layer.base_layer.in_features + layer.base_layer.out_features + 1)
               for layer in adalora_layers(model).values())


class RankAllocator(Callback):
    """The budget schedule, importance scores and masking of one AdaLoRA model (peft's ``RankAllocator``).

    Trainer hooks: ``extra_loss`` adds γ·R; ``on_after_backward`` updates the scores with the current
    weights and their gradients (the paper's order: score step t, then update, then mask, so ``w`` is
    the weight the gradient was taken at); ``on_step_end`` masks with b(t) after the optimizer step.
    The scores, masks and budget log are part of :meth:`state_dict`, so a resumed run is exact.
    Without a :class:`~lorafam_nb.trainer.Trainer`, call :meth:`set_total_step` once, then
    :meth:`update_importance` after each backward and :meth:`allocate` after each optimizer step.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig) -> None:
        self.config = config
        self.layers = adalora_layers(model)
        self.init_budget = sum(layer.r for layer in self.layers.values())  # b(0) = n r
        self.target_budget = config.target_r * len(self.layers)  # b(T) = n r_target
        # Every factor of every triplet, keyed "<layer>.<factor>"; the EMAs use the same keys.
        self.params = {f"{n}.{f}": getattr(layer, f) for n, layer in self.layers.items() for f in FACTORS}
        self.total_step: int | None = None
        self.ipt: dict[str, Tensor] = {}  # Ī per entry
        self.unc: dict[str, Tensor] = {}  # Ū per entry
        self.log: list[dict[str, int]] = []  # per step: t, b(t), triplets kept

    # --- schedule -------------------------------------------------------------------------------
    def set_total_step(self, total_step: int) -> None:
        cfg = self.config
        if cfg.total_step is not None and cfg.total_step != total_step:
            raise ValueError(f"AdaLoraConfig.total_step={cfg.total_step} but training runs {total_step} optimizer "
                             "steps; the budget schedule must span the real run (leave total_step=None to use it)")
        if total_step <= cfg.tinit + cfg.tfinal:
            raise ValueError(f"AdaLoRA needs total_step > tinit + tfinal to leave a budgeting phase; got "
                             f"total_step={total_step}, tinit={cfg.tinit}, tfinal={cfg.tfinal}")
        self.total_step = total_step

    def _T(self) -> int:
        if self.total_step is None:
            raise RuntimeError("call set_total_step (the trainer does so at on_train_begin) before scheduling")
        return self.total_step

    def budget(self, t: int) -> int:
        """b(t): triplets kept over all matrices after step t."""
        T, ti, tf = self._T(), self.config.tinit, self.config.tfinal
        if t <= ti:
            return self.init_budget
        if t > T - tf:
            return self.target_budget
        decay = (1 - (t - ti) / (T - ti - tf)) ** 3
        # int() floors (the value is positive), as in the reference code and peft.
        return self.target_budget + int((self.init_budget - self.target_budget) * decay)

    def allocates(self, t: int) -> bool:
        """Whether step t picks a new set of kept triplets (every ΔT steps, and the final pick at T − t_f)."""
        T, ti, tf = self._T(), self.config.tinit, self.config.tfinal
        return ti < t <= T - tf and (t % self.config.deltaT == 0 or t == T - tf)

    def scores_frozen(self, t: int) -> bool:
        """From T − t_f on (after the final pick) the scores stop changing."""
        return t > self._T() - self.config.tfinal

    # --- importance -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step of Ī and Ū for every entry of every P, Λ, Q, from ``p`` and ``p.grad``."""
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self.params.items():
            # A matrix the loss does not reach has no gradient: its sensitivity is 0.
            sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            ipt = self.ipt.setdefault(key, torch.zeros_like(p))
            unc = self.unc.setdefault(key, torch.zeros_like(p))
            ipt.mul_(b1).add_(sensitivity, alpha=1 - b1)
            # Uncertainty is measured against the *updated* Ī, as in the paper and the reference code.
            unc.mul_(b2).add_((sensitivity - ipt).abs(), alpha=1 - b2)

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, Tensor]:
        """S_{k,i} = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) per layer (shape r); s = Ī·Ū."""
        if not self.ipt:
            raise RuntimeError("no importance scores yet: call update_importance after a backward pass first")
        out = {}
        for name in self.layers:
            s = {f: self.ipt[f"{name}.{f}"] * self.unc[f"{name}.{f}"] for f in FACTORS}
            # Λ: one entry per triplet; P: column i (mean over d_out); Q: row i (mean over d_in).
            out[name] = s["lora_E"].view(-1) + s["lora_B"].mean(dim=0) + s["lora_A"].mean(dim=1)
        return out

    # --- masking --------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` triplets with the highest scores over all matrices; zero every other λ.

        A global top-k (not a per-matrix one) is what moves rank between matrices; it keeps exactly
        ``budget`` triplets even when scores tie (peft's threshold ``S ≤ kth value`` would drop all ties).
        """
        scores = self.triplet_scores()
        names = list(scores)
        flat = torch.cat([scores[n] for n in names])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, budget).indices] = True
        for name, mask in zip(names, keep.split([self.layers[n].r for n in names])):
            self.layers[name].rank_mask.copy_(mask)
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)

    def allocate(self, t: int) -> None:
        """After optimizer step t: pick new kept triplets, or (final phase) re-apply the frozen pick."""
        if self.allocates(t):
            self.mask_to_budget(self.budget(t))
        elif self.scores_frozen(t):
            self.apply_mask()
        kept = sum(layer.rank for layer in self.layers.values())
        self.log.append({"step": t, "budget": self.budget(t), "rank": kept})

    # --- orthogonality --------------------------------------------------------------------------
    def orthogonality_penalty(self) -> Tensor:
        """γ·R over all matrices, in the form ``orth_reg_form`` names (see the module docstring)."""
        residuals = [m for layer in self.layers.values() for m in orthogonality_residuals(layer)]
        if self.config.orth_reg_form == "paper":
            reg = torch.stack([m.square().sum() for m in residuals]).sum()
        else:
            reg = torch.stack([torch.linalg.matrix_norm(m) for m in residuals]).mean()
        return self.config.orth_reg_weight * reg

    # --- trainer hooks --------------------------------------------------------------------------
    def on_train_begin(self, trainer: Trainer) -> None:
        self.set_total_step(trainer.total_steps)

    def extra_loss(self, trainer: Trainer) -> dict[str, Tensor]:
        return {"orthogonality": self.orthogonality_penalty()} if self.config.orth_reg_weight > 0 else {}

    def on_after_backward(self, trainer: Trainer) -> None:
        if not self.scores_frozen(trainer.step + 1):  # the step about to be taken is trainer.step + 1
            self.update_importance()

    def on_step_end(self, trainer: Trainer) -> None:
        self.allocate(trainer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"ipt": {k: v.clone() for k, v in self.ipt.items()}, "unc": {k: v.clone() for k, v in self.unc.items()},
                "masks": {n: layer.rank_mask.clone() for n, layer in self.layers.items()}, "log": list(self.log)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ipt = {k: v.to(self.params[k].device) for k, v in state["ipt"].items()}
        self.unc = {k: v.to(self.params[k].device) for k, v in state["unc"].items()}
        for name, mask in state["masks"].items():
            self.layers[name].rank_mask.copy_(mask)
        self.log = list(state["log"])


@register_method
@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA hyperparameters under peft's names.

    ``init_r``: initial rank r of every matrix; ``target_r``: average final rank (b(T) = n·target_r);
    ``lora_alpha``: scale α/init_r; ``tinit``/``tfinal``: warm-up and final steps of the budget
    schedule; ``deltaT``: steps between allocations; ``beta1``/``beta2``: EMAs of sensitivity and
    uncertainty; ``orth_reg_weight``: γ; ``orth_reg_form``: "peft" (mean of unsquared norms, as the
    released code) or "paper" (sum of squared norms); ``total_step``: T, or None for the trainer's
    number of optimizer steps.
    """

    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    orth_reg_form: str = "peft"
    total_step: int | None = None

    method = "adalora"
    peft_type = "ADALORA"  # peft_keys: peft's tensor names are ours (lora_A, lora_E, lora_B)
    budget_knob = "init_r"  # the count num_parameters gives is the starting one, set by init_r
    card = MethodCard(
        title="AdaLoRA", paper="Zhang et al., ICLR 2023", arxiv="2303.10512", date="2023-03",
        idea=r"write each update as $P\Lambda Q$ and prune singular values by importance under a global budget, "
             r"moving rank to the matrices that need it",
        trains=r"$P$, $\Lambda$, $Q$", frozen=r"$W_0$", mergeable=True,
        params=r"r_{init}(d_{in}+d_{out}+1)", chapter="adalora", bibkey="zhang2023adalora",
        params_note=r"at the start; after pruning $r_k(d_{in}+d_{out}+1)$ for matrix $k$",
    )

    @classmethod
    def run_settings(cls, knob: int, steps: int, lr: float) -> dict[str, Any]:
        """The paper's schedule assumes thousands of steps: warm-up a tenth of the run, final fine-tuning a
        fifth, and the final budget two thirds of the initial rank (its 12 → 8)."""
        return {"target_r": max(1, round(2 * knob / 3)), "tinit": steps // 10, "tfinal": steps // 5}

    def __post_init__(self) -> None:
        if not isinstance(self.init_r, int) or self.init_r <= 0:
            raise ValueError(f"init_r must be a positive integer, got {self.init_r!r}")
        if not isinstance(self.target_r, int) or not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r must be an integer in [1, init_r={self.init_r}], got {self.target_r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.tinit < 0 or self.tfinal < 0 or self.deltaT < 1:
            raise ValueError(f"need tinit >= 0, tfinal >= 0, deltaT >= 1; "
                             f"got {self.tinit}, {self.tfinal}, {self.deltaT}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.orth_reg_form not in ORTH_REG_FORMS:
            raise ValueError(f"orth_reg_form must be one of {ORTH_REG_FORMS}, got {self.orth_reg_form!r}")
        if self.total_step is not None and self.total_step <= self.tinit + self.tfinal:
            raise ValueError(f"total_step must exceed tinit + tfinal = {self.tinit + self.tfinal}, "
                             f"got {self.total_step}")

    def make_layer(self, name: str, module: nn.Module) -> AdaLoRALinear:
        return AdaLoRALinear(module, self.init_r, self.lora_alpha, self.lora_dropout)

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        return [RankAllocator(model, self)]

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters one d_out × d_in linear starts with: init_r (d_in + d_out + 1)."""
        return self.init_r * (d_in + d_out + 1)

    # --- peft interchange -------------------------------------------------------------------------
    # peft keeps no mask tensor: after an allocation its config holds ``rank_pattern`` (per matrix, one
    # bool per triplet, keyed "<module>.lora_E") and its file only the kept triplets. Its scale is
    # α / (r + 1e-5) with r the initial rank, ours α / r: a relative 1e-5 / r apart.

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        if self.orth_reg_form != "peft":
            raise ValueError("peft's AdaLoRA has only its own orthogonality regulariser (orth_reg_form='peft'); "
                             f"this adapter trains with {self.orth_reg_form!r}")
        return {
            "peft_type": self.peft_type, "init_r": self.init_r, "target_r": self.target_r,
            "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "tinit": self.tinit,
            "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            # peft needs T > tinit + tfinal even for inference; left to the trainer, the smallest valid T.
            "total_step": self.total_step or self.tinit + self.tfinal + 1,
            "target_modules": target_modules, "modules_to_save": self.modules_to_save or None, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": None,
        }

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        return (super().peft_matches(peft_config) and peft_config.get("bias", "none") == "none"
                and not peft_config.get("fan_in_fan_out") and peft_config.get("layers_to_transform") is None)

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> AdaLoraConfig:
        if peft_config.get("alpha_pattern"):
            raise ValueError("peft's alpha_pattern (a per-module α) is not supported by AdaLoraConfig")
        names = ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                 "orth_reg_weight", "total_step")
        return cls(**{k: peft_config[k] for k in names if k in peft_config},
                   target_modules=peft_config["target_modules"],
                   modules_to_save=list(peft_config.get("modules_to_save") or []))

    def peft_state(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Drop the masks; when some triplets are masked, keep only the kept ones and state the pattern."""
        masks = {k[: -len(".rank_mask")]: m.bool() for k, m in state.items() if k.endswith(".rank_mask")}
        out = {k: v for k, v in state.items() if not k.endswith(".rank_mask")}
        if all(bool(m.all()) for m in masks.values()):
            return out, {}
        for layer, m in masks.items():
            out[f"{layer}.lora_A"], out[f"{layer}.lora_E"] = out[f"{layer}.lora_A"][m], out[f"{layer}.lora_E"][m]
            out[f"{layer}.lora_B"] = out[f"{layer}.lora_B"][:, m]
        return out, {"rank_pattern": {f"{layer}.lora_E": m.tolist() for layer, m in masks.items()}}

    def state_from_peft(self, state: dict[str, Tensor], peft_config: dict[str, Any]) -> dict[str, Tensor]:
        """Put the kept triplets back at their places (masked ones zero) and rebuild every mask."""
        pattern = peft_config.get("rank_pattern") or {}
        out = dict(state)
        layers = {k[: -len(".lora_E")] for k in state if k.endswith(".lora_E") and not k.startswith("adapter_scope.")}
        unknown = sorted(set(pattern) - {f"{layer}.lora_E" for layer in layers})
        if unknown:
            raise ValueError(f"rank_pattern names matrices this adapter does not have: {unknown[:3]}")
        for layer in layers:
            mask = torch.tensor(pattern.get(f"{layer}.lora_E", [True] * self.init_r), dtype=torch.bool)
            if mask.numel() != self.init_r or int(mask.sum()) != state[f"{layer}.lora_E"].shape[0]:
                raise ValueError(f"{layer}: rank_pattern keeps {int(mask.sum())} of {mask.numel()} triplets, the "
                                 f"file holds {state[f'{layer}.lora_E'].shape[0]} (init_r={self.init_r})")
            for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                kept = state[f"{layer}.{name}"]
                full = kept.new_zeros(kept.shape[:dim] + (self.init_r,) + kept.shape[dim + 1:])
                full.index_copy_(dim, mask.nonzero().squeeze(1), kept)
                out[f"{layer}.{name}"] = full
            out[f"{layer}.rank_mask"] = mask
        return out
