"""Matrix-vector products for batch-1 decode, plugged in through the linear-layer seam (notebook 02).

At batch 1 every linear layer is y = W x with W (N, K) read once from memory: a pure bandwidth
problem, and the whole decode step's speed is how close these products come to the copy ceiling.
Two ways to get there besides cuBLAS:

- ``ReduceLinear``: writes y = (W * x).sum(-1), which ``torch.compile`` turns into one fused
  reduction kernel that it tunes itself (no extra code to maintain);
- ``GemvLinear``: a hand-written Triton kernel (each program streams BLOCK_N rows of W through
  registers in BLOCK_K chunks and accumulates in fp32), registered as a torch custom op so that
  ``torch.compile`` and CUDA-graph capture treat it as one opaque call.

Both fall back to ``F.linear`` (cuBLAS) when more than one row comes in (prefill, batches).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime

# Tiles from 4 x 256 to 32 x 512 values; the fp32 accumulator tile stays small enough for registers.
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (2, 4, 8) if bn * bk <= 16384]
if runtime.triton_interpreted():  # the interpreter runs one configuration, slowly but exactly
    _CONFIGS = [triton.Config({"BLOCK_N": 8, "BLOCK_K": 64}, num_warps=1)]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features of this program
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduce once at the end
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_triton(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = w @ x (+ b) for one vector x (K,) and w (N, K) with unit stride along K: (N,)."""
    N, K = w.shape
    if x.shape != (K,) or w.stride(1) != 1:
        raise ValueError(f"gemv_triton needs x of shape ({K},) and w contiguous along K; got {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty(N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, w, b if b is not None else w, y, N, K, w.stride(0), HAS_BIAS=b is not None)
    return y


@torch.library.custom_op("labutils::linear_gemv", mutates_args=())
def linear_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), by the Triton GEMV when x holds a single row, by cuBLAS otherwise."""
    rows = x.numel() // x.shape[-1]
    if rows != 1:
        return F.linear(x, w, b)
    return gemv_triton(x.reshape(-1), w, b).reshape(*x.shape[:-1], w.shape[0])


@linear_gemv.register_fake
def _(x, w, b=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


class _SharedLinear(nn.Module):
    """Holds an nn.Linear's weight and bias (shared, not copied); subclasses choose the product."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features


class GemvLinear(_SharedLinear):
    """An nn.Linear whose single-row products run the Triton GEMV."""

    def forward(self, x):
        return torch.ops.labutils.linear_gemv(x, self.weight, self.bias)


class ReduceLinear(_SharedLinear):
    """An nn.Linear written as a multiply-and-sum when one row comes in, for torch.compile to fuse."""

    def forward(self, x):
        if x.numel() // x.shape[-1] != 1:
            return F.linear(x, self.weight, self.bias)
        y = (x.unsqueeze(-2) * self.weight).sum(-1, dtype=torch.float32).to(x.dtype)  # (..., N)
        return y if self.bias is None else y + self.bias
