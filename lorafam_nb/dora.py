"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv 2402.09353).

Every weight is split into a magnitude and a direction, as in weight normalisation. For the frozen
:math:`W_0 \\in \\mathbb{R}^{d_{out} \\times d_{in}}` (PyTorch layout) the direction is updated by a LoRA,
the magnitude :math:`m \\in \\mathbb{R}^{d_{out}}` is trained directly:

    V' = W_0 + s · B A                              (s = α / r, LoRA's A and B)
    C  = ‖V'‖_c,   C_j = ‖V'_{j,:}‖₂                 one norm per OUTPUT unit, taken over d_in
    W' = m · V' / C = diag(m / C) V'
    h  = W' x + b_0 = (m / C) ⊙ (W_0 x + s · B A x) + b_0

* Norm axis: the paper writes :math:`W \\in \\mathbb{R}^{d \\times k}` and takes the norm of each of
  its k columns, one per output unit. In PyTorch's ``(d_out, d_in)`` layout that is the norm of each
  ROW (``dim=1``), as in the official code and in peft, so ``m`` has ``d_out`` entries.
* Init: ``m = ‖W_0‖_c`` and ``B = 0`` (``A`` as LoRA), so ``W' = W_0`` at step 0.
* Detach (paper §4.3, used for all its results): ``C`` is recomputed from the current ``B, A`` on
  every forward pass but treated as a constant in backprop, so ``∂L/∂V' = (m / C) g`` with no
  projection term, and the norm's graph is never stored.
* With LoRA dropout ``p > 0`` the official code and peft compute
  ``h = W_0 x + (m/C − 1) ⊙ W_0 x̃ + (m/C) ⊙ s B A x̃ + b_0`` with ``x̃ = drop(x)``; equal to the above at p = 0.
* Memory: the fused layer saves its input ``x`` (as LoRA does) and its output ``h``, from which
  backward reads ``W'x`` for ``∂L/∂m``. Where the next operation saves ``h`` anyway (an activation
  function, a GPU attention kernel) that costs nothing; elsewhere it is one more activation, unless the
  layer recomputes ``W'x`` in backward instead, one more GEMM (:func:`recompute_outputs` chooses layers).
* Mergeable: ``W'`` is written into the base weight. Unmerging needs the ``C`` of the merge (the
  merged weight no longer contains ``W_0 + sBA`` separately), so merge keeps it.

:func:`magnitude_direction_change` is the paper's analysis (ΔM, ΔD of a weight against ``W_0``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import MethodCard, register_method, suffix_match
from .lora import LoraConfig, LoRALinear

__all__ = ["DoraConfig", "DoRALinear", "magnitude_direction_change", "recompute_outputs"]


def _row_norm(weight: Tensor) -> Tensor:
    """‖W‖_c of a ``(d_out, d_in)`` weight: one L2 norm per output unit (the paper's column norm)."""
    return torch.linalg.vector_norm(weight, dim=1)


