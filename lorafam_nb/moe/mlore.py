"""MLoRE: Multi-Task Dense Prediction via Mixture of Low-Rank Experts (Yang et al., CVPR 2024; arXiv 2403.17749).

A decoder, not an adapter of the backbone: features tapped at S depths of a (frozen, here) backbone are
projected to C channels, ``X_s``, and each scale runs two MLoRE modules per task t. A module maps X to

    F = Conv1x1_{t,in}(X)                                           the task's view of the shared feature
    [ℓ, σ, m] = Router_t(F)                                         one decision per image (not per pixel)
    w = TopK_k(softmax(ℓ + σ ⊙ ξ)),  ξ ~ N(0, I) in training only   the N − k smallest set to 0, no renorm
    LR_i(F) = M_i * (W_i * F)                                       k×k conv C→r_i, then 1×1 conv r_i→C
    G = BN_{t,all}(Σ_i w_i LR_i(F)) + m · LR_{t,spec}(F) + Conv_shared(sg(F))
    Y = Conv1x1_{t,out}(GELU(BN_t(G)))

* **Experts** ``LR_i`` are low-rank convolutions shared by all tasks (the k×k "down" conv W_i to rank r_i,
  the 1×1 "up" conv M_i back to C, both with biases, nothing in between), with ranks spread over
  r, r + step, … (the paper: 15 experts of ranks 16, 24, …, 128, top-9).
* **Generic path** ``Conv_shared``: one full k×k conv shared by every task, the paper's explicit model of
  global task relations. It reads the *detached* input sg(F): it learns from every task's loss but sends no
  gradient back into the task projections or the backbone.
* **Task-specific expert** ``LR_{t,spec}``: one more low-rank conv per task (rank 72), scaled by the router's
  raw third output m (no squashing).
* **Re-parameterisation.** Every path is linear in F and the routing is per image, so for image n the three
  paths are one k×k conv: K_i = M_i W_i (a C×C×k×k kernel), b_i = M_i b_{W_i} + b_{M_i}, and in eval mode
  (BN with running statistics, no noise)

      K⁽ⁿ⁾ = fuseBN(Σ_i w⁽ⁿ⁾_i K_i, Σ_i w⁽ⁿ⁾_i b_i; BN_{t,all}) + m⁽ⁿ⁾ K_{t,spec} + K_shared

  which runs as one grouped conv over the batch (:meth:`MLoREModule.fused_kernel`, ``MLoREModel.merge()``).
* **Load balance** per module, over tasks × images: v = mean_{t,n} w^(t,n) ∈ R^N, L_cv = cv²(v), summed over
  modules, weight β = 3·10⁻⁴.
* **Init** (the authors' code): W_i and M_i Kaiming-uniform (a = √5), biases 0, so the experts act from
  step 0; the router's spatial pooling Linear(H·W → 1) truncated-normal (std 0.02); the rest PyTorch's
  defaults.

Unpinned details follow the official code (``YuqiYang213/MLoRE``: ``models/transformers/MLoRE.py``,
``MLoRE_repara.py``, ``losses/loss_schemes.py``, ``configs/pascal/pascal_vitLp16_MLoRE.yml``); the paper's
method section was not readable here. Deviations, each a config switch or forced by the backbone:

* The paper fine-tunes the whole ViT; here the backbone is frozen like every adapter's base model (list
  backbone modules in ``modules_to_save`` to train them in full, the paper's setting).
* The paper's four taps share one resolution (ViT); a CNN's stages do not, so each scale's modules run at
  the tap's own resolution and the per-task fusion upsamples every scale to the finest tap first.
* ``noise="softplus"`` replaces the unconstrained σ by softplus(σ) (the sheet's declared option);
  ``generic_path`` and ``detach_generic`` switch the generic path and its stop-gradient off for ablations,
  and ``modules_per_scale=0`` leaves out every MLoRE module (the baseline of per-task heads alone).

Wiring: the core injects only by replacing modules, and a decoder runs *after* the backbone, so
:class:`MLoREModel` (an :class:`~lorafam_nb.core.AdapterModel`) replaces each tapped module by a pass-through
:class:`MLoRETap` that hands its output to the decoder, and keeps the decoder in the model's adapter scope
(saved with the adapter).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, AdapterContext, AdapterLayer, AdapterModel,
                    AdapterScope, MethodCard, Site, read_json, read_tensors, register_method, require_positive_ints,
                    site_of, suffix_match)
from .losses import cv_squared
from .routers import Routing, softmax, top_k

__all__ = ["LowRankConvExperts", "MLoREConfig", "MLoREDecoder", "MLoREModel", "MLoREModule", "MLoRERouter",
           "MLoRETap", "dense_gates", "fuse_bn", "last_gates", "mlore_gate", "mlore_module_parameters",
           "reparameterization_gap"]

NOISE = ("raw", "softplus")


# --- the pieces of one module -------------------------------------------------------------------------------

class LowRankConvExperts(nn.Module):
    """N low-rank convolutions ``LR_i(F) = M_i * (W_i * F)`` of ranks ``ranks`` (C_in → r_i → C_out).

    Stored concatenated over experts, so that a weighted mixture is two convolutions, whatever N:
    ``W`` (Σr, C_in, k, k) with ``W_bias`` (Σr,), ``M`` (C_out, Σr) with ``M_bias`` (N, C_out). Expert i owns
    the rows ``offsets[i]:offsets[i+1]`` of W and the columns of M.
    """

    def __init__(self, ranks: list[int] | tuple[int, ...], c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        require_positive_ints(**{f"rank {i}": r for i, r in enumerate(ranks)}, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        self.ranks, self.kernel_size = tuple(ranks), kernel_size
        self.register_buffer("rank_owner", torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)),
                             persistent=False)  # (Σr,): the expert each rank row belongs to
        total = sum(ranks)
        self.W = nn.Parameter(torch.empty(total, c_in, kernel_size, kernel_size))
        self.W_bias = nn.Parameter(torch.zeros(total))
        self.M = nn.Parameter(torch.empty(c_out, total))
        self.M_bias = nn.Parameter(torch.zeros(len(ranks), c_out))
        # kaiming_uniform_(a=√5) expert by expert: bound 1/√fan_in. W_i's fan-in, C_in·k², is the same for every
        # expert (one draw for all); M_i's, r_i, is not.
        nn.init.uniform_(self.W, -1 / math.sqrt(c_in * kernel_size**2), 1 / math.sqrt(c_in * kernel_size**2))
        for i, (lo, hi) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            nn.init.uniform_(self.M[:, lo:hi], -1 / math.sqrt(ranks[i]), 1 / math.sqrt(ranks[i]))

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @property
    def offsets(self) -> list[int]:
        return [0, *torch.tensor(self.ranks).cumsum(0).tolist()]

    def factors(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Expert i as conv weights: (W_i (r_i, C_in, k, k), b_{W_i}, M_i (C_out, r_i, 1, 1), b_{M_i})."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.W[lo:hi], self.W_bias[lo:hi], self.M[:, lo:hi, None, None], self.M_bias[i]

    def forward(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        """``Σ_i w_ni LR_i(x_n)`` for x (B, C_in, H, W) and per-image weights w (B, N) (None: all ones).

        One k×k conv to all Σr rank channels, each scaled by its expert's weight, then one 1×1 conv back:
        Σ_i w_i (M_i (W_i x + b_{W_i}) + b_{M_i}) = M (w_rows ⊙ (W x + b_W)) + Σ_i w_i b_{M_i}."""
        z = F.conv2d(x, self.W, self.W_bias, padding=self.kernel_size // 2)
        if w is None:
            return F.conv2d(z, self.M[..., None, None]) + self.M_bias.sum(0)[:, None, None]
        z = z * w[:, self.rank_owner, None, None].to(z.dtype)
        return F.conv2d(z, self.M[..., None, None]) + (w.to(z.dtype) @ self.M_bias)[:, :, None, None]

    def kernel(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The mixture as one conv per image: (Σ_i w_ni K_i (B, C_out, C_in, k, k), Σ_i w_ni b_i (B, C_out)),
        K_i = M_i W_i, b_i = M_i b_{W_i} + b_{M_i}."""
        w_rows = w[:, self.rank_owner].to(self.W.dtype)  # (B, Σr)
        K = torch.einsum("or,nr,rikl->noikl", self.M, w_rows, self.W)
        b = (w_rows * self.W_bias) @ self.M.t() + w.to(self.W.dtype) @ self.M_bias
        return K, b

    def extra_repr(self) -> str:
        return (f"ranks={list(self.ranks)}, c_in={self.W.shape[1]}, c_out={self.M.shape[0]}, "
                f"kernel_size={self.kernel_size}")


