"""Beyond weight-only: activations quantized too, W8A8 (int8 x int8) and FP8 (e4m3) (notebook 04, section 6).

With both operands in 8 bits the tensor cores multiply at twice their bf16 rate, which pays only where
a layer is compute-bound (many rows); at batch 1 the weight bytes are what count, and they are the
same as weight-only INT8. For the gain to survive, the bookkeeping around the product must not add
passes over memory:

- ``quant_rows``: one Triton pass turns x (M, K) into 8-bit codes with one scale per row (per token),
  s[m] = max|x[m]| / QMAX, instead of several PyTorch ops (abs, amax, divide, round, cast);
- ``w8a8_matmul``: a Triton int8 x int8 GEMM accumulating in int32 whose *epilogue* multiplies by the
  row scale of x and the channel scale of W and writes bf16, so the int32 product never reaches memory
  (``torch._int_mm`` returns it, and rescaling it costs a read and a write of M x N x 4 bytes);
- ``fp8_linear``: e4m3 codes of x (``quant_rows(x, FP8)``) through ``torch._scaled_mm`` with row-wise
  scales (scale_a (M, 1), scale_b (1, N)), which applies them in cuBLASLt's epilogue.

``w8a8_reference`` is the version a reader writes first: PyTorch ops and ``torch._int_mm``, rescaled in
fp32 after the product. Weights: ``quantize_int8`` of labutils.quant (per output channel) for W8A8,
``quantize_fp8_rows`` for FP8.

The Triton kernels (``quant_rows``, ``w8a8_matmul``) live in labutils.kernels.actquant and are
re-exported here.
"""
from __future__ import annotations

import torch

from .kernels.actquant import (  # noqa: F401  (re-exported: notebook 04 and the tests read them from here)
    FP8, QMAX, _quant_rows_kernel, _w8a8_kernel, quant_rows, w8a8_matmul)


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> x W^T with W ~ wq * ws[:, None] (labutils.quant.quantize_int8), per-token int8 activations."""
    if wq.dim() != 2 or x.dim() != 2 or wq.shape[1] != x.shape[-1]:
        raise ValueError(f"w8a8_linear: x (M, K) and wq (N, K) must agree on K, got shapes {tuple(x.shape)} and "
                         f"{tuple(wq.shape)}")
    xq, xs = quant_rows(x, torch.int8)
    return w8a8_matmul(xq, xs, wq, ws, out_dtype=x.dtype)


def w8a8_reference(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The same product as a reader first writes it: PyTorch ops, ``torch._int_mm`` (which needs more
    than 16 rows on CUDA: x is padded), and the int32 result rescaled in fp32 afterwards."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"w8a8_reference: x must be floating point (M, K), got {x.dtype} of shape {tuple(x.shape)}")
    M, K = x.shape
    xs = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127  # per-token scale
    xq = torch.zeros(max(M, 32), K, device=x.device, dtype=torch.int8)
    xq[:M] = (x.float() / xs).round().to(torch.int8)
    return (torch._int_mm(xq, wq.t())[:M].float() * xs * ws.float()).to(x.dtype)


@torch.no_grad()
def quantize_fp8_rows(W: torch.Tensor):
    """W (N, K) -> (e4m3 codes (N, K), fp32 scales (N, 1)) with one scale per output channel."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"quantize_fp8_rows: W must be a floating-point matrix (N, K), got {W.dtype} of shape "
                         f"{tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("quantize_fp8_rows: W has inf or NaN values; they have no e4m3 code")
    s = W.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / QMAX[FP8]
    return (W.float() / s).to(FP8), s


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w8s: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> x W^T with W ~ w8 * w8s (quantize_fp8_rows), per-token e4m3 activations, row-wise
    scales applied by ``torch._scaled_mm`` (CUDA, compute capability >= 8.9)."""
    if x.dim() != 2:
        raise ValueError(f"fp8_linear: x must be (rows, features), got shape {tuple(x.shape)}")
    M, K = x.shape
    if w8.dtype != FP8 or w8.dim() != 2 or w8.shape[1] != K:
        raise ValueError(f"fp8_linear: w8 must be e4m3 codes (N, {K}) from quantize_fp8_rows, got {w8.dtype} of "
                         f"shape {tuple(w8.shape)}")
    if tuple(w8s.shape) != (w8.shape[0], 1) or w8s.dtype != torch.float32:
        raise ValueError(f"fp8_linear: w8s must be fp32 scales of shape ({w8.shape[0]}, 1), got {w8s.dtype} of "
                         f"shape {tuple(w8s.shape)}")
    xq, xs = quant_rows(x, FP8)
    pad = -M % 16  # _scaled_mm wants rows in multiples of 16
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, K)])
        xs = torch.cat([xs, xs.new_ones(pad, 1)])
    return torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=w8s.t(), out_dtype=x.dtype)[:M]