class _FusedDoRA(torch.autograd.Function):
    """``h = x W'ᵀ + b`` with ``W' = (m/C) ⊙ (W0 + s·BA)`` and ``C`` detached, in one GEMM.

    Forward forms the d_out × d_in weight ``W'`` (r·d_in·d_out flops, negligible next to the GEMM over
    all tokens) and multiplies once. Backward, with ``g = ∂L/∂h`` and ``u = m/C`` (a constant per row):

        dx = g W'                    dA = s · (diag(u) B)ᵀ gᵀ x          dB = s · diag(u) ((A xᵀ) g)ᵀ
        dm_j = Σ_n g_nj (V' x_n)_j / C_j = Σ_n g_nj (W' x_n)_j / m_j = Σ_n g_nj (h_nj − b_j) / m_j

    The last form reads ``V' x`` back from the output ``h``, which the next operation of the network
    usually saves anyway (GELU, attention), so no activation-sized tensor is stored for ``m``: only
    ``x``, ``h`` and the d_out-vector ``C`` are saved, and ``W'`` is recomputed rather than stored.
    Rows with ``m_j = 0`` (where ``h`` holds no trace of ``V'x``) get ``V'_j x`` recomputed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, m: Tensor,
                scaling: float, keep_output: bool) -> Tensor:
        V = torch.addmm(weight, B, A, alpha=scaling)
        C = _row_norm(V)
        h = F.linear(x, V.mul_((m / C).unsqueeze(1)), bias)
        ctx.save_for_backward(x, weight, bias, A, B, m, C, h if keep_output else None)
        ctx.scaling = scaling
        return h

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, bias, A, B, m, C, h = ctx.saved_tensors
        s = ctx.scaling
        u = (m / C).unsqueeze(1)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        # W' is rebuilt rather than stored; without the kept output, dm needs W' x again (one more GEMM).
        W = torch.addmm(weight, B, A, alpha=s).mul_(u) if ctx.needs_input_grad[0] or h is None else None
        dx = dA = dB = dm = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ W).view(x.shape)
        if ctx.needs_input_grad[3]:
            dA = ((B * u).t() @ g2.t()).mm(x2).mul_(s)
        g_sum = None
        if ctx.needs_input_grad[4]:
            # A row of ones under A xᵀ makes the same GEMM give Σ_n g_n too (dm's bias term) for free.
            ax = A @ x2.t()
            if bias is not None and ctx.needs_input_grad[5]:
                ax = torch.cat([ax, ax.new_ones(1, ax.shape[1])])
            axg = ax.mm(g2)
            dB = axg[: A.shape[0]].t().mul(u).mul_(s)
            g_sum = axg[A.shape[0]] if axg.shape[0] > A.shape[0] else None
        if ctx.needs_input_grad[5]:
            # Σ_n g_nj (h_nj − b_j) as a column-wise dot product.
            h2 = h.reshape(g2.shape) if h is not None else F.linear(x2, W, bias)
            dm = torch.linalg.vecdot(g2, h2, dim=0)
            if bias is not None:
                dm -= bias * (g_sum if g_sum is not None else g2.sum(0))
            dm /= m
            dead = (m == 0).nonzero().squeeze(1)
            if dead.numel():
                V_dead = torch.addmm(weight[dead], B[dead], A, alpha=s)
                dm[dead] = (g2[:, dead] * (x2 @ V_dead.t())).sum(0) / C[dead]
        return dx, None, None, dA, dB, dm, None, None


class DoRALinear(LoRALinear):
    """LoRA's layer plus the trainable magnitude ``magnitude`` (the paper's ``m``, one per output unit).

    ``lora_A``, ``lora_B``, dropout and scaling are LoRA's; only the recombination differs.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, scaling: float) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, scaling)
        w = base_layer.weight.detach()
        # m = ‖W0‖_c, taken in fp32 (a bf16 weight's squares would round badly), stored in the weight's dtype.
        self.magnitude = nn.Parameter(_row_norm(w.float()).to(w.dtype))
        # C of the last merge, needed to undo it (not part of the adapter's saved state).
        self.register_buffer("merged_norm", None, persistent=False)
        self.keep_output = True  # save h for backward (False: recompute W'x there; see recompute_outputs)

    def weight_norm(self) -> Tensor:
        """C = ‖W0 + s·BA‖_c, detached (the paper's §4.3 treatment)."""
        with torch.no_grad():
            return _row_norm(torch.addmm(self.base_layer.weight, self.lora_B, self.lora_A, alpha=self.scaling))

    def _low_rank_update(self) -> Tensor:
        """s·BA in fp32 (for merging and inspection, not for training)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def _direction(self) -> Tensor:
        """V' = W0 + s·BA in fp32."""
        if self.merged:
            raise RuntimeError("the base weight holds the merged W', not W0; unmerge() first")
        return self.base_layer.weight.float() + self._low_rank_update()

    def dora_weight(self) -> Tensor:
        """W' = diag(m / C) (W0 + s·BA): the weight the layer applies (fp32)."""
        V = self._direction()
        return (self.magnitude.float() / _row_norm(V)).unsqueeze(1) * V

    def delta_weight(self) -> Tensor:
        """W' − W0: what training changed (used by the magnitude/direction analysis)."""
        return (self.dora_weight() - self.base_layer.weight.float()).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            V = self._direction()
            self.merged_norm = _row_norm(V)
            V.mul_((self.magnitude.float() / self.merged_norm).unsqueeze(1))
            self.base_layer.weight.copy_(V)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            # W0 = W' · C/m − s·BA with the C that merge used: exact up to rounding (a row with m_j = 0 is lost).
            W = self.base_layer.weight.float() * (self.merged_norm / self.magnitude.float()).unsqueeze(1)
            self.base_layer.weight.copy_(W.sub_(self._low_rank_update()))
            self.merged_norm = None
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._can_fuse():
            return _FusedDoRA.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                    self.magnitude, self.scaling, self.keep_output)
        # Unfused (dropout active, half precision, trainable base): the official/peft form, autograd does the rest.
        base = self.base_layer
        h = base(x)
        x_tilde = self.lora_dropout(x)
        base_tilde = F.linear(x_tilde, base.weight) if x_tilde is not x else (
            h if base.bias is None else h - base.bias)
        u = self.magnitude / self.weight_norm()
        lora = F.linear(F.linear(x_tilde, self.lora_A), self.lora_B)
        return h + (u - 1) * base_tilde + (u * self.scaling) * lora


