"""Activation quantization and the W8A8 GEMM in Triton (notebook 04, section 6): ``quant_rows`` turns
x (M, K) into int8 or e4m3 codes with one scale per row in one pass, ``w8a8_matmul`` multiplies int8
by int8 with int32 accumulation and applies both scales in its epilogue. The linear layers built on
them are in labutils.actquant.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import runtime

FP8 = torch.float8_e4m3fn
QMAX = {torch.int8: 127.0, FP8: 448.0}  # e4m3's largest finite value is 448


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, QMAX: tl.constexpr, IS_FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row m of x -> codes q[m] = x[m] / s[m] (int8: rounded to nearest; fp8: cast), s[m] = max|x[m]| / QMAX."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: the row's absmax (the row stays in L1/L2 for pass 2)
        k = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)))
    s = tl.maximum(tl.max(amax, axis=0), 1e-8) / QMAX
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32) / s
        if IS_FP8:
            c = v.to(q_ptr.dtype.element_ty)
        else:
            c = tl.floor(v + 0.5).to(tl.int8)  # nearest, halves up; |v| <= 127 by construction
        tl.store(q_ptr + m * K + k, c, mask=k < K)
    tl.store(s_ptr + m, s)


def quant_rows(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """x (M, K) -> (codes (M, K) in ``dtype`` (int8 or float8_e4m3fn), scales (M, 1) fp32), one pass."""
    if dtype not in QMAX:
        raise ValueError(f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be (rows, features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"quant_rows: x must be floating point (fp16, bf16 or fp32), got {x.dtype}; "
                        f"convert with x.float()")
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, device=x.device, dtype=dtype)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if M:
        _quant_rows_kernel[(M,)](x, q, s, K, QMAX=QMAX[dtype], IS_FP8=dtype == FP8,
                                 BLOCK_K=64 if runtime.triton_interpreted() else 1024)
    return q, s


@triton.jit
def _w8a8_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (M, N) = (A int8 (M, K) @ B int8 (N, K)^T) * sa[:, None] * sb[None, :], int32 accumulation."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0)
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * K + (k0 + rk)[:, None],
                    mask=(rn[None, :] < N) & ((k0 + rk)[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    c = acc.to(tl.float32) * sa[:, None] * sb[None, :]  # the epilogue: int32 never leaves registers
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def w8a8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                out_dtype=torch.bfloat16) -> torch.Tensor:
    """(xq (M, K) int8 * xs (M, 1)) @ (wq (N, K) int8 * ws (N,))^T in ``out_dtype``, scales in the epilogue."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"int8 operands expected, got {xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2:
        raise ValueError(f"w8a8_matmul: xq (M, K) and wq (N, K) must be 2-D, got shapes {tuple(xq.shape)} "
                         f"and {tuple(wq.shape)}")
    M, K = xq.shape
    N = wq.shape[0]
    if wq.shape[1] != K:
        raise ValueError(f"x has {K} features, the weight {wq.shape[1]}")
    if not xs.is_floating_point() or xs.numel() != M or tuple(xs.shape) not in ((M, 1), (M,)):
        raise ValueError(f"w8a8_matmul: xs must be float row scales of shape ({M}, 1) (from quant_rows), got "
                         f"{xs.dtype} of shape {tuple(xs.shape)}")
    if not ws.is_floating_point() or tuple(ws.shape) not in ((N,), (N, 1)):
        raise ValueError(f"w8a8_matmul: ws must be float channel scales of shape ({N},) (quantize_int8's "
                         f"scale), got {ws.dtype} of shape {tuple(ws.shape)}")
    if not out_dtype.is_floating_point:
        raise ValueError(f"w8a8_matmul: out_dtype must be a floating dtype (e.g. torch.bfloat16), got {out_dtype}")
    c = torch.empty(M, N, device=xq.device, dtype=out_dtype)
    if runtime.triton_interpreted():
        bm, bn, bk, warps, stages = 16, 16, 32, 1, 1
    else:  # one tiling, timed on the H200 (2026-11-30): 1.2x bf16 cuBLAS at 4096 rows of a 7B MLP layer
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _w8a8_kernel[grid](xq.contiguous(), wq.contiguous(), xs.reshape(-1).float().contiguous(),
                       ws.reshape(-1).contiguous(), c,
                       M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return c
