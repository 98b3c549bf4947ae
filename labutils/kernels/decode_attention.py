"""FlashDecoding in Triton: decode attention (one query per sequence) split along the keys, each
program taking the query heads of one KV head over one chunk of the cache, and the kernel that merges
the splits exactly by their log-sum-exps (also used by the paged decode kernel). Described in
labutils.flash_attention (notebook 03).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime
from .flash_attention import LOG2E, _attn_inner, _bucket, _check, _positions

# GPU: three tilings of the key loop, tuned per (power-of-two bucket of S, splits, head_dim, group rows).
_DEC_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_stages=s, num_warps=w)
                for bn, s, w in [(64, 2, 4), (128, 2, 4), (64, 3, 8)]]
if runtime.triton_interpreted():  # one small configuration: the interpreter is exact but slow
    _DEC_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4)]


@triton.jit
def _store_partial(acc, l_i, m_i, part, row_ok, O_PART, LSE_PART, HEAD_DIM: tl.constexpr):
    """One split's partial output and log-sum-exp (log2 units) at rows ``part`` of the partial
    buffers, for ``_decode_combine``; a row that saw no key in its split gives 0 and -inf (weight 0)."""
    offs_d = tl.arange(0, HEAD_DIM)
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LSE_PART + part, tl.where(nonempty, m_i + tl.math.log2(l_safe), float("-inf")), mask=row_ok)


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
    part = (b.to(tl.int64) * GROUP * tl.num_programs(1) + h) * NUM_SPLITS + split  # (BLOCK_G,) row of (B, H, splits)
    _store_partial(acc, l_i, m_i, part, row_ok, O_PART, LSE_PART, HEAD_DIM)


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



# ---- a few queries per sequence: the verification of speculative drafts ---------------------------------
@triton.jit
def _decode_rows_split(Q, K, V, O_PART, LSE_PART, QPOS, qk_scale,
                       stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd, stride_pb, GROUP, T, S, NUM_SPLITS, S_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_decode_split`` for T queries per sequence: the rows of a program are the GROUP query heads
    of its KV head times the T query tokens (row r: head r // T, token r % T), each row masked at its
    own position. A row may see no key of a chunk (its position lies before it): its running max
    stays -inf and the row adds nothing (no -inf - -inf)."""
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_r < GROUP * T
    t = offs_r % T
    h = kvh * GROUP + offs_r // T  # (BLOCK_R,)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)  # (BLOCK_R, d)
    pos = tl.load(QPOS + b * stride_pb + t, mask=row_ok, other=-1).to(tl.int32)  # (BLOCK_R,) -1: no keys
    k_ptrs = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    v_ptrs = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd
    # -- this split's chunk of [0, L), L = 1 + the last row's position
    L = tl.minimum(tl.max(pos, 0) + 1, S)
    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        k = tl.load(k_ptrs + cols[None, :] * stride_kn, mask=cols[None, :] < end, other=0.0)  # (d, BLOCK_N)
        qk = tl.dot(q, k, input_precision=DOT_PREC)  # (BLOCK_R, BLOCK_N) fp32
        visible = (cols[None, :] < end) & (cols[None, :] <= pos[:, None])
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # a row that has seen no key yet
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + cols[:, None] * stride_vn, mask=cols[:, None] < end, other=0.0)  # (BLOCK_N, d)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_ij
    # row of (B, H, T, splits): the combine kernel then sees H * T "heads"
    part = ((b.to(tl.int64) * GROUP * tl.num_programs(1) + h) * T + t) * NUM_SPLITS + split
    _store_partial(acc, l_i, m_i, part, row_ok, O_PART, LSE_PART, HEAD_DIM)


_decode_rows_split_tuned = triton.autotune(configs=_DEC_CONFIGS,
                                           key=["S_BUCKET", "NUM_SPLITS", "HEAD_DIM", "BLOCK_R"])(_decode_rows_split)

MAX_ROWS = 128  # query heads per KV head x query tokens that one program holds


def decode_rows_fit(q, k) -> bool:
    """Whether ``flash_decode_rows`` takes these shapes: (query heads per KV head) x T <= MAX_ROWS."""
    return q.shape[1] // k.shape[1] * q.shape[2] <= MAX_ROWS


def flash_decode_rows(q, k, v, q_pos, num_splits: int | None = None, scale: float | None = None):
    """FlashDecoding for a few queries per sequence, as when a target verifies k drafts: q (B, n_head,
    T, d) at positions q_pos ((T,) or (B, T)) over a KV cache k/v (B, n_kv_head, S, d); query t of
    sequence b attends to keys 0 .. q_pos[b, t]. Split along the keys like ``flash_decode``, so a few
    queries over a long cache use the whole GPU (the causal forward kernel gives them one program per
    head and query block, walking every key in turn)."""
    B, H, KV, T, S, d = _check(q, k, v)
    if not decode_rows_fit(q, k):
        raise ValueError(f"{H // KV} query heads per KV head x T={T} tokens exceed {MAX_ROWS} rows: use flash_attention")
    q_pos, stride_pb = _positions(q_pos, B, T, q.device)
    num_splits = default_num_splits(B, KV, S, q.device) if num_splits is None else int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    G = H // KV
    o_part = torch.empty(B, H, T, num_splits, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, T, num_splits, device=q.device, dtype=torch.float32)
    _decode_rows_split_tuned[(B, KV, num_splits)](
        q, k, v, o_part, lse_part, q_pos, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), stride_pb, G, T, S, num_splits, _bucket(S),
        HEAD_DIM=d, BLOCK_R=max(16, triton.next_power_of_2(G * T)),  # tl.dot needs >= 16 rows
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)  # contiguous: (B, H * T, d) for the merge
    _decode_combine[(B * H * T,)](o_part, lse_part, out, H * T, H * T * d, d, 1, num_splits,
                                  HEAD_DIM=d, SPLITS=triton.next_power_of_2(num_splits))
    return out
