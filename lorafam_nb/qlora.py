"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv 2305.14314).

LoRA with the frozen base stored in 4 bits. Symbols follow the paper (Section 3, Eqs. 1-6); note that
its ``c_2`` are the first-level block constants and ``c_1`` the second-level ones.

* **Block-wise absmax quantisation.** The weight ``W`` (``d_out × d_in``, PyTorch layout) is
  flattened in storage order and cut into blocks of ``B_1 = 64`` values. Block ``b`` keeps its
  constant ``c_{2,b} = max_{i∈b} |W_i|`` and one 4-bit index per value into a table of 16 code
  values ``q_0 < … < q_15`` in ``[-1, 1]``: ``W^{4bit}_i = argmin_j |W_i / c_{2,b} - q_j|``, and
  ``dequant(c_2, W^{4bit})_i = c_{2,b} · q_{W^{4bit}_i}``.
* **NF4 code values.** Quantiles of ``N(0, 1)``, so that every code is used equally often by
  normally distributed weights, with an exact zero. bitsandbytes' construction (the source of the
  published table): 8 positive levels ``Q(p)`` at ``p`` evenly spaced over ``(1/2, 1 - δ]`` (9 points,
  ``1/2`` dropped), 7 negative levels ``-Q(p)`` over ``(1/2, 1 - δ]`` (8 points, ``1/2`` dropped),
  one ``0``, divided by the largest; ``δ = ½ (1/32 + 1/30)``, the mean of the centres of the
  outermost bins of a 16-bin and a 15-bin equal-mass partition (``Q(1) = ∞`` cannot be used);
  bitsandbytes writes ``1 - δ`` as 0.9677083.
* **Double quantisation.** The FP32 constants ``c_2`` (32 bits per 64 weights = 0.5 bit/param)
  are quantised again: their mean ``μ`` is subtracted (they are all positive; centring makes the
  symmetric 8-bit type usable), and ``c_2 - μ`` is block-wise absmax-quantised to 8 bits in
  blocks of ``B_2 = 256``, with one FP32 second-level constant ``c_1`` per block. Overhead:
  ``8/64 + 32/(64·256) ≈ 0.127`` bit/param. The 8-bit type is bitsandbytes' signed dynamic
  ("tree") type that ``quantize_blockwise`` uses by default; the paper calls it "8-bit Floats".
* **Forward** (Eq. 5): ``Y = X doubleDequant(c_1, c_2^{8bit}, W^{NF4})ᵀ + s · X Aᵀ Bᵀ``, the
  dequantised weight built in the compute dtype (BF16 in the paper) for each matmul and thrown
  away; backward rebuilds it for ``∂L/∂X`` and forms no gradient for it. The paper's ``L_1, L_2``
  are ``Aᵀ, Bᵀ`` here (``A ∈ R^{r×d_in}``, ``B ∈ R^{d_out×r}``, ``B = 0`` at init, ``s = α/r``).

Two 4-bit indices share one byte (the first in the high nibble, as bitsandbytes stores them), so
the bytes this module reports are the bytes it holds. Only the LoRA factors and the head are
saved: the quantised base is a deterministic function of the base checkpoint and is rebuilt from
it when an adapter is loaded.

On a GPU with bitsandbytes installed, :func:`to_bitsandbytes` runs the 4-bit base through its CUDA kernels
instead of this module's de-quantisation in plain PyTorch (the same NF4 codes; a test compares the two).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import MethodCard, register_method, require_positive_ints
from .lora import LoraConfig, LoRALinear

__all__ = [
    "CODEBOOKS", "NF4_DELTA", "NF4_OFFSET", "Linear4bit", "QLoraConfig", "QLoRALinear", "blockwise_dequantize",
    "blockwise_quantize", "dynamic_code", "normal_float_code", "pack_4bit", "to_bitsandbytes", "unpack_4bit",
]

