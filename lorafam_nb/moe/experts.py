"""E LoRA experts in two stacked tensors, and the token dispatch that runs them in a batch.

Expert e is the pair (A_e, B_e) with A ∈ R^{E×r×d_in}, B ∈ R^{E×d_out×r}, scale s = α/r; its update of
a token x is ``s · B_e A_e x``. Two ways to run a mixture, both without a loop over tokens or experts:

* **dense** (:meth:`LoRAExperts.dense`): every expert on every token, weighted by a (T, E) gate. It is
  one rank-E·r LoRA: ``x A_catᵀ`` (T × E·r), scaled per expert by the gate, times ``B_cat``. Cheapest
  when most weights are non-zero (soft routing, or k close to E).
* **sparse** (:class:`Dispatch` + :meth:`LoRAExperts.grouped`): only the k selected experts per token.
  The T·k (token, expert) assignments are sorted by expert and padded into an (E, C, d) block, C the
  largest expert load, so that one batched matmul runs every expert on its own tokens.

:class:`BottleneckAdapters` stacks bottleneck adapters (Houlsby et al., 2019) the same way, for the
mixtures whose experts are adapters on a block's output rather than LoRAs on its weights (PESC, AdaMix):
adapter (i, j) maps u to ``s · (W^up_j GELU(W^down_i u + b^down_i) + b^up_j)``, the branch a layer adds to
its residual u. Paired adapters (i = j) run dense or sparse like the LoRA experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import require_positive_ints

__all__ = ["BottleneckAdapters", "Dispatch", "LoRAExperts"]


@dataclass
class Dispatch:
    """The top-k assignments of T tokens sorted by expert. Assignment i (in sorted order) sends token
    ``token[i]`` to expert ``expert[i]`` with weight ``weight[i]``, at position ``slot[i]`` of that
    expert's group; ``capacity`` is the largest group (the padded width)."""

    token: Tensor  # (N,), N = T·k
    expert: Tensor  # (N,)
    slot: Tensor  # (N,)
    weight: Tensor  # (N,)
    num_tokens: int
    num_experts: int
    capacity: int

    @classmethod
    def build(cls, selected: Tensor, weights: Tensor, num_experts: int) -> Dispatch:
        num_tokens, k = selected.shape
        flat = selected.reshape(-1)
        expert, order = flat.sort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(flat.numel(), device=flat.device) - starts[expert]
        return cls(order // k, expert, slot, weights.reshape(-1)[order], num_tokens, num_experts,
                   int(counts.max()) if flat.numel() else 0)

    def group(self, rows: Tensor) -> Tensor:
        """(N, d) rows in assignment order -> (E, C, d), zero-padded."""
        out = rows.new_zeros(self.num_experts, self.capacity, rows.shape[-1])
        return out.index_put((self.expert, self.slot), rows)

    def ungroup(self, grouped: Tensor) -> Tensor:
        """(E, C, d) -> (N, d) rows in assignment order (the padding is dropped)."""
        return grouped[self.expert, self.slot]

    def combine(self, rows: Tensor) -> Tensor:
        """Σ over each token's assignments of weight · row: (N, d) -> (T, d)."""
        out = rows.new_zeros(self.num_tokens, rows.shape[-1])
        return out.index_add(0, self.token, rows * self.weight.to(rows.dtype)[:, None])


class LoRAExperts(nn.Module):
    """E LoRA pairs for one d_out × d_in weight: ``lora_A`` (E, r, d_in), ``lora_B`` (E, d_out, r).

    Init as LoRA, expert by expert: A Kaiming-uniform (a = √5, bound 1/√d_in), B = 0, so every expert's
    update is 0 at step 0 and the mixture starts at the frozen model.
    """

    def __init__(self, num_experts: int, r: int, d_in: int, d_out: int, scaling: float,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"expert rank r must be a positive integer, got {r!r}")
        self.num_experts, self.r, self.scaling = num_experts, r, scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, dtype=dtype, device=device))
        bound = 1 / math.sqrt(d_in)  # what kaiming_uniform_(a=√5) gives each expert's (r, d_in) A
        nn.init.uniform_(self.lora_A, -bound, bound)

    def delta_weight(self, e: int) -> Tensor:
        """Expert e's update as a dense d_out × d_in matrix, ``s B_e A_e``."""
        return self.scaling * self.lora_B[e] @ self.lora_A[e]

    def dense(self, x: Tensor, gates: Tensor) -> Tensor:
        """``Σ_e g_te · s B_e A_e x_t`` for (T, d_in) tokens and (T, E) gates -> (T, d_out).

        Gates of shape (T, k, E) give k weightings of each token's experts, (T, k, d_out), for the price of
        one projection of x onto every expert's A (MixLoRA's k expert rows per token, one-hot gates).
        """
        E, r = self.num_experts, self.r
        z = x @ self.lora_A.reshape(E * r, -1).t()  # (T, E·r): every expert's r coordinates
        z = z.view(x.shape[0], *[1] * (gates.dim() - 2), E, r) * gates.to(z.dtype)[..., None]
        out = z.reshape(-1, E * r) @ self.lora_B.permute(0, 2, 1).reshape(E * r, -1)
        return out.view(*gates.shape[:-1], -1) * self.scaling

    def grouped(self, x: Tensor) -> Tensor:
        """Each expert on its own group: (E, C, d_in) -> (E, C, d_out), ``s · x A_eᵀ B_eᵀ`` per group."""
        return torch.bmm(torch.bmm(x, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2)) * self.scaling

    def sparse(self, x: Tensor, dispatch: Dispatch) -> Tensor:
        """``Σ_{e ∈ top-k(t)} w_te · s B_e A_e x_t`` -> (T, d_out), through the dispatch's groups."""
        rows = dispatch.ungroup(self.grouped(dispatch.group(x[dispatch.token])))
        return dispatch.combine(rows)

    def extra_repr(self) -> str:
        E, d_out, r = self.lora_B.shape
        return f"num_experts={E}, r={r}, d_in={self.lora_A.shape[2]}, d_out={d_out}, scaling={self.scaling:g}"