def fuse_bn(K: Tensor, b: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A conv (K (…, C_out, C_in, k, k), b (…, C_out)) followed by ``bn`` in eval mode, as one conv:
    K·γ/√(var+ε), β + (b − μ)·γ/√(var+ε) with the running statistics."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return K * scale[:, None, None, None], bn.bias + (b - bn.running_mean) * scale


def mlore_gate(logits: Tensor, k: int, pre_softmax: bool = False) -> Routing:
    """The paper's top-k gate over N experts (the official code's ``pre_softmax=False``, its default): softmax
    over all N, then the N − k smallest probabilities set to 0, *without* renormalising (Σ w < 1).
    ``pre_softmax=True`` masks the logits before the softmax instead, i.e. the top k renormalised (:func:`top_k`).
    ``weights`` are (B, k), aligned with ``selected``; :func:`dense_gates` scatters them to (B, N)."""
    if pre_softmax:
        return top_k(logits, k)
    probs = softmax(logits)
    weights, selected = probs.topk(k, dim=-1)
    return Routing(logits, probs, weights, selected)


def dense_gates(routing: Routing) -> Tensor:
    """(B, N) expert weights, 0 off each image's top k."""
    return torch.zeros_like(routing.probs).scatter(-1, routing.selected, routing.weights)


class MLoRERouter(nn.Module):
    """The task-specific router: a C/2 descriptor of the whole map F, then [ℓ (N), σ (N), m (1)] per image.

    Descriptor (the official code's ``SpatialAtt``): [ mean_hw Mix(GELU(LN(Reduce F))) ; Proj(GELU(LN(Pool F))) ],
    Reduce a 1×1 conv C → C/4, Mix C/4 → C/4, Pool a learned Linear(H·W → 1) over positions (which fixes the
    input resolution), Proj C → C/4. Mix is 1×1 and linear, so it runs after the spatial mean (same result,
    H·W times cheaper)."""

    def __init__(self, channels: int, hw: int, num_experts: int) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"the router splits C into quarters: decoder_dim must be a multiple of 4, got {channels}")
        quarter = channels // 4
        self.num_experts, self.hw = num_experts, hw
        self.reduce = nn.Conv2d(channels, quarter, 1)
        self.norm = nn.LayerNorm(quarter)
        self.mix = nn.Linear(quarter, quarter)
        self.pool = nn.Linear(hw, 1)
        self.pool_norm = nn.LayerNorm(channels)
        self.pool_proj = nn.Linear(channels, quarter)
        self.gate = nn.Linear(2 * quarter, 2 * num_experts + 1)
        nn.init.trunc_normal_(self.pool.weight, std=0.02)  # the authors' ViT init, which covers this Linear
        nn.init.zeros_(self.pool.bias)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(ℓ (B, N), σ (B, N), m (B,)) for F (B, C, H, W)."""
        B, _, H, W = f.shape
        if H * W != self.hw:
            raise ValueError(f"the router's spatial pooling Linear(H·W → 1) was built for {self.hw} positions; this "
                             f"feature map has {H}×{W} = {H * W}: feed images of the config's image_size")
        a = self.norm(self.reduce(f).permute(0, 2, 3, 1))  # LayerNorm over channels, per position
        a = self.mix(F.gelu(a).mean(dim=(1, 2)))
        s = self.pool_proj(F.gelu(self.pool_norm(self.pool(f.flatten(2)).squeeze(-1))))
        out = self.gate(torch.cat([a, s], dim=-1))
        N = self.num_experts
        return out[:, :N], out[:, N:2 * N], out[:, 2 * N]


class MLoREModule(nn.Module):
    """One MLoRE module over T tasks at one resolution: shared experts and generic conv, per-task input/output
    1×1 convs, router, task-specific low-rank conv and two BNs (see the module docstring for the equations).

    ``reparameterized`` (set by :meth:`MLoREModel.merge`) runs the three paths as one conv per image; it needs
    eval mode."""

    def __init__(self, tasks: list[str], channels: int, hw: int, ranks: list[int], top_k: int, task_r: int,
                 kernel_size: int = 3, pre_softmax: bool = False, noise: str = "raw", generic_path: bool = True,
                 detach_generic: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= len(ranks):
            raise ValueError(f"top_k must be between 1 and num_experts={len(ranks)}, got {top_k}")
        if noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
        C = channels
        self.tasks, self.top_k, self.pre_softmax, self.noise = list(tasks), top_k, pre_softmax, noise
        self.detach_generic, self.kernel_size = detach_generic, kernel_size
        self.reparameterized = False
        self.experts = LowRankConvExperts(ranks, C, C, kernel_size)  # shared by every task
        self.generic = nn.Conv2d(C, C, kernel_size, padding=kernel_size // 2) if generic_path else None
        self.conv_in = nn.ModuleDict({t: nn.Conv2d(C, C, 1) for t in tasks})
        self.router = nn.ModuleDict({t: MLoRERouter(C, hw, len(ranks)) for t in tasks})
        self.spec = nn.ModuleDict({t: LowRankConvExperts([task_r], C, C, kernel_size) for t in tasks})
        self.bn_all = nn.ModuleDict({t: nn.BatchNorm2d(C) for t in tasks})
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(C) for t in tasks})
        self.conv_out = nn.ModuleDict({t: nn.Conv2d(C, C, 1) for t in tasks})

    def _task(self, task: str) -> str:
        if task not in self.conv_in:
            raise ValueError(f"unknown task {task!r}; this module serves {self.tasks}")
        return task

    def route(self, f: Tensor, task: str) -> tuple[Routing, Tensor]:
        """Task ``task``'s routing of the images of F: the top-k gate and the task expert's scale m (B,)."""
        logits, sigma, m = self.router[task](f)
        if self.training:
            sigma = F.softplus(sigma) if self.noise == "softplus" else sigma
            logits = logits + sigma * torch.randn_like(logits)
        return mlore_gate(logits, self.top_k, self.pre_softmax), m

    def mixed(self, f: Tensor, task: str, routing: Routing, m: Tensor) -> Tensor:
        """G by its three paths (training form)."""
        g = self.bn_all[task](self.experts(f, dense_gates(routing))) + m[:, None, None, None] * self.spec[task](f)
        if self.generic is not None:
            # Stop-gradient: the generic conv learns from every task but pushes nothing back into F (nor the backbone).
            g = g + self.generic(f.detach() if self.detach_generic else f)
        return g

    def fused_kernel(self, task: str, routing: Routing, m: Tensor) -> tuple[Tensor, Tensor]:
        """The per-image conv (K (B, C, C, k, k), b (B, C)) that equals :meth:`mixed` in eval mode."""
        K, b = fuse_bn(*self.experts.kernel(dense_gates(routing)), self.bn_all[task])
        K_s, b_s = self.spec[task].kernel(m.new_ones(m.shape[0], 1))
        K, b = K + m[:, None, None, None, None] * K_s, b + m[:, None] * b_s
        if self.generic is not None:
            K, b = K + self.generic.weight, b + self.generic.bias
        return K, b

    def fused(self, f: Tensor, task: str, routing: Routing, m: Tensor) -> Tensor:
        """G as one k×k conv per image, all images in one grouped conv (groups = B)."""
        B, C, H, W = f.shape
        K, b = self.fused_kernel(task, routing, m)
        g = F.conv2d(f.reshape(1, B * C, H, W), K.reshape(B * C, C, *K.shape[-2:]), b.reshape(-1),
                     padding=self.kernel_size // 2, groups=B)
        return g.view(B, -1, H, W)

    def forward(self, x: Tensor, task: str) -> tuple[Tensor, Routing]:
        """(Y, routing) for the input map x (B, C, H, W) of task ``task``."""
        task = self._task(task)
        f = self.conv_in[task](x)
        routing, m = self.route(f, task)
        if self.reparameterized:
            if self.training:
                raise RuntimeError("a re-parameterised MLoRE module runs in eval mode only (BN's running statistics, "
                                   "no router noise): call model.eval(), or unmerge() to train")
            g = self.fused(f, task, routing, m)
        else:
            g = self.mixed(f, task, routing, m)
        return self.conv_out[task](F.gelu(self.bn[task](g))), routing


# --- the decoder --------------------------------------------------------------------------------------------

class MLoREDecoder(nn.Module):
    """S scales → per-task dense predictions.

    Scale s: ``project[s]`` (1×1, c_s → C), then ``scales[s]`` (``modules_per_scale`` MLoRE modules, each
    task's output feeding the same task's next module). Per task: the S outputs upsampled to the finest
    tap's size, fused with per-pixel softmax weights (``scale_gate``: 1×1 S·C → C, BN, GELU, 3×3 C → S),
    upsampled ×``head_upsample``, then ``head`` (3×3 C → C, BN, GELU, 1×1 C → outputs); the caller resizes
    to the image. The head is the library's: the reference's ``ConvHead_up`` was not pinned."""

    def __init__(self, config: MLoREConfig, channels: list[int], sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        C, S = config.decoder_dim, len(channels)
        self.tasks, self.head_upsample = list(config.tasks), config.head_upsample
        self.project = nn.ModuleList([nn.Conv2d(c, C, 1) for c in channels])
        self.scales = nn.ModuleList([
            nn.ModuleList([config.module(h * w) for _ in range(config.modules_per_scale)]) for h, w in sizes])
        self.scale_gate = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(S * C, C, 1), nn.BatchNorm2d(C), nn.GELU(),
                                                          nn.Conv2d(C, S, 3, padding=1)) for t in self.tasks})
        self.head = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.GELU(),
                                                    nn.Conv2d(C, n, 1)) for t, n in config.tasks.items()})

    def forward(self, taps: list[Tensor]) -> tuple[dict[str, Tensor], list[tuple[str, Routing]]]:
        """(task → (B, outputs, H_0·u, W_0·u) predictions, [(route name, routing)]) for the S tapped maps."""
        routes: list[tuple[str, Routing]] = []
        per_task: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        size = max((tap.shape[-2:] for tap in taps), key=lambda hw: hw[0] * hw[1])  # fuse at the finest tap
        for s, (tap, project, modules) in enumerate(zip(taps, self.project, self.scales)):
            x = project(tap)
            for t in self.tasks:
                y = x
                for j, module in enumerate(modules):
                    y, routing = module(y, t)
                    routes.append((f"scales.{s}.{j}/{t}", routing))
                per_task[t].append(F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                                   if y.shape[-2:] != size else y)
        out = {}
        for t, maps in per_task.items():
            a = torch.softmax(self.scale_gate[t](torch.cat(maps, dim=1)), dim=1)  # (B, S, H, W)
            fused = sum(a[:, s:s + 1] * y for s, y in enumerate(maps))
            if self.head_upsample > 1:
                fused = F.interpolate(fused, scale_factor=self.head_upsample, mode="bilinear", align_corners=False)
            out[t] = self.head[t](fused)
        return out, routes


# --- injection --------------------------------------------------------------------------------------------

class MLoRETap(AdapterLayer):
    """The tapped backbone module, unchanged, whose output :class:`MLoREModel` hands to the decoder."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.sink: dict[str, Tensor] | None = None  # set by MLoREModel

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.sink is None:
            raise RuntimeError("MLoRE is a decoder on top of the backbone: build the model with "
                               "MLoREModel(backbone, config), not get_adapter_model")
        self.sink[self.site] = out
        return out


