"""Paged attention: decode over a block pool in Triton, prefill over gathered pages, and the decoder's
paged cache seam (notebook 06).

The batch format (as vLLM and nano-vllm): a step of a server mixes sequences of different lengths,
some reading their prompt (prefill, maybe a chunk of it, maybe after a cached prefix), some adding
one token (decode). All their new tokens are flattened into ONE row::

    idx:        (1, N)   the N new tokens of all B sequences, sequence after sequence
    input_pos:  (1, N)   each token's position in its own sequence (RoPE uses it per token)

so the decoder runs unchanged (its projections and MLP see N tokens; ``apply_rope`` takes (B, T)
positions) and only attention needs to know where one sequence ends: a ``PagedBatch`` (below) holds
each token's slot in the pool, each sequence's block table and length, and which sequences decode.
A scheduler builds it with ``make_batch`` and sets it on the pool for exactly one forward::

    with pool.step(batch):
        logits = model(batch.input_ids, batch.input_pos, logits_at=batch.last_token_index)  # (1, B, vocab)

The cache seam. ``PagedKVCache`` (one per layer, all sharing one ``BlockPool``) owns its attention
call, as vLLM's attention backends do: ``attend(q, k, v, input_pos, attn_fn)`` writes the N new
keys/values into their slots (``write_kv``), then

* decode sequences (one new token): ``paged_decode``, the Triton kernel below, one launch for all of
  them, no host sync (CUDA-graph capturable at a fixed batch size);
* prefill sequences (a prompt, a chunk of one, maybe after a cached prefix), two ways:
  ``prefill="torch"`` (the default): ``paged_prefill`` gathers each sequence's pages into a
  contiguous (1, n_kv_head, L, head_dim) tensor and calls the model's own attention backend
  ``attn_fn`` with the chunk's positions (causal, over the prefix too): torch, one call per
  sequence, a copy of its whole context. ``prefill="triton"``: ``paged_prefill_triton``, one varlen
  causal kernel for the whole step (decodes included) reading the pages in place; checked in the
  interpreter against the torch path, not yet tuned or timed on a GPU.

With no batch set (a cache left attached outside its step) ``attend`` raises instead of writing.

The decode kernel (FlashDecoding over pages, as notebook 03's ``flash_decode``): grid (B, n_kv_head,
num_splits). A program takes the ``n_head // n_kv_head`` query heads of one KV head as the rows of
its tile (GQA: each K/V byte is read once per group) and one range of whole pages of the sequence's
``context_len`` positions, a range computed on the device from ``context_lens``. It walks the range
``BLOCK_N`` positions at a time; each position's physical address comes from the block table::

    page = block_table[b, n // block_size];  K[page, kvh, n % block_size, :]

with the online softmax of flash_attention, and writes a partial output and its log-sum-exp. The
combine kernel of flash_attention merges the splits exactly.

Names: B sequences, N new tokens of the step, n_head, n_kv_head, head_dim, block_size, L context length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import runtime
from .attention import naive_attention
from .flash_attention import DTYPES, HEAD_DIMS, LOG2E, _decode_combine, default_num_splits
from .paged_cache import BlockPool, BlockTable, OutOfBlocks

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
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(nonempty, m_i + tl.math.log2(l_safe), float("-inf"))
    part = (b.to(tl.int64) * GROUP * tl.num_programs(1) + h) * NUM_SPLITS + split  # rows of (B, H, splits)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=row_ok)


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


# ---- torch references -----------------------------------------------------------------------------
def gather_kv(k_cache, v_cache, block_table, length: int):
    """Positions 0 .. length-1 of one sequence, gathered from its pages: two (1, n_kv_head, length, head_dim)."""
    page = k_cache.shape[2]
    n_pages = -(-length // page)
    pages = block_table[:n_pages].long()

    def one(cache):
        x = cache[pages]  # (n_pages, n_kv_head, page, head_dim)
        return x.transpose(0, 1).reshape(cache.shape[1], n_pages * page, cache.shape[3])[None, :, :length]

    return one(k_cache), one(v_cache)


def paged_decode_ref(q, k_cache, v_cache, block_tables, context_lens):
    """The torch reference of ``paged_decode``: gather each sequence's pages, naive attention (fp32 math)."""
    out = []
    for b, L in enumerate(context_lens.tolist()):
        k, v = gather_kv(k_cache, v_cache, block_tables[b], L)
        out.append(naive_attention(q[b][None, :, None], k, v, torch.tensor([L - 1], device=q.device))[0, :, 0])
    return torch.stack(out)  # (B, n_head, head_dim)