NF4_DELTA = 0.5 * (1 / 32 + 1 / 30)
# 1 - δ rounded to 7 decimals, as bitsandbytes writes it (`create_normal_map(offset=0.9677083)`).
NF4_OFFSET = 0.9677083
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def normal_float_code(k: int = 4, offset: float = NF4_OFFSET) -> Tensor:
    """The 2^k NormalFloat code values, ascending, in [-1, 1] with an exact 0 (NF4 for k = 4).

    Probabilities run in equal steps from ``offset = 1 - δ`` down to ½ (excluded): 2^{k-1} of them for the
    positive levels, one fewer for the negative ones. With bitsandbytes' arithmetic (probabilities in
    float32, quantiles in float64, normalisation in float32) this reproduces its published table bit
    for bit.
    """
    half = 2 ** (k - 1)
    p_pos = torch.linspace(offset, 0.5, half + 1)[:-1].double()
    p_neg = torch.linspace(offset, 0.5, half)[:-1].double()
    q = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(p_neg)])
    q = q.float()
    return (q / q.max()).sort().values


def _fp4_code() -> Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) magnitudes {0, 1/16, 2, 3, 4, 6, 8, 12}/12;
    ±0 coincide, so 15 distinct values."""
    magnitudes = torch.tensor([0.0625, 2, 3, 4, 6, 8, 12]) / 12
    return torch.cat([-magnitudes.flip(0), torch.zeros(1), magnitudes])


def _int4_code() -> Tensor:
    """Uniform symmetric int4 under absmax scaling: k/7 for k = -7…7 (15 levels, as bitsandbytes' int4)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


CODEBOOKS = {"nf4": normal_float_code, "fp4": _fp4_code, "int4": _int4_code}


def dynamic_code() -> Tensor:
    """The signed 8-bit dynamic ("tree") type of bitsandbytes, 256 values ascending in [-1, 1].

    Besides the sign, a run of leading zero bits picks a decade ``10^{e-6}`` (e = 0…6) and the bits
    after the terminating one are a linear fraction: decade ``e`` holds ``2^e`` values, the midpoints
    of ``2^e`` equal steps over ``[0.1, 1]``. Small magnitudes keep a relative precision that a
    linear 8-bit grid would lose. Plus ``0`` and ``1``: 2 + 2·127 = 256 codes.
    """
    values = [torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** e + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        values += [mids, -mids]
    return torch.cat(values).sort().values.float()


def blockwise_quantize(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Absmax quantisation of ``x`` (flattened in storage order) in blocks of ``blocksize``.

    Returns the index of the nearest code value for every element (uint8, ``x.numel()`` long) and
    the FP32 absmax of every block. ``code`` must be ascending. A short last block is zero-padded
    (padding changes no absmax); an all-zero block gets absmax 0 and dequantises to zeros.
    """
    n = x.numel()
    blocks = F.pad(x.detach().reshape(-1).float(), (0, (-n) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    # Nearest code value = the bucket between the midpoints of neighbouring codes.
    index = torch.bucketize(normed, (code[1:] + code[:-1]) / 2)
    return index.to(torch.uint8).reshape(-1)[:n], absmax


def blockwise_dequantize(index: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """``absmax[b] · code[index_i]`` for every element ``i`` of block ``b`` (flat, float32)."""
    n = index.numel()
    values = F.pad(code[index.long()], (0, (-n) % blocksize)).view(-1, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


def pack_4bit(index: Tensor) -> Tensor:
    """Two 4-bit indices per byte, the first in the high nibble (odd lengths padded with a 0 nibble)."""
    index = F.pad(index.reshape(-1), (0, index.numel() % 2))
    return (index[0::2] << 4) | index[1::2]


def unpack_4bit(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_4bit`: the first ``n`` 4-bit indices as uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:n]


class _DequantMatmul(torch.autograd.Function):
    """``X Ŵᵀ`` with ``Ŵ`` rebuilt from the 4-bit storage in forward and again in backward.

    Nothing weight-sized is saved between the two passes, and no gradient is formed for ``Ŵ``:
    ``∂L/∂X = G Ŵ`` is all the frozen base needs to pass back.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: Linear4bit) -> Tensor:
        ctx.layer = layer
        return F.linear(x.to(layer.compute_dtype), layer.dequantize(layer.compute_dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        layer = ctx.layer
        return g @ layer.dequantize(g.dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight exists only as 4-bit codes plus block constants.

    Buffers (the real storage): ``w_4bit`` (uint8, two codes a byte), ``c2`` (one constant per
    ``blocksize`` weights: FP32, or uint8 codes of ``c2 - c2_mean`` under double quantisation),
    ``c1`` (FP32, one per ``dq_blocksize`` constants) and ``c2_mean`` (FP32 scalar), the last two
    only with double quantisation. The code tables are shared constants, not per-weight storage.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, dq_blocksize: int = 256,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if quant_type not in CODEBOOKS:
            raise ValueError(f"quant_type must be one of {sorted(CODEBOOKS)}, got {quant_type!r}")
        self.out_features, self.in_features = weight.shape
        self.quant_type, self.blocksize, self.compute_dtype = quant_type, blocksize, compute_dtype
        self.double_quant, self.dq_blocksize = double_quant, dq_blocksize
        device = weight.device
        self.register_buffer("code", CODEBOOKS[quant_type]().to(device), persistent=False)
        index, c2 = blockwise_quantize(weight, self.code, blocksize)
        self.register_buffer("w_4bit", pack_4bit(index))
        if double_quant:
            self.register_buffer("dq_code", dynamic_code().to(device), persistent=False)
            self.register_buffer("c2_mean", c2.mean())
            c2_index, c1 = blockwise_quantize(c2 - self.c2_mean, self.dq_code, dq_blocksize)
            self.register_buffer("c2", c2_index)
            self.register_buffer("c1", c1)
        else:
            self.register_buffer("c2", c2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> Linear4bit:
        return cls(linear.weight, linear.bias, **kwargs)

    def block_constants(self) -> Tensor:
        """The per-block absmax ``c_2`` in FP32 (``dequant(c_1, c_2^{8bit}) + μ`` under double quantisation)."""
        if not self.double_quant:
            return self.c2
        return blockwise_dequantize(self.c2, self.c1, self.dq_code, self.dq_blocksize) + self.c2_mean

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``doubleDequant(c_1, c_2, W^{4bit})``: the ``d_out × d_in`` weight, built now, kept by nobody."""
        n = self.out_features * self.in_features
        w = blockwise_dequantize(unpack_4bit(self.w_4bit, n), self.block_constants(), self.code, self.blocksize)
        return w.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _DequantMatmul.apply(x, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of each stored tensor of the quantised weight (bias excluded: it stays in float)."""
        names = ["w_4bit", "c2"] + (["c1", "c2_mean"] if self.double_quant else [])
        return {name: getattr(self, name).nbytes for name in names}

    def bits_per_parameter(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        dq = f", double_quant (dq_blocksize={self.dq_blocksize})" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")


class QLoRALinear(LoRALinear):
    """LoRA on a 4-bit base: ``Linear4bit(W)(x) + s · B A drop(x)``.

    The float ``nn.Linear`` is read once, to quantise it: LoRA's own constructor sees it first (so
    ``A`` is drawn exactly as plain LoRA would draw it from the same seed), then it is replaced by
    its :class:`Linear4bit` and dropped.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, scaling: float,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, scaling)
        self.base_layer = Linear4bit.from_linear(base_layer, quant_type=quant_type, blocksize=blocksize,
                                                 double_quant=double_quant, dq_blocksize=dq_blocksize,
                                                 compute_dtype=compute_dtype)

    def _can_fuse(self) -> bool:
        # LoRA's fused GEMM folds s·BA into a float W0, the one tensor QLoRA never keeps.
        return False

    @torch.no_grad()
    def merge(self) -> None:
        """The 16-bit deployment path: dequantise, add ``s·BA`` exactly, serve a dense ``nn.Linear``.

        One-way: the merged float weight is not re-quantised (that would change the model), so the
        4-bit base is gone after merging.
        """
        if not self.merged:
            q = self.base_layer
            weight = q.dequantize(torch.float32)
            dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device)
            dense.weight.copy_(weight + self.delta_weight())
            if q.bias is not None:
                dense.bias.copy_(q.bias)
            self.base_layer = dense.requires_grad_(False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            raise ValueError("a merged QLoRA layer holds a dense float weight; its 4-bit codes are not kept, and "
                             "re-quantising would not restore them: rebuild the adapter from the base model")


_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


@register_method
@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA: LoRA (``r``, ``lora_alpha``, ``lora_dropout``) on a base quantised to ``quant_type``.

    ``quant_type`` ("nf4"; "fp4" and "int4" for comparison), ``blocksize`` (B_1 = 64),
    ``double_quant`` and ``dq_blocksize`` (B_2 = 256), ``compute_dtype`` (the dtype of the base
    matmul; BF16 in the paper) mirror transformers' ``BitsAndBytesConfig(bnb_4bit_*)``. The paper's
    LoRA settings are r = 64, α = 16, dropout 0.1 (7B/13B) or 0.05 (33B/65B), on all linears.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dq_blocksize: int = 256
    compute_dtype: str = "bfloat16"

    method = "qlora"
    card = MethodCard(
        title="QLoRA", paper="Dettmers et al., NeurIPS 2023", arxiv="2305.14314", date="2023-05",
        idea=r"store the frozen base in 4-bit NormalFloat with double-quantised scales; train a LoRA through the "
             r"de-quantised weight",
        trains=r"$A$, $B$", frozen=r"$W_0$ as NF4 codes and block constants", mergeable=True,
        params=r"r(d_{in}+d_{out})", chapter="qlora", bibkey="dettmers2023qlora",
        params_note=r"the base is stored at about 4.127 bit per parameter",
        merge_note="only into the de-quantised (dense float) weight, one way: the 4-bit codes are gone",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type not in CODEBOOKS:
            raise ValueError(f"quant_type must be one of {sorted(CODEBOOKS)}, got {self.quant_type!r}")
        require_positive_ints(blocksize=self.blocksize, dq_blocksize=self.dq_blocksize)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        # peft's adapter file records no quantisation (that belongs to the base model's loading), so a
        # peft LoRA file is read as plain LoRA; a QLoRA adapter still exports as a peft LoRA.
        return False

    def make_layer(self, name: str, module: nn.Module) -> QLoRALinear:
        return QLoRALinear(module, self.r, self.lora_alpha, self.lora_dropout, self.scaling(),
                           quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                           dq_blocksize=self.dq_blocksize, compute_dtype=_DTYPES[self.compute_dtype])


class BitsAndBytes4bit(nn.Module):
    """A :class:`Linear4bit`'s weight held and multiplied by bitsandbytes' ``Linear4bit`` (CUDA kernels)."""

    def __init__(self, q: Linear4bit) -> None:
        import bitsandbytes as bnb

        super().__init__()
        if q.quant_type not in ("nf4", "fp4") or q.dq_blocksize != 256:
            raise ValueError(f"bitsandbytes stores nf4 or fp4 with second-level blocks of 256; this layer has "
                             f"{q.quant_type} with dq_blocksize={q.dq_blocksize}")
        device = q.w_4bit.device
        if device.type != "cuda":
            raise ValueError(f"bitsandbytes' 4-bit kernels need the model on a CUDA device, not {device}")
        self.in_features, self.out_features, self.quant_type = q.in_features, q.out_features, q.quant_type
        self.layer = bnb.nn.Linear4bit(q.in_features, q.out_features, bias=q.bias is not None,
                                       compute_dtype=q.compute_dtype, compress_statistics=q.double_quant,
                                       quant_type=q.quant_type, device="cpu")
        # Quantising the de-quantised weight gives back the same 4-bit codes (each block's largest value
        # sits on the code ±1, so its absmax is kept); the block constants are double-quantised afresh.
        self.layer.weight = bnb.nn.Params4bit(q.dequantize(torch.float32).cpu(), requires_grad=False,
                                              quant_type=q.quant_type, compress_statistics=q.double_quant,
                                              blocksize=q.blocksize)
        if q.bias is not None:
            self.layer.bias = nn.Parameter(q.bias.detach().cpu().clone(), requires_grad=False)
        self.layer.to(device)  # bitsandbytes quantises on the move to the GPU
        self.bias = self.layer.bias

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        import bitsandbytes as bnb

        weight = self.layer.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).to(x.dtype)


def to_bitsandbytes(model: nn.Module) -> nn.Module:
    """Move every QLoRA base of ``model`` (already on a CUDA device) onto bitsandbytes' kernels, in place.

    Needs ``pip install bitsandbytes`` and a GPU; the LoRA factors and everything else are untouched."""
    for module in model.modules():
        if isinstance(module, QLoRALinear) and isinstance(module.base_layer, Linear4bit):
            module.base_layer = BitsAndBytes4bit(module.base_layer)
    return model