def mlore_module_parameters(channels: int, ranks: list[int], kernel_size: int, task_r: int, num_tasks: int,
                            hw: int, generic_path: bool = True) -> dict[str, int]:
    """Trainable parameters of one MLoRE module by part (the sheet's closed form, the router spelled out):

    experts Σ r_i (k²C + C + 1) + N C; generic k²C² + C; per task 2(C² + C) (in/out 1×1) + r_s (k²C + C + 1) + C
    (task expert) + 4C (two BNs) + router, the router (C/4)(C + 1) + C/2 + (C/4)(C/4 + 1) + (HW + 1) + 2C +
    (C/4)(C + 1) + (C/2 + 1)(2N + 1)."""
    C, k2, N, q = channels, kernel_size**2, len(ranks), channels // 4
    router = q * (C + 1) + 2 * q + q * (q + 1) + (hw + 1) + 2 * C + q * (C + 1) + (2 * q + 1) * (2 * N + 1)
    task_expert = task_r * (k2 * C + C + 1) + C
    per_task = 2 * (C * C + C) + task_expert + 4 * C + router
    parts = {"experts": sum(ranks) * (k2 * C + C + 1) + N * C,
             "generic": k2 * C * C + C if generic_path else 0,
             "router": router, "task_expert": task_expert, "per_task": per_task}
    return parts | {"total": parts["experts"] + parts["generic"] + num_tasks * per_task}