def write_kv(pool: BlockPool, layer: int, slot_mapping, k, v):
    """Write new keys/values k, v (N, n_kv_head, head_dim) of layer ``layer`` into slots
    slot_mapping (N,) (slot = block * block_size + offset; every slot valid)."""
    write_kv_into(pool.k_cache(layer), pool.v_cache(layer), slot_mapping, k, v)


def write_kv_into(k_cache, v_cache, slot_mapping, k, v):
    """``write_kv`` on one layer's caches (num_blocks, n_kv_head, block_size, head_dim)."""
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]):
        raise ValueError(f"k, v must be (N, n_kv_head, head_dim) = (N, {k_cache.shape[1]}, {k_cache.shape[3]}), "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) for {k.shape[0]} new tokens, "
                         f"got {tuple(slot_mapping.shape)}")
    page = k_cache.shape[2]
    blk, off = slot_mapping // page, slot_mapping % page  # (N,) each
    k_cache[blk, :, off] = k.to(k_cache.dtype)  # indexed view: (N, n_kv_head, head_dim)
    v_cache[blk, :, off] = v.to(v_cache.dtype)


def paged_prefill(q, k_cache, v_cache, batch: "PagedBatch", seqs, attn_fn):
    """Attention of the chunks of prefill sequences ``seqs`` (indices into the batch): for each, its
    pages gathered (cached prefix, earlier chunks and this chunk, already written) and ``attn_fn``
    called with the chunk's positions. q (1, n_head, N, head_dim) -> {seq: (1, n_head, T_seq, head_dim)}.
    torch, one call per sequence (a Triton varlen kernel reading pages directly is not written yet)."""
    out = {}
    for s in seqs:
        a, z = batch.query_start[s], batch.query_start[s + 1]
        k, v = gather_kv(k_cache, v_cache, batch.block_tables[s], batch.context_lens_host[s])
        out[s] = attn_fn(q[:, :, a:z], k, v, batch.input_pos[:, a:z])
    return out


# ---- per-step batch metadata ---------------------------------------------------------------------
@dataclass
class PagedBatch:
    """One forward's worth of sequences, flattened (see the module docstring). Device tensors for the
    kernels, host lists for the torch prefill loop (known to the scheduler anyway: no sync)."""
    input_ids: torch.Tensor  # (1, N) int64
    input_pos: torch.Tensor  # (1, N) int64, each token's position in its sequence
    slot_mapping: torch.Tensor  # (N,) int64, each token's slot in the pool
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    context_lens: torch.Tensor  # (B,) int32, positions after this step
    last_token_index: torch.Tensor  # (B,) int64, index in N of each sequence's last new token
    query_start: list  # B + 1 offsets of each sequence's tokens in N
    query_start_t: torch.Tensor  # the same, (B + 1,) int32 on the device
    max_query_len: int
    context_lens_host: list
    decode_seqs: list  # sequences with one new token
    prefill_seqs: list  # the others
    decode_tokens: torch.Tensor | None  # (B_dec,) their token indices; None when every sequence decodes
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def make_batch(tables: list[BlockTable], new_tokens: list, device=None) -> PagedBatch:
    """Allocate the slots of each sequence's new tokens (``tables[i].append_slots``) and build the
    step's metadata. new_tokens[i]: the token ids sequence i feeds this step (a prompt, a chunk of
    one, or the last sampled token). Raises ``OutOfBlocks`` before touching any table if the pool
    cannot hold them all."""
    if len(tables) != len(new_tokens) or not tables:
        raise ValueError(f"need one list of new tokens per table, got {len(tables)} tables and {len(new_tokens)}")
    new_tokens = [[int(t) for t in (ids.tolist() if torch.is_tensor(ids) else ids)] for ids in new_tokens]
    if any(len(ids) == 0 for ids in new_tokens):
        raise ValueError("every sequence in a step needs at least one new token")
    pool = tables[0].pool
    if any(t.pool is not pool for t in tables) or len({id(t) for t in tables}) != len(tables):
        raise ValueError("the tables must be distinct and share one pool")
    need = sum(t.blocks_needed(len(ids)) for t, ids in zip(tables, new_tokens))
    if need > pool.num_available:
        raise OutOfBlocks(need, pool.num_available, pool.num_blocks)
    device = pool.device if device is None else device
    ids, pos, slots, starts = [], [], [], [0]
    for t, new in zip(tables, new_tokens):
        p0 = t.num_tokens
        slots += t.append_slots(len(new), new)
        ids += new
        pos += range(p0, p0 + len(new))
        starts.append(len(ids))
    width = max(len(t.blocks) for t in tables)
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t.blocks)] = torch.tensor(t.blocks, dtype=torch.int32)
    lens = [t.num_tokens for t in tables]
    decode = [i for i, ids_i in enumerate(new_tokens) if len(ids_i) == 1]
    prefill = [i for i, ids_i in enumerate(new_tokens) if len(ids_i) > 1]
    bt, ctx = bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    all_decode = len(decode) == len(tables)
    dec_idx = torch.tensor(decode, dtype=torch.long, device=device)
    return PagedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        input_pos=torch.tensor([pos], dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=bt, context_lens=ctx,
        last_token_index=torch.tensor([s - 1 for s in starts[1:]], dtype=torch.long, device=device),
        query_start=starts, query_start_t=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(len(x) for x in new_tokens), context_lens_host=lens, decode_seqs=decode, prefill_seqs=prefill,
        decode_tokens=None if all_decode else torch.tensor([starts[i] for i in decode], dtype=torch.long,
                                                           device=device),
        decode_block_tables=bt if all_decode else bt[dec_idx], decode_context_lens=ctx if all_decode else ctx[dec_idx])