class BottleneckAdapters(nn.Module):
    """Bottleneck adapters on a width-d stream: ``down`` (M, b, d) and ``up`` (N, d, b) projections, with
    biases ``down_bias`` (M, b) and ``up_bias`` (N, d) when ``bias``; GELU (exact) between them, scale s.

    :meth:`branch` runs the adapter (i, j) = (down i, up j); the caller adds the residual. M = N pairs them into
    E = M experts (:meth:`dense`, :meth:`sparse`); M ≠ N is AdaMix's sharing (N = 1: one up-projection
    that every down-projection feeds). :meth:`average` is the weight average of the copies (AdaMix's merge).

    Init: biases 0; ``init_std`` None draws each W^down Kaiming-uniform (a = √5, bound 1/√d) and sets
    W^up = 0, so every adapter starts as the identity; a number draws both from N(0, init_std²)
    (BERT's init of new linears, what AdaMix's released code gets).
    """

    def __init__(self, d: int, b: int, num_down: int, num_up: int, bias: bool = False, scaling: float = 1.0,
                 init_std: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        require_positive_ints(adapter_dim=b, num_down=num_down, num_up=num_up)
        self.dim, self.scaling = b, scaling
        self.down = nn.Parameter(torch.empty(num_down, b, d, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(num_up, d, b, dtype=dtype, device=device))
        self.down_bias = nn.Parameter(torch.zeros(num_down, b, dtype=dtype, device=device)) if bias else None
        self.up_bias = nn.Parameter(torch.zeros(num_up, d, dtype=dtype, device=device)) if bias else None
        if init_std is None:
            nn.init.uniform_(self.down, -1 / math.sqrt(d), 1 / math.sqrt(d))  # kaiming_uniform_(a=√5) per copy
        else:
            nn.init.normal_(self.down, std=init_std)
            nn.init.normal_(self.up, std=init_std)

    @property
    def num_down(self) -> int:
        return self.down.shape[0]

    @property
    def num_up(self) -> int:
        return self.up.shape[0]

    def _run(self, u: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None) -> Tensor:
        return F.linear(F.gelu(F.linear(u, w_down, b_down)), w_up, b_up) * self.scaling

    def branch(self, u: Tensor, i: int, j: int) -> Tensor:
        """The adapter (down i, up j) on u (…, d): ``s · (W^up_j GELU(W^down_i u + b^down_i) + b^up_j)``."""
        bias = self.down_bias is not None
        return self._run(u, self.down[i], self.down_bias[i] if bias else None,
                         self.up[j], self.up_bias[j] if bias else None)

    def average(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(W̄^down, b̄^down, W̄^up, b̄^up): each projection's weights and biases averaged over its copies."""
        bias = self.down_bias is not None
        return (self.down.mean(0), self.down_bias.mean(0) if bias else None,
                self.up.mean(0), self.up_bias.mean(0) if bias else None)

    def averaged_branch(self, u: Tensor) -> Tensor:
        """One adapter with the averaged weights (:meth:`average`) on u: one down- and one up-projection."""
        return self._run(u, *self.average())

    def _paired(self) -> int:
        if self.num_down != self.num_up:
            raise ValueError(f"a mixture of adapters pairs down and up projections; have {self.num_down} down, "
                             f"{self.num_up} up")
        return self.num_down

    def dense(self, u: Tensor, gates: Tensor) -> Tensor:
        """``Σ_e g_te · branch_e(u_t)`` for (T, d) u and (T, E) gates -> (T, d): every expert's down-projection
        in one (T, E·b) matmul, GELU, the gate per expert, then one matmul over the E·b hidden units."""
        E, b = self._paired(), self.dim
        z = u @ self.down.reshape(E * b, -1).t()
        if self.down_bias is not None:
            z = z + self.down_bias.reshape(-1)
        z = F.gelu(z).view(u.shape[0], E, b) * gates.to(z.dtype)[..., None]
        out = z.reshape(-1, E * b) @ self.up.permute(0, 2, 1).reshape(E * b, -1)
        if self.up_bias is not None:
            out = out + gates.to(out.dtype) @ self.up_bias
        return out * self.scaling

    def sparse(self, u: Tensor, dispatch: Dispatch) -> Tensor:
        """``Σ_{e ∈ top-k(t)} w_te · branch_e(u_t)`` -> (T, d): each expert on its own tokens (one bmm each way)."""
        self._paired()
        z = torch.bmm(dispatch.group(u[dispatch.token]), self.down.transpose(1, 2))
        if self.down_bias is not None:
            z = z + self.down_bias[:, None]
        out = torch.bmm(F.gelu(z), self.up.transpose(1, 2))
        if self.up_bias is not None:
            out = out + self.up_bias[:, None]
        return dispatch.combine(dispatch.ungroup(out) * self.scaling)

    def extra_repr(self) -> str:
        return (f"d={self.down.shape[2]}, b={self.dim}, num_down={self.num_down}, num_up={self.num_up}, "
                f"bias={self.down_bias is not None}, scaling={self.scaling:g}")
