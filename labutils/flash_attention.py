"""FlashAttention in Triton: a fused forward kernel and FlashDecoding for the decode step (notebook 03).

Naive attention writes the (T, S) score matrix to memory, reads it back for the softmax, writes the
probabilities and reads them again for P V: O(T S) bytes of traffic for O(T S d) FLOPs, so it is
memory-bound at every length. FlashAttention never materialises the matrix. One program owns
BLOCK_M queries of one (batch, head), keeps them in registers and streams the keys/values past them
in BLOCK_N blocks, with the *online softmax*: per query row it keeps the running max ``m_i``, the
running sum ``l_i`` of exp(s - m_i) and the unnormalised output ``acc`` (all fp32). For each block::

    s     = q k^T * scale                      (BLOCK_M, BLOCK_N), tl.dot
    m_new = max(m_i, rowmax(s))
    p     = exp(s - m_new)
    alpha = exp(m_i - m_new)                   rescales what was summed under the old max
    l_i   = l_i * alpha + rowsum(p)
    acc   = acc * alpha + p v                  (BLOCK_M, d), tl.dot
    m_i   = m_new

and at the end ``out = acc / l_i`` and ``lse = m_i + log(l_i)``. Q is read and O written once, K and
V once per query block (mostly from L2): O(T d + S d T / BLOCK_M) bytes of HBM traffic instead of
O(T S). Exponentials use ``exp2`` with log2(e) folded into the scale (one multiply less per score).

Masks. Query i may see key j iff j <= q_pos[i] (causal; by default q_pos = S - T + arange(T), i.e.
the T queries are the last T positions, plain causal when T == S). A program splits its key loop in
two stages: keys below the block's smallest position + 1 are visible to every row and run without
any mask; the rest, up to the block's largest position + 1, are masked per element (for T == S that
is the diagonal block only). Keys beyond every query's position are never loaded, which is what a
static KV cache needs (S = the cache's capacity, most of it unwritten). Without ``causal`` every
query sees every key and only the tail block past S is masked. Any T and S work: rows past T are
padded and never stored.

Grouped-query attention by index arithmetic: query head h reads KV head h // (n_head // n_kv_head)
through the pointers; K/V are never repeated in memory.

Decode (FlashDecoding). At T == 1 one program per (batch, head) would leave most of a GPU idle and
walk the whole cache alone. ``flash_decode`` launches a grid (batch, kv_head, split): each program
takes the ``n_head // n_kv_head`` query heads that share one KV head as the rows of its tile (so
each K/V byte is read once for the whole group) and one contiguous chunk of the sequence's
[0, q_pos + 1) keys, and writes a partial output and its log-sum-exp. A second small kernel combines
the splits exactly: out = sum_s exp(lse_s - max) o_s / sum_s exp(lse_s - max). Chunk bounds are
computed on the device from q_pos, so a step never syncs with the host and can be CUDA-graph captured.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import runtime

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- configurations -----------------------------------------------------------------------------
# GPU: a few tilings in the spirit of the Triton tutorial's Hopper settings, tuned once per
# (power-of-two bucket of T and of S, head_dim, causal, dtype). Each tiling is a separate compile
# (~1 s each on the H100 machine): a grid of 36 cost minutes per new key, so keep this list short
# and widen it only where a measurement says a shape wants something else.
_FWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
                for bm, bn, s, w in [(128, 64, 3, 4), (128, 64, 3, 8), (128, 128, 3, 8), (128, 128, 4, 8),
                                     (64, 64, 3, 4), (128, 32, 4, 4)]]
_DEC_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_stages=s, num_warps=w)
                for bn, s, w in [(64, 2, 4), (128, 2, 4), (64, 3, 8)]]
if runtime.triton_interpreted():  # one small configuration: the interpreter is exact but slow
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4)]
    _DEC_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4)]


# ---- kernels ------------------------------------------------------------------------------------
@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos, start, end, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over keys [start, end). MASKED: keys >= end and (CAUSAL) keys > pos are hidden."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        # -- s = q k^T, in log2 units
        if MASKED:
            k = tl.load(k_ptrs + cols[None, :] * stride_kn, mask=cols[None, :] < end, other=0.0)  # (d, BLOCK_N)
        else:
            k = tl.load(k_ptrs + cols[None, :] * stride_kn)
        qk = tl.dot(q, k, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32
        if MASKED:
            visible = cols[None, :] < end
            if CAUSAL:
                visible = visible & (cols[None, :] <= pos[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)  # (BLOCK_M, BLOCK_N)
        # -- update m_i and l_i
        alpha = tl.math.exp2(m_i - m_ij)  # (BLOCK_M,) rescale of the sums made under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the output accumulator: acc = acc * alpha + p v
        if MASKED:
            v = tl.load(v_ptrs + cols[:, None] * stride_vn, mask=cols[:, None] < end, other=0.0)  # (BLOCK_N, d)
        else:
            v = tl.load(v_ptrs + cols[:, None] * stride_vn)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QPOS, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              stride_pb, H, GROUP, T, S, T_BUCKET, S_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_QPOS: tl.constexpr, STORE_LSE: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh = tl.program_id(0), tl.program_id(1)
    b, h = off_bh // H, off_bh % H
    kvh = h // GROUP  # grouped-query attention: the KV head of query head h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
        + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, d), stays in registers
    k_ptrs = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd  # (d, 1)
    v_ptrs = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd  # (1, d)
    # -- key range: [0, full) visible to every row (no mask), [full, hi) masked per element
    if CAUSAL and HAS_QPOS:
        pos = tl.load(QPOS + b * stride_pb + offs_m, mask=row_ok, other=0).to(tl.int32)  # (BLOCK_M,)
        full = tl.minimum(tl.min(tl.where(row_ok, pos, S), 0) + 1, S)
        hi = tl.minimum(tl.max(tl.where(row_ok, pos, 0), 0) + 1, S)  # keys past every position: never loaded
    elif CAUSAL:  # the last T positions, pos = S - T + i: bounds from the block index alone
        pos = S - T + offs_m
        full = tl.minimum(S - T + start_m * BLOCK_M + 1, S)
        hi = tl.minimum(S - T + (start_m + 1) * BLOCK_M, S)
    else:
        pos = offs_m  # unused
        full = S
        hi = S
    full = (full // BLOCK_N) * BLOCK_N
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # unnormalised output
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos, 0, full, qk_scale,
                                False, CAUSAL, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, pos, full, hi, qk_scale,
                                True, CAUSAL, BLOCK_N, DOT_PREC)
    # -- epilogue: normalise, store
    acc = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:  # (B, H, T) fp32, log2 units
        tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)




_attn_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["T_BUCKET", "S_BUCKET", "HEAD_DIM", "CAUSAL"])(_attn_fwd)


# ---- the Hopper path: tensor descriptors (TMA) ---------------------------------------------------
# On sm_90+ the Tensor Memory Accelerator copies a whole (rows, head_dim) tile between HBM and shared
# memory from one descriptor (base, shape, strides, tile shape) instead of one address per thread:
# fewer registers and instructions per load, and out-of-bounds rows come back as zeros (the tails of
# T and S need no load masks). With ``warp_specialize`` Triton also splits the warps of a program
# into producers (issuing the TMA copies) and consumers (tensor-core math), as FlashAttention-3 does.
# Descriptors are built on the host over the 4-d (B, heads, seq, head_dim) tensors with their real
# strides, so transposed views and grouped-query K/V work without copies.
@triton.jit
def _attn_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, pos, start, end, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, WARP_SPEC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)  # rows past S: zeros
        qk = tl.dot(q, k.T)
        if MASKED:
            cols = start_n + offs_n
            visible = cols[None, :] < end
            if CAUSAL:
                visible = visible & (cols[None, :] <= pos[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij  # late: fewer live registers across the dots
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma(desc_q, desc_k, desc_v, desc_o, LSE, qk_scale, H, GROUP, T, S, T_BUCKET, S_BUCKET,
                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr):
    if CAUSAL:  # the longest rows first: the last wave of programs is then the short ones
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b, h = off_bh // H, off_bh % H
    kvh = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = desc_q.load([b, h, start_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)  # rows past T: zeros
    if CAUSAL:
        pos = S - T + offs_m
        full = tl.minimum(S - T + start_m * BLOCK_M + 1, S)
        hi = tl.minimum(S - T + (start_m + 1) * BLOCK_M, S)
    else:
        pos = offs_m
        full = S
        hi = S
    full = (full // BLOCK_N) * BLOCK_N
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, pos, 0, full, qk_scale,
                                    False, CAUSAL, BLOCK_N, HEAD_DIM, WARP_SPEC)
    acc, l_i, m_i = _attn_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, pos, full, hi, qk_scale,
                                    True, CAUSAL, BLOCK_N, HEAD_DIM, False)
    acc = acc / l_i[:, None]
    desc_o.store([b, h, start_m * BLOCK_M, 0], acc.to(desc_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    if STORE_LSE:
        tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


def _tma_block_shapes(nargs):
    """Autotuning pre-hook: each configuration's tile shapes go into the descriptors."""
    bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["desc_q"].block_shape = nargs["desc_o"].block_shape = [1, 1, bm, d]
    nargs["desc_k"].block_shape = nargs["desc_v"].block_shape = [1, 1, bn, d]