@register_method
@dataclass
class MLoREConfig(AdapterConfig):
    """MLoRE's hyperparameters, peft-style names, the paper's values as defaults.

    ``target_modules``: the backbone modules whose outputs (B, c_s, H_s, W_s) are the S scales (module names or
    suffixes, or a regular expression; ``[]``: the last four resolution stages of an ``EfficientNetFeatures``).
    ``tasks``: task name → output channels (default: the easy-VQA dense targets of
    :func:`lorafam_nb.vision_data.dense_targets`). ``decoder_dim`` C; expert ranks ``r``, ``r + rank_step``, …
    (``num_experts`` of them), ``top_k`` active; ``task_r`` the task expert's rank r_s; ``kernel_size`` of
    the experts' down conv and the generic conv; ``modules_per_scale`` MLoRE modules stacked per scale (0: none,
    the baseline of per-task heads on the projected, fused taps);
    ``image_size`` the (square) input side, fixed by the routers' spatial pooling; ``router_aux_loss_coef`` β.
    """

    target_modules: list[str] | str = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=lambda: {"segmentation": 4, "mask": 1, "edges": 1, "distance": 1})
    decoder_dim: int = 452
    r: int = 16
    rank_step: int = 8
    num_experts: int = 15
    top_k: int = 9
    task_r: int = 72
    kernel_size: int = 3
    modules_per_scale: int = 2
    image_size: int = 384
    head_upsample: int = 4
    pre_softmax: bool = False
    noise: str = "raw"
    generic_path: bool = True
    detach_generic: bool = True
    router_aux_loss_coef: float = 3e-4

    method: ClassVar[str] = "mlore"
    modality: ClassVar[str] = "dense"  # a decoder for dense prediction: compared in its own chapter
    card = MethodCard(
        title="MLoRE", paper="Yang et al., CVPR 2024", arxiv="2403.17749", date="2024-03",
        idea=r"a multi-task dense-prediction decoder: low-rank conv experts routed per image and task, plus a "
             r"generic conv shared by all tasks (stop-gradient input); all paths fold into one conv per image",
        trains=r"decoder: experts $W_i, M_i$, generic conv, per-task routers, 1×1 convs, task experts, BNs, heads",
        frozen=r"backbone (the paper trains it too)", mergeable=False,
        params=r"\sum_i r_i(k^2C+C+1)+NC+k^2C^2+C+T\,[2(C^2+C)+r_s(k^2C+C+1)+5C+\text{router}]",
        chapter="mlore", bibkey="yang2024mlore", params_note="per MLoRE module (C channels, T tasks)",
        merge_note="a decoder: nothing folds into the backbone; merge() re-parameterises each module into one conv "
                   "per image",
    )

    def __post_init__(self) -> None:
        require_positive_ints(decoder_dim=self.decoder_dim, r=self.r, num_experts=self.num_experts,
                              top_k=self.top_k, task_r=self.task_r, kernel_size=self.kernel_size,
                              image_size=self.image_size, head_upsample=self.head_upsample)
        if not isinstance(self.modules_per_scale, int) or self.modules_per_scale < 0:
            raise ValueError(f"modules_per_scale must be a non-negative integer (0: no MLoRE module, the "
                             f"projections, scale fusion and task heads alone), got {self.modules_per_scale!r}")
        if not isinstance(self.rank_step, int) or self.rank_step < 0:
            raise ValueError(f"rank_step must be a non-negative integer, got {self.rank_step!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.decoder_dim % 4:
            raise ValueError(f"the router splits C into quarters: decoder_dim must be a multiple of 4, got "
                             f"{self.decoder_dim}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output), got {self.kernel_size}")
        if self.noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {self.noise!r}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task (name → output channels)")
        for name, outputs in self.tasks.items():
            if not name.isidentifier():
                raise ValueError(f"task names must be identifiers (they name modules), got {name!r}")
            require_positive_ints(**{f"outputs of task {name!r}": outputs})

    def expert_ranks(self) -> list[int]:
        """r_i = r + (i − 1)·rank_step, i = 1..N (the paper: 16, 24, …, 128)."""
        return [self.r + i * self.rank_step for i in range(self.num_experts)]

    def module(self, hw: int) -> MLoREModule:
        """One MLoRE module for maps of ``hw`` positions."""
        return MLoREModule(list(self.tasks), self.decoder_dim, hw, self.expert_ranks(), self.top_k, self.task_r,
                           self.kernel_size, self.pre_softmax, self.noise, self.generic_path, self.detach_generic)

    def sites(self, model: nn.Module) -> list[Site]:
        names = self.target_modules
        if names == [] and hasattr(model, "stage_ends") and hasattr(model, "blocks"):
            names = [f"blocks.{i}" for i in model.stage_ends[-4:]]  # the paper taps four depths
        if not names:
            raise ValueError(f"target_modules must name the backbone modules to tap; "
                             f"{type(model).__name__} has no resolution stages to default to")
        modules = [n for n, _ in model.named_modules() if n]
        if isinstance(names, str):  # a regular expression over whole names, as the core reads one
            found = [n for n in modules if re.fullmatch(names, n)]
            if not found:
                raise ValueError(f"target_modules={names!r} matches no module of {type(model).__name__}")
        else:
            found = []
            for name in names:
                hits = [n for n in modules if suffix_match(n, [name])]
                if not hits:
                    raise ValueError(f"target_modules entry {name!r} matches no module of {type(model).__name__}")
                found += [h for h in hits if h not in found]
        return [site_of(model, n, kind="tap") for n in found]

    def build_layer(self, site: Site, scope: AdapterScope) -> MLoRETap:
        return MLoRETap(site.module)

    def decoder_parameters(self, channels: list[int], sizes: list[tuple[int, int]]) -> int:
        """Closed-form trainable parameters of the whole decoder for taps of ``channels`` at ``sizes``."""
        C, S, T = self.decoder_dim, len(channels), len(self.tasks)
        project = sum(c * C + C for c in channels)
        modules = self.modules_per_scale * sum(
            mlore_module_parameters(C, self.expert_ranks(), self.kernel_size, self.task_r, T, h * w,
                                    self.generic_path)["total"] for h, w in sizes)
        gate = T * (S * C * C + C + 2 * C + 9 * C * S + S)
        head = sum(9 * C * C + C + 2 * C + C * n + n for n in self.tasks.values())
        return project + modules + gate + head

    def aux_loss_weights(self) -> dict[str, float]:
        return {"load_balance": self.router_aux_loss_coef}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        """Σ over modules of cv²(v), v the gates averaged over the module's tasks and images together."""
        if self.router_aux_loss_coef == 0 or not context.routes:
            return {}
        by_module: dict[str, list[Tensor]] = {}
        for route in context.routes:
            w = torch.zeros_like(route.probs).scatter(-1, route.selected, self._weights(route.probs, route.selected))
            by_module.setdefault(route.layer.split("/")[0], []).append(w)
        return {"load_balance": torch.stack([cv_squared(torch.cat(ws).mean(0)) for ws in by_module.values()]).sum()}

    def _weights(self, probs: Tensor, selected: Tensor) -> Tensor:
        top = probs.gather(-1, selected)
        return top / top.sum(-1, keepdim=True) if self.pre_softmax else top


class MLoREModel(AdapterModel):
    """A backbone with MLoRE's decoder: ``model(pixel_values)`` → {task: (B, outputs, H, W) at the image size}.

    The backbone is frozen (its modules in ``modules_to_save`` train in full); a frozen backbone stays in eval
    mode (its BN statistics and stochastic depth are ImageNet training's business). Each MLoRE module's routing
    is reported to the context (``model.recorder``; the load-balance term in ``model.aux_loss()``).
    ``merge()`` re-parameterises every module into one conv per image (eval mode); ``unmerge()`` undoes it."""

    def __init__(self, model: nn.Module, config: MLoREConfig) -> None:
        super().__init__(model, config)
        self._features: dict[str, Tensor] = {}
        self.taps = list(self.adapter_layers())
        for layer in self.adapter_layers().values():
            layer.sink = self._features
        channels, sizes = self._tap_shapes(config)
        self.adapter_scope.shared("decoder", lambda: MLoREDecoder(config, channels, sizes))

    @property
    def decoder(self) -> MLoREDecoder:
        return self.adapter_scope.entries["decoder"]

    @torch.no_grad()
    def _tap_shapes(self, config: MLoREConfig) -> tuple[list[int], list[tuple[int, int]]]:
        """Channels and sizes of the tapped maps, from one forward of a blank image (eval mode)."""
        training = self.model.training
        p = next(self.model.parameters())
        self.model.eval()
        try:
            self._features.clear()
            self.model(torch.zeros(1, 3, config.image_size, config.image_size, dtype=p.dtype, device=p.device))
        finally:
            self.model.train(training)
        maps = [self._features[n] for n in self.taps]
        bad = [n for n, y in zip(self.taps, maps) if not (isinstance(y, Tensor) and y.dim() == 4)]
        if bad:
            raise ValueError(f"MLoRE taps need (B, C, H, W) feature maps; {bad} give other outputs")
        return [y.shape[1] for y in maps], [tuple(y.shape[-2:]) for y in maps]

    def train(self, mode: bool = True) -> MLoREModel:
        super().train(mode)
        if not any(p.requires_grad for p in self.model.parameters()):
            self.model.eval()
        return self

    def forward(self, pixel_values: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        size = self.adapter_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"expected pixel_values (B, 3, {size}, {size}) (the config's image_size, which the "
                             f"routers' spatial pooling fixes); got {tuple(pixel_values.shape)}")
        self._features.clear()
        super().forward(pixel_values, **kwargs)
        preds, routes = self.decoder([self._features[n] for n in self.taps])
        for name, routing in routes:
            self.context.route(name, routing.logits, routing.probs, routing.selected, routing.logits)
        return {t: F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False)
                if tuple(y.shape[-2:]) != (size, size) else y for t, y in preds.items()}

    def mlore_modules(self) -> dict[str, MLoREModule]:
        return {n: m for n, m in self.decoder.named_modules() if isinstance(m, MLoREModule)}

    def merge(self) -> None:
        """Re-parameterise: every MLoRE module runs as one conv per image (exact in eval mode)."""
        for module in self.mlore_modules().values():
            module.reparameterized = True

    def unmerge(self) -> None:
        for module in self.mlore_modules().values():
            module.reparameterized = False

    def merge_and_unload(self) -> nn.Module:
        raise ValueError("MLoRE is a decoder: nothing folds into the backbone (merge() re-parameterises the decoder)")

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> MLoREModel:
        """An adapter saved by :meth:`save_adapter`, injected into ``model`` (the config is read without the
        method registry)."""
        directory = Path(directory)
        data = read_json(directory / CONFIG_FILE)
        if data.pop("method", None) != MLoREConfig.method:
            raise ValueError(f"{directory} holds no {MLoREConfig.method!r} adapter")
        return cls.inject_and_load(model, MLoREConfig(**data), read_tensors(directory / WEIGHTS_FILE), str(directory))