# ---- the decoder's cache seam ---------------------------------------------------------------------
class PagedKVCache:
    """Layer ``layer``'s view of a ``BlockPool`` for the decoder's cache seam: ``attend`` writes the
    step's new K/V into their slots and runs paged attention with the batch set by ``pool.step``.

    decode: "triton" (``paged_decode``) or "torch" (gather the pages and call the model's attn_fn,
    the reference path). prefill: "torch" (``paged_prefill``: gathered pages, the model's attn_fn)
    or "triton" (``paged_prefill_triton``: one varlen launch for the whole step, decodes included)."""

    def __init__(self, pool: BlockPool, layer: int, decode: str = "triton", prefill: str = "torch"):
        if not 0 <= layer < pool.n_layer:
            raise ValueError(f"layer {layer} outside the pool's 0..{pool.n_layer - 1}")
        if decode not in ("triton", "torch") or prefill not in ("triton", "torch"):
            raise ValueError(f"decode and prefill must be 'triton' or 'torch', got {decode!r}, {prefill!r}")
        self.pool, self.layer, self.decode, self.prefill = pool, layer, decode, prefill

    def update(self, input_pos, k, v):
        raise TypeError("a PagedKVCache owns its attention call: the decoder calls attend(q, k, v, input_pos, "
                        "attn_fn); there is no contiguous (k_all, v_all) to return")

    def attend(self, q, k, v, input_pos, attn_fn):
        """q (1, n_head, N, head_dim), k/v (1, n_kv_head, N, head_dim): the flattened step
        -> (1, n_head, N, head_dim)."""
        batch = self.pool.batch
        if batch is None:
            raise RuntimeError("PagedKVCache.attend: no batch metadata is set on the pool; run the forward "
                               "inside `with pool.step(make_batch(...)):` (a paged cache left attached "
                               "outside its step must not write into the pool)")
        if q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != batch.num_tokens:
            raise ValueError(f"a paged step takes its {batch.num_tokens} tokens flattened as (1, N): q must be "
                             f"(1, n_head, {batch.num_tokens}, head_dim), got {tuple(q.shape)}")
        kc, vc = self.pool.k_cache(self.layer), self.pool.v_cache(self.layer)
        write_kv_into(kc, vc, batch.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (N, n_kv_head, d)
        qt = q[0].transpose(0, 1)  # (N, n_head, head_dim)
        if not batch.prefill_seqs and self.decode == "triton":  # every sequence decodes: one launch, no sync
            return paged_decode(qt, kc, vc, batch.block_tables, batch.context_lens).transpose(0, 1)[None]
        if batch.prefill_seqs and self.prefill == "triton":  # one varlen launch for the whole step
            return paged_prefill_triton(qt, kc, vc, batch.block_tables, batch.context_lens, batch.query_start_t,
                                        batch.max_query_len).transpose(0, 1)[None]
        out = torch.empty_like(qt)  # (N, n_head, head_dim)
        if batch.decode_seqs and self.decode == "triton":
            rows = batch.decode_tokens
            out[rows] = paged_decode(qt[rows], kc, vc, batch.decode_block_tables, batch.decode_context_lens)
            seqs = batch.prefill_seqs
        else:
            seqs = range(len(batch.context_lens_host))
        for s, y in paged_prefill(q, kc, vc, batch, seqs, attn_fn).items():
            out[batch.query_start[s]:batch.query_start[s + 1]] = y[0].transpose(0, 1)
        return out.transpose(0, 1)[None]  # (1, n_head, N, head_dim)


def paged_caches(pool: BlockPool, decode: str = "triton", prefill: str = "torch") -> list[PagedKVCache]:
    """One PagedKVCache per layer of the pool, for ``model.kv_caches_attached(...)``."""
    return [PagedKVCache(pool, i, decode, prefill) for i in range(pool.n_layer)]