# (BLOCK_M, BLOCK_N, stages, warps, warp-specialised). Chosen from a sweep of 16 tilings on the H100
# (fp16, head_dim 128 and 64, N = 4096 and 16384, causal and not): 128 x 64 with 2 stages and 4 warps
# led at head_dim 128 (~510 TFLOP/s non-causal), 128 x 64 x 3 stages at head_dim 64, 64 x 64 and
# 128 x 128 x 8 warps were within a few percent for causal. Warp-specialised variants were no faster
# on Hopper with Triton 3.6, and with 4 warps they fail to compile ("PassManager::run failed"), which
# would abort autotuning: they stay out of the list (``block=(..., True)`` still runs one).
_TMA_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}, num_stages=s, num_warps=w,
                              pre_hook=_tma_block_shapes)
                for bm, bn, s, w, ws in [(128, 64, 2, 4, False), (128, 64, 3, 4, False), (128, 128, 3, 8, False),
                                         (64, 64, 3, 4, False), (128, 64, 3, 8, False), (128, 128, 2, 8, False)]]
if runtime.triton_interpreted():
    _TMA_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "WARP_SPEC": False}, num_warps=4,
                                  pre_hook=_tma_block_shapes)]
_attn_fwd_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=["T_BUCKET", "S_BUCKET", "HEAD_DIM", "CAUSAL"])(
    _attn_fwd_tma)