@register_method
@dataclass
class DoraConfig(LoraConfig):
    """DoRA: LoRA's hyperparameters (``r``, ``lora_alpha``, ``lora_dropout``), plus a magnitude per output unit.

    peft spells it ``LoraConfig(use_dora=True)`` and stores ``m`` as ``lora_magnitude_vector``.
    """

    method = "dora"
    peft_reference = True
    card = MethodCard(
        title="DoRA", paper="Liu et al., ICML 2024", arxiv="2402.09353", date="2024-02",
        idea=r"split each weight into a magnitude per output unit and a direction; a LoRA updates the direction, "
             r"the magnitude is trained directly",
        trains=r"$A$, $B$, magnitude $m\in\mathbb{R}^{d_{out}}$", frozen=r"$W_0$", mergeable=True,
        params=r"r(d_{in}+d_{out})+d_{out}", chapter="dora", bibkey="liu2024dora",
    )
    peft_keys = {**LoraConfig.peft_keys, "magnitude": "lora_magnitude_vector"}

    def make_layer(self, name: str, module: nn.Module) -> DoRALinear:
        return DoRALinear(module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        return super().to_peft(target_modules) | {"use_dora": True}

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # Exactly LoRA's conditions, except that use_dora must be on.
        return bool(peft_config.get("use_dora")) and LoraConfig.peft_matches(peft_config | {"use_dora": False})

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters DoRA adds to one d_out × d_in linear: r (d_in + d_out) + d_out."""
        return super().num_parameters(d_in, d_out) + d_out


def recompute_outputs(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Make the DoRA layers whose names end with one of ``target_modules`` recompute ``W'x`` in backward rather
    than keep their output: one activation less per layer, one more ``N × d_in × d_out`` GEMM per step. Worth it
    where the next operation does not save the output itself. Returns the layers changed."""
    changed = [name for name, module in model.named_modules()
               if isinstance(module, DoRALinear) and suffix_match(name, target_modules)]
    for name in changed:
        model.get_submodule(name).keep_output = False
    return changed


@torch.no_grad()
def magnitude_direction_change(weight: Tensor, weight_0: Tensor) -> tuple[float, float]:
    """The paper's analysis of a fine-tuned weight ``W`` against the pretrained ``W0`` (both d_out × d_in).

    ΔM = mean_j |‖W_j‖ − ‖W0_j‖|  (magnitude change)   ΔD = mean_j (1 − cos(W_j, W0_j))  (direction change)
    """
    W, W0 = weight.double(), weight_0.double()  # 1 − cos of small angles needs more than fp32
    delta_m = (_row_norm(W) - _row_norm(W0)).abs().mean()
    delta_d = (1 - F.cosine_similarity(W, W0, dim=1)).mean()
    return delta_m.item(), delta_d.item()
