"""Triton products for few activation rows: the GEMV of one row (``gemv_triton``, custom op
``labutils::linear_gemv``) and the 2-16-row tensor-core tile with optional split-K
(``small_m_triton``; custom op ``labutils::linear_small_m``: GEMV for one row, the tile for 2-16,
cuBLAS otherwise). The nn.Linear wrappers that plug them into the decoder are in labutils.gemv
(notebook 02).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import runtime

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


# ---- 2 to 16 rows: each weight tile read once, multiplied against all rows on the tensor cores --------
# Speculative decoding verifies k + 1 tokens in one forward: still a pass over the weights, now with
# up to 16 activation rows. All rows sit in one zero-padded (BLOCK_M = 16, BLOCK_K) tile; each program
# streams a (BLOCK_N, BLOCK_K) weight tile per step and meets it in tl.dot as the LEFT operand,
# out (BLOCK_N, 16) += W_tile @ x_tile^T: 16 is the smallest tensor-core N, and the weight-left order
# beat x-left by 0-20% for the 4-bit kernel in labutils.quant (probe 6, H200). The padding rows cost
# tensor-core issue slots, not bytes; the time should stay the weight-streaming time at any M <= 16.
# The loop loads feed tl.dot, so Triton pipelines them (cp.async, num_stages chunks in flight).
# Parallelism: a program owns BLOCK_N >= 16 output features (tl.dot's minimum), so N = 3584 gives at
# most 224 programs for 132 SMs. When such a shape also has a long K (down_proj, K = 18944) the K loop
# is split over SPLIT_K programs per tile (grid axis 1) that write fp32 partials into a workspace,
# summed (with the bias, in a fixed order: deterministic) by a second small kernel. SPLIT_K is chosen
# on the host from N, K and the SM count (_split_k), not autotuned: the workspace must be sized before
# the launch. Both launches have fixed sizes per shape and no host sync, so CUDA graphs capture them.
# The configurations are untimed guesses (2026-12): BLOCK_N 16-128 (64 and more can use wgmma on sm_90),
# the stages bounded by shared memory (a stage holds (BLOCK_N + 16) x BLOCK_K values).
SMALL_M_MAX_ROWS = 16

_SMALL_M_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                    for bn, bk, w, st in [(16, 128, 4, 4), (16, 256, 4, 4), (16, 256, 4, 5),
                                          (32, 128, 4, 4), (32, 256, 4, 4), (32, 256, 4, 5),
                                          (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 8, 4),
                                          (128, 128, 8, 3), (128, 128, 8, 4)]]
if runtime.triton_interpreted():  # partial tiles in both directions at the tests' small shapes
    _SMALL_M_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=1)]


@triton.autotune(configs=_SMALL_M_CONFIGS, key=["N", "K", "SPLIT_K"])  # the dtypes join the key by themselves
@triton.jit
def _small_m_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_wn,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (M, N) = x (M, K) @ w (N, K)^T (+ b) for M <= BLOCK_M rows, x contiguous. SPLIT_K > 1: program
    (n, s) takes the s-th run of BLOCK_K chunks and stores its fp32 partial at y_ptr[s] (SPLIT_K, M, N),
    no bias (the reduction adds it)."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    rm = tl.arange(0, BLOCK_M)  # activation rows, those past M masked to zero
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * K  # (BLOCK_M, 1)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:  # whole chunks per split, so a chunk never crosses into the next split's range
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
    out = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T: the weight tile is the left operand
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        out = tl.dot(w, tl.trans(x), out, input_precision=DOT_PREC)
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + tl.program_id(1) * M * N + rm[None, :] * N + rn[:, None], out, mask=mask)


@triton.jit
def _split_k_sum_kernel(ws_ptr, b_ptr, y_ptr, MN, N,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y (M, N) = sum_s ws[s] (+ b), ws (SPLIT_K, M, N) fp32, the splits added in order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: as an H100/H200, so that the heuristic below behaves as on the GPU


def _split_k(N: int, K: int, n_sm: int) -> int:
    """Split the K loop only where 16-row tiles leave fewer than ~3 programs per SM and every split
    still streams >= 4096 values per row (down_proj: 224 tiles, K = 18944 -> 2); 1 elsewhere."""
    split = 1
    while triton.cdiv(N, 16) * split < 3 * n_sm and K // (2 * split) >= 4096 and split < 8:
        split *= 2
    return split


def small_m_triton(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """y = x @ w^T (+ b) for x (M, K) with 1 <= M <= 16 rows and w (N, K) contiguous along K: (M, N) in
    x's dtype. ``split_k``: programs per output tile along K (None: the heuristic ``_split_k``)."""
    N, K = w.shape
    if x.dim() != 2 or x.shape[1] != K or not 1 <= x.shape[0] <= SMALL_M_MAX_ROWS or w.stride(1) != 1:
        raise ValueError(f"small_m_triton needs x (M <= {SMALL_M_MAX_ROWS}, {K}) and w contiguous along K; "
                         f"got x {tuple(x.shape)}, w {tuple(w.shape)} with strides {w.stride()}")
    x = x.contiguous()
    M = x.shape[0]
    split = _split_k(N, K, _sm_count(x.device)) if split_k is None else int(split_k)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    out = y if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)  # partials
    has_bias = b is not None
    b_arg = b if has_bias else w  # never read
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    _small_m_kernel[grid](x, w, b_arg, out, M, N, K, w.stride(0), HAS_BIAS=has_bias, SPLIT_K=split,
                          DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=SMALL_M_MAX_ROWS)
    if split > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(M * N, block),)](out, b_arg, y, M * N, N, SPLIT_K=split,
                                                          HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
    return y


def _check_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    if w.dim() != 2:
        raise ValueError(f"linear_small_m needs a 2-D weight (N, K), got shape {tuple(w.shape)}")
    N, K = w.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"linear_small_m: x has {x.shape[-1] if x.dim() else 0} features, the weight {K} "
                         f"(x {tuple(x.shape)}, weight {tuple(w.shape)})")
    if w.stride(1) != 1 and N > 0 and K > 1:
        raise ValueError(f"linear_small_m needs the weight contiguous along K (stride 1), got strides {w.stride()}")
    if x.dtype != w.dtype:
        raise ValueError(f"linear_small_m: x is {x.dtype}, the weight {w.dtype}")
    if b is not None and tuple(b.shape) != (N,):
        raise ValueError(f"linear_small_m: bias of shape {tuple(b.shape)} for {N} outputs")


@torch.library.custom_op("labutils::linear_small_m", mutates_args=())
def linear_small_m(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for x (..., K): one row by the Triton GEMV, 2-16 rows by ``_small_m_kernel``
    (the weights read once), more rows (or none) by cuBLAS."""
    _check_linear(x, w, b)
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if K == 0 or not 1 <= rows <= SMALL_M_MAX_ROWS:
        return F.linear(x, w, b)
    if rows == 1:
        y = gemv_triton(x.reshape(K), w, b)
    else:
        y = small_m_triton(x.reshape(rows, K), w, b)
    return y.reshape(*x.shape[:-1], w.shape[0])


@linear_small_m.register_fake
def _(x, w, b=None):
    _check_linear(x, w, b)
    return x.new_empty(*x.shape[:-1], w.shape[0])