@triton.jit
def _decode_split(Q, K, V, O_PART, LSE_PART, QPOS, qk_scale,
                  stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_pb, GROUP, S, NUM_SPLITS, S_BUCKET,
                  HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)  # the query heads sharing KV head kvh, stacked as rows
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_g < GROUP
    h = kvh * GROUP + offs_g  # (BLOCK_G,)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_G, d)
    k_ptrs = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_ptrs = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd
    # -- this split's chunk of [0, L): a whole number of blocks, computed on the device
    L = tl.minimum(tl.load(QPOS + b * stride_pb).to(tl.int32) + 1, S)
    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_g, start, full,
                                qk_scale, False, False, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_g, full, end,
                                qk_scale, True, False, BLOCK_N, DOT_PREC)
    # -- partial output and log-sum-exp; an empty split (more splits than blocks) gives 0 and -inf
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(nonempty, m_i + tl.math.log2(l_safe), float("-inf"))
    part = (b.to(tl.int64) * GROUP * tl.num_programs(1) + h) * NUM_SPLITS + split  # (BLOCK_G,) row of (B, H, splits)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=row_ok)


_decode_split_tuned = triton.autotune(configs=_DEC_CONFIGS, key=["S_BUCKET", "NUM_SPLITS", "HEAD_DIM", "BLOCK_G"])(
    _decode_split)


@triton.jit
def _decode_combine(O_PART, LSE_PART, O, H, stride_ob, stride_oh, stride_od, NUM_SPLITS,
                    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    row = bh.to(tl.int64) * NUM_SPLITS + offs_s  # (SPLITS,)
    lse = tl.load(LSE_PART + row, mask=s_ok, other=float("-inf"))  # (SPLITS,) log2 units
    o = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # (SPLITS, d)
    # -- weight each split by its share of the softmax mass: exp2(lse_s - max) / sum
    w = tl.math.exp2(lse - tl.max(lse, 0))  # empty splits: 0
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)  # (d,)
    b, h = bh // H, bh % H
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d * stride_od,
             out.to(O.dtype.element_ty))


