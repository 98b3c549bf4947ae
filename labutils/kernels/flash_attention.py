"""FlashAttention forward in Triton: the pointer kernel (any GPU, the interpreter) and the
tensor-descriptor (TMA) kernel for sm_90+, their autotuning configurations and ``flash_attention``,
the launcher that picks between them. The algorithm (online softmax, the two-stage causal key loop,
grouped-query indexing) is described in labutils.flash_attention (notebook 03).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime

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
if runtime.triton_interpreted():  # one small configuration: the interpreter is exact but slow
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4)]


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
