"""Paged attention kernels in Triton (notebook 06): the decode kernel (FlashDecoding over a block
pool, the pages found through each sequence's block table; its splits merged by the combine kernel
of labutils.kernels.decode_attention) and the varlen causal prefill kernel over pages, with their
launchers and custom ops ``labutils::paged_decode`` / ``labutils::paged_prefill``. The batch format,
the torch references and the decoder's cache seam are in labutils.paged_attention.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime
from .decode_attention import _decode_combine, _store_partial, default_num_splits
from .flash_attention import DTYPES, HEAD_DIMS, LOG2E

_BLOCK_N = 16 if runtime.triton_interpreted() else 64  # positions per tile of the decode loop


# ---- the decode kernel --------------------------------------------------------------------------
@triton.jit
def _paged_decode_split(Q, K, V, O_PART, LSE_PART, BLOCK_TABLES, CONTEXT_LENS, qk_scale,
                        stride_qb, stride_qh, stride_qd, stride_kp, stride_kh, stride_kn, stride_kd,
                        stride_vp, stride_vh, stride_vn, stride_vd, stride_tb, stride_tp, GROUP, NUM_SPLITS,
                        PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)  # the query heads sharing KV head kvh, stacked as rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_g < GROUP
    h = kvh * GROUP + offs_g  # (BLOCK_G,)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_G, d)
    # -- this split's positions: a whole number of pages of [0, L), computed on the device
    L = tl.load(CONTEXT_LENS + b).to(tl.int32)
    pages = tl.cdiv(tl.cdiv(L, PAGE), NUM_SPLITS)  # pages per split
    start = split * pages * PAGE
    end = tl.minimum(start + pages * PAGE, L)
    table = BLOCK_TABLES + b.to(tl.int64) * stride_tb
    k_base = K + kvh.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd  # (d, 1)
    v_base = V + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd  # (1, d)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")  # running max (log2 units)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)  # unnormalised output
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) logical positions
        ok = cols < end
        # -- physical address of each position: its page from the block table, its row in the page
        page = tl.load(table + (cols // PAGE) * stride_tp, mask=ok, other=0).to(tl.int64)  # (BLOCK_N,)
        row = cols % PAGE
        k = tl.load(k_base + page[None, :] * stride_kp + row[None, :] * stride_kn, mask=ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PREC)  # (BLOCK_G, BLOCK_N) fp32
        qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
        # -- online softmax: update m_i and l_i, rescale acc
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vp + row[:, None] * stride_vn, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_ij
    # -- partial output and log-sum-exp; an empty split (more splits than pages) gives 0 and -inf
    part = (b.to(tl.int64) * GROUP * tl.num_programs(1) + h) * NUM_SPLITS + split  # rows of (B, H, splits)
    _store_partial(acc, l_i, m_i, part, row_ok, O_PART, LSE_PART, HEAD_DIM)


# ---- the prefill kernel (varlen, causal, over pages) ---------------------------------------------
@triton.jit
def _paged_prefill(Q, K, V, O, BLOCK_TABLES, CONTEXT_LENS, QUERY_START, qk_scale,
                   stride_qn, stride_qh, stride_qd, stride_kp, stride_kh, stride_kn, stride_kd,
                   stride_vp, stride_vh, stride_vn, stride_vd, stride_on, stride_oh, stride_od,
                   stride_tb, stride_tp, GROUP,
                   PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    s, start_m, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(QUERY_START + s)
    q_len = tl.load(QUERY_START + s + 1) - q0  # this sequence's new tokens: the last q_len of its L positions
    L = tl.load(CONTEXT_LENS + s).to(tl.int32)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < q_len
    pos = L - q_len + offs_m  # (BLOCK_M,) each query's position
    q = tl.load(Q + (q0 + offs_m).to(tl.int64)[:, None] * stride_qn + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, d)
    # -- keys up to the block's last position (none for a block past the sequence's queries)
    hi = tl.where(start_m * BLOCK_M < q_len, tl.minimum(L - q_len + (start_m + 1) * BLOCK_M, L), 0)
    kvh = h // GROUP
    table = BLOCK_TABLES + s.to(tl.int64) * stride_tb
    k_base = K + kvh.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd  # (d, 1)
    v_base = V + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd  # (1, d)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        ok = cols < hi
        page = tl.load(table + (cols // PAGE) * stride_tp, mask=ok, other=0).to(tl.int64)
        row = cols % PAGE
        k = tl.load(k_base + page[None, :] * stride_kp + row[None, :] * stride_kn, mask=ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        visible = ok[None, :] & (cols[None, :] <= pos[:, None])  # causal: key j <= query position
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))  # key 0 is visible to every row: finite after the first tile
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vp + row[:, None] * stride_vn, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_ij
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only in rows past the queries (never stored)
    tl.store(O + (q0 + offs_m).to(tl.int64)[:, None] * stride_on + h * stride_oh + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_triton(q, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len: int,
                         block: tuple | None = None):
    """Causal attention of a flattened ragged batch over its pages, in one launch.

    q (N, n_head, head_dim): sequence b's new tokens are rows query_start[b] .. query_start[b+1]-1,
    at its last positions context_lens[b] - q_len .. context_lens[b] - 1 (a cached prefix or earlier
    chunks before them; their K/V, and the new tokens', already written). block_tables (B, max_blocks),
    context_lens (B,), query_start (B + 1,) int32; max_query_len: the grid's query blocks per sequence.
    -> (N, n_head, head_dim). Decoding sequences (one token) may be in the batch too.
    block: (BLOCK_M, BLOCK_N), default (16, 16) in the interpreter, (64, 64) on a GPU (not tuned yet).
    Without ``block``, a torch custom op (one opaque call for torch.compile).
    """
    if block is None:
        return torch.ops.labutils.paged_prefill(q, k_cache, v_cache, block_tables, context_lens, query_start,
                                                int(max_query_len))
    return _paged_prefill_impl(q, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len, block)


def _paged_prefill_impl(q, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len, block=None):
    if q.dim() != 3:
        raise ValueError(f"q must be (N, n_head, head_dim), got {tuple(q.shape)}")
    N, H, d = q.shape
    B = context_lens.shape[0]
    _check_decode(q[:1].expand(B, H, d), k_cache, v_cache, block_tables, context_lens)
    if query_start.shape != (B + 1,) or query_start.dtype != torch.int32:
        raise ValueError(f"query_start must be ({B + 1},) int32, got {tuple(query_start.shape)} {query_start.dtype}")
    bm, bn = block or ((16, 16) if runtime.triton_interpreted() else (64, 64))
    out = torch.empty(N, H, d, device=q.device, dtype=q.dtype)
    _paged_prefill[(B, triton.cdiv(max_query_len, bm), H)](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start, LOG2E / math.sqrt(d),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
        H // k_cache.shape[1], PAGE=k_cache.shape[2], HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    return out


@torch.library.custom_op("labutils::paged_prefill", mutates_args=())
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int) -> torch.Tensor:
    return _paged_prefill_impl(q, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len)


@_paged_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _check_decode(q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (B, n_head, head_dim) and k_cache, v_cache (num_blocks, n_kv_head, "
                         f"block_size, head_dim) alike; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    B, H, d = q.shape
    _, KV, page, dk = k_cache.shape
    if dk != d or H % KV:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}: head_dim must agree "
                         f"and n_head={H} be a multiple of n_kv_head={KV}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; supported: {', '.join(map(str, HEAD_DIMS))}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q and the caches must share one dtype of float16, bfloat16, float32; got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables must be (B, max_blocks) and context_lens (B,) for B={B}; got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError(f"block_tables and context_lens must be int32, got {block_tables.dtype}, {context_lens.dtype}")
    if q.device.type != "cuda" and not runtime.triton_interpreted():
        raise ValueError(f"tensors on {q.device} need Triton's interpreter (TRITON_INTERPRET=1); use CUDA tensors")
    if q.dtype == torch.bfloat16 and runtime.triton_interpreted():
        raise ValueError("bfloat16 gives wrong results in Triton's interpreter; use float16 or float32 on the CPU")
    return B, H, KV, page, d


def _paged_decode_impl(q, k_cache, v_cache, block_tables, context_lens, num_splits=None, scale=None, block_n=None):
    B, H, KV, page, d = _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    if num_splits is None:  # from shapes only (the longest possible context), so the choice never syncs
        num_splits = default_num_splits(B, KV, block_tables.shape[1] * page, q.device)
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_n = _BLOCK_N if block_n is None else int(block_n)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    G = H // KV
    o_part = torch.empty(B, H, num_splits, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    _paged_decode_split[(B, KV, num_splits)](
        q, k_cache, v_cache, o_part, lse_part, block_tables, context_lens, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), G, num_splits,
        PAGE=page, HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,  # tl.dot: >= 16
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if num_splits == 1:  # the one split's output is already normalised: no combine to launch
        return o_part[:, :, 0].to(q.dtype)
    out = torch.empty(B, H, d, device=q.device, dtype=q.dtype)
    _decode_combine[(B * H,)](o_part, lse_part, out, H, *out.stride(), num_splits,
                              HEAD_DIM=d, SPLITS=triton.next_power_of_2(num_splits))
    return out


@torch.library.custom_op("labutils::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, num_splits: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    return _paged_decode_impl(q, k_cache, v_cache, block_tables, context_lens, num_splits, None, block_n)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, num_splits=None, block_n=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits: int | None = None,
                 block_n: int | None = None):
    """Decode attention over a paged cache, one query token per sequence, split along the pages.

    q (B, n_head, head_dim) (any strides); k_cache, v_cache (num_blocks, n_kv_head, block_size,
    head_dim), one layer of a ``BlockPool``; block_tables (B, max_blocks) int32, sequence b's pages
    in order (entries past its length are never read); context_lens (B,) int32 >= 1, the positions
    sequence b attends to (its new token included, already written). -> (B, n_head, head_dim).
    num_splits: programs per (sequence, KV head), default from the shapes; block_n: positions per
    tile (a power of two >= 16, free of the block size). A torch custom op: one opaque call for
    torch.compile and CUDA graphs.
    """
    return torch.ops.labutils.paged_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits, block_n)