# ---- Python entry points ------------------------------------------------------------------------
def _check(q, k, v):
    """Validate shapes/dtypes/devices; returns B, H, KV, T, S, d."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d (B, heads, seq, head_dim); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    B, H, T, d = q.shape
    _, KV, S, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % KV:
        raise ValueError(f"n_head={H} is not a multiple of n_kv_head={KV}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; supported: {', '.join(map(str, HEAD_DIMS))}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not runtime.triton_interpreted():
        raise ValueError(f"tensors on {q.device} need Triton's interpreter (TRITON_INTERPRET=1); use CUDA tensors")
    if q.dtype == torch.bfloat16 and runtime.triton_interpreted():  # its tl.dot multiplies the raw bf16 bits
        raise ValueError("bfloat16 gives wrong results in Triton's interpreter; use float16 or float32 on the CPU")
    return B, H, KV, T, S, d


def _positions(q_pos, B, T, device):
    """q_pos (T,) or (B, T) -> (contiguous int64 tensor, batch stride)."""
    if q_pos.shape not in ((T,), (B, T)):
        raise ValueError(f"q_pos must have shape ({T},) or ({B}, {T}); got {tuple(q_pos.shape)}")
    q_pos = q_pos.to(device=device, dtype=torch.int64).contiguous()
    return q_pos, (T if q_pos.dim() == 2 else 0)


def _bucket(n: int) -> int:  # autotuning key: one tuning per power of two of a length
    return triton.next_power_of_2(max(n, 16))


def tma_usable(q, k, v) -> bool:
    """Whether the tensor-descriptor kernel can take these tensors: a GPU with TMA (sm_90+) or
    Triton's interpreter, fp16/bf16 (fp32 would lose its exact dots), contiguous head_dim and
    16-byte aligned bases and strides (what a TMA descriptor requires)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not runtime.triton_interpreted():
        if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9:
            return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    return True


