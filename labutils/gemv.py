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

- ``SmallMLinear``: for 1 to 16 rows (speculative verification of k + 1 tokens, small batches), where
  cuBLAS leaves its matrix-vector path and a 7B forward costs ~20% more at 2 rows than at 1 (H200):
  one row goes to the GEMV above, 2-16 rows to ``_small_m_kernel``, which reads each weight tile once
  and multiplies it against all rows on the tensor cores (custom op ``labutils::linear_small_m``).

The kernels, their launchers and the two custom ops live in labutils.kernels.gemv; this module
re-exports them and holds the nn.Linear wrappers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.gemv import (  # noqa: F401  (re-exported: notebooks, tests and probes read them from here)
    _CONFIGS, _SMALL_M_CONFIGS, SMALL_M_MAX_ROWS, _check_linear, _gemv_kernel, _sm_count, _small_m_kernel,
    _split_k, _split_k_sum_kernel, gemv_triton, linear_gemv, linear_small_m, small_m_triton)


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


class SmallMLinear(_SharedLinear):
    """An nn.Linear whose products of 1 to 16 rows run the Triton kernels (GEMV, then the tensor-core
    tile): a verification forward of k + 1 tokens reads each weight once, as a decode step does."""

    def forward(self, x):
        return torch.ops.labutils.linear_small_m(x, self.weight, self.bias)