MLoREConfig.model_class = MLoREModel  # get_adapter_model builds the backbone with its decoder


# --- read-outs of a (trained) model -------------------------------------------------------------------------

def last_gates(model: MLoREModel) -> dict[str, Tensor]:
    """The (B, N) expert weights w of every route ("scales.s.j/task") of the model's last forward, 0 off each
    image's top k (as the module mixed its experts: un-renormalised unless ``pre_softmax``)."""
    config = model.adapter_config
    return {r.layer: torch.zeros_like(r.probs).scatter(-1, r.selected, config._weights(r.probs, r.selected))
            for r in model.context.routes}


@torch.no_grad()
def reparameterization_gap(model: MLoREModel, pixel_values: Tensor) -> dict[str, float]:
    """How far the re-parameterised forward is from the multi-path one on these images, in eval mode: for
    every module and task (its route's name), max |Y_multi-path − Y_reparam| of the module's output on the
    input it receives in the model (its three paths against one grouped conv per image, :meth:`MLoREModule.fused`),
    and for every task ("output/<task>") max |Y − Y_merged| of the model's predictions (:meth:`MLoREModel.merge`).
    The model is left unmerged, in the mode it was in."""
    was_training, inputs = model.training, []
    model.eval()
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: inputs.append((name, m, *args)))
             for name, m in model.mlore_modules().items()]
    try:
        before = model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    gaps = {}
    try:
        for name, module, x, task in inputs:
            multi = module(x, task)[0]
            module.reparameterized = True
            gaps[f"{name}/{task}"] = float((module(x, task)[0] - multi).abs().max())  # the route's name
            module.reparameterized = False
        model.merge()
        after = model(pixel_values)
    finally:
        model.unmerge()
        model.train(was_training)
    return gaps | {f"output/{t}": float((before[t] - after[t]).abs().max()) for t in before}