def flash_attention(q, k, v, causal: bool = True, scale: float | None = None, q_pos=None,
                    return_lse: bool = False, block: tuple | None = None, kernel: str = "auto"):
    """softmax(q k^T * scale + mask) v without the score matrix.

    q (B, n_head, T, d), k/v (B, n_kv_head, S, d) -> out (B, n_head, T, d) in q's dtype. Strides are
    free (no copies). causal: query i sees keys j <= q_pos[i], q_pos (T,) or (B, T), default the
    last T positions S - T .. S - 1; not causal: every key. scale: default 1 / sqrt(d).
    return_lse: also return the natural-log log-sum-exp of the scaled scores, (B, n_head, T) fp32.
    block: (BLOCK_M, BLOCK_N[, num_stages, num_warps[, warp_specialize]]) to bypass autotuning (tests,
    benchmarks of one configuration). kernel: "tma" (tensor descriptors, Hopper+; not with q_pos),
    "pointer" (per-thread addresses, any GPU and the interpreter) or "auto" (tma where usable).
    """
    B, H, KV, T, S, d = _check(q, k, v)
    has_qpos = q_pos is not None
    if kernel not in ("auto", "tma", "pointer"):
        raise ValueError(f"kernel must be 'auto', 'tma' or 'pointer', got {kernel!r}")
    if block is not None and not (2 <= len(block) <= 5):
        raise ValueError(f"block must be (BLOCK_M, BLOCK_N[, num_stages, num_warps[, warp_specialize]]), got {block!r}")
    use_tma = kernel == "tma" or (kernel == "auto" and tma_usable(q, k, v) and not has_qpos)
    if use_tma and (has_qpos or not tma_usable(q, k, v)):
        raise ValueError("kernel='tma' needs fp16/bf16 tensors with 16-byte aligned strides on an sm_90+ GPU "
                         "(or the interpreter), and no q_pos")
    if use_tma:
        if causal and T > S:
            raise ValueError(f"causal attention of {T} queries over {S} keys needs q_pos")
        return _flash_attention_tma(q, k, v, causal, scale, return_lse, block, B, H, KV, T, S, d)
    if has_qpos:
        if not causal:
            raise ValueError("q_pos only applies to causal attention")
        q_pos, stride_pb = _positions(q_pos, B, T, q.device)
    elif causal and T > S:
        raise ValueError(f"causal attention of {T} queries over {S} keys needs q_pos")
    else:
        q_pos, stride_pb = q, 0  # a dummy pointer, never read: positions S - T + i in the kernel
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32) if return_lse else out
    args = (q, k, v, out, lse, q_pos, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_pb, H, H // KV, T, S, _bucket(T), _bucket(S))
    consts = dict(HEAD_DIM=d, CAUSAL=bool(causal), HAS_QPOS=has_qpos, STORE_LSE=return_lse,
                  DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if block is None:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **consts)
    else:
        _attn_fwd[(triton.cdiv(T, block[0]), B * H)](*args, **consts, BLOCK_M=block[0], BLOCK_N=block[1],
                                                     **_launch_opts(block))
    return (out, lse / LOG2E) if return_lse else out


def _launch_opts(block) -> dict:
    """num_stages / num_warps of an explicit block tuple, when given."""
    return {} if len(block) < 4 else {"num_stages": int(block[2]), "num_warps": int(block[3])}


def _flash_attention_tma(q, k, v, causal, scale, return_lse, block, B, H, KV, T, S, d):
    from triton.tools.tensor_descriptor import TensorDescriptor

    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32) if return_lse else out
    bm, bn = (block[0], block[1]) if block is not None else (16, 16)  # placeholders, set by the pre-hook
    desc = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, bl, d])
            for t, bl in ((q, bm), (k, bn), (v, bn), (out, bm))]
    args = (*desc, lse, scale * LOG2E, H, H // KV, T, S, _bucket(T), _bucket(S))
    consts = dict(HEAD_DIM=d, CAUSAL=bool(causal), STORE_LSE=return_lse)
    if block is None:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd_tma_tuned[grid](*args, **consts)
    else:
        ws = bool(block[4]) if len(block) == 5 else False
        _attn_fwd_tma[(triton.cdiv(T, bm), B * H)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, WARP_SPEC=ws,
                                                   **_launch_opts(block))
    return (out, lse / LOG2E) if return_lse else out


def default_num_splits(B: int, n_kv_head: int, S: int, device) -> int:
    """Splits so that B * n_kv_head * splits programs fill the GPU about twice (from shapes only, so
    the choice never waits on the GPU), at most one per 64 keys of the cache and 64 in all."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(2 * sms, B * n_kv_head), triton.cdiv(S, 64), 64))


def flash_decode(q, k, v, q_pos, num_splits: int | None = None, scale: float | None = None):
    """Decode attention, one query per sequence (T == 1) over a KV cache, split along the keys.

    q (B, n_head, 1, d), k/v (B, n_kv_head, S, d), q_pos (1,) or (B, 1): sequence b attends to keys
    0 .. q_pos[b]. Each of ``num_splits`` programs per (batch, KV head) handles one chunk of those
    keys for all the KV head's query heads; a second kernel merges the partial results exactly.
    """
    B, H, KV, T, S, d = _check(q, k, v)
    if T != 1:
        raise ValueError(f"flash_decode takes one query per sequence, got T={T}")
    q_pos, stride_pb = _positions(q_pos, B, 1, q.device)
    num_splits = default_num_splits(B, KV, S, q.device) if num_splits is None else int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    G = H // KV
    o_part = torch.empty(B, H, num_splits, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    _decode_split_tuned[(B, KV, num_splits)](
        q, k, v, o_part, lse_part, q_pos, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), stride_pb, G, S, num_splits, _bucket(S),
        HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(G)),  # tl.dot needs >= 16 rows
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty(B, H, 1, d, device=q.device, dtype=q.dtype)
    _decode_combine[(B * H,)](o_part, lse_part, out, H, out.stride(0), out.stride(1), out.stride(3), num_splits,
                              HEAD_DIM=d, SPLITS=triton.next_power_of_2(num_splits))
    return out


@torch.library.custom_op("labutils::flash_attention_backend", mutates_args=())
def _flash_backend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      num_splits: int | None = None) -> torch.Tensor:
    if q.shape[2] == 1:
        return flash_decode(q, k, v, q_pos, num_splits=num_splits)
    return flash_attention(q, k, v, causal=True, q_pos=q_pos)


@_flash_backend_op.register_fake
def _(q, k, v, q_pos, num_splits=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def flash_backend(q, k, v, q_pos, num_splits: int | None = None):
    """The attention seam (labutils.attention): flash_decode for one new token, else causal
    flash_attention at positions q_pos. A torch custom op, so torch.compile sees one opaque call."""
    return torch.ops.labutils.flash_attention_backend(q, k, v, q_pos, num_splits)


# ---- cost model ---------------------------------------------------------------------------------
def attention_flops(B: int, n_head: int, N_q: int, N_kv: int, d: int, causal: bool) -> int:
    """FLOPs of the forward: two matmuls (Q K^T and P V) of 2 N_q N_kv d each per head; causal
    attention of a square problem does half of them (the convention of FlashAttention benchmarks)."""
    flops = 4 * B * n_head * N_q * N_kv * d
    return flops // 2 if causal and N_q == N_kv else flops


def naive_attention_bytes(B: int, n_head: int, N: int, d: int, dtype_bytes: int) -> int:
    """HBM traffic of naive attention: Q, K, V read, the N x N scores written and read back, the
    probabilities written and read, the output written."""
    return B * n_head * dtype_bytes * (3 * N * d + 4 * N * N + N * d)


def flash_attention_bytes(B: int, n_head: int, N: int, d: int, dtype_bytes: int) -> int:
    """HBM traffic of FlashAttention when K/V stay in cache across query blocks: Q, K, V read, O written."""
    return B * n_head * dtype_bytes * 4 * N * d
