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
``flash_decode_rows`` does the same for a few queries per sequence (a target verifying k drafts in
notebook 05): the rows of a program are its query heads times the T tokens, each masked at its own
position; the causal forward kernel would give those few queries one program per head, walking the
whole cache alone.

The kernels and their launchers live in labutils.kernels.flash_attention (the forward, pointer and
TMA) and labutils.kernels.decode_attention (FlashDecoding); this module re-exports them and adds the
decoder's attention backend and the cost model.
"""
from __future__ import annotations

import torch

from .kernels.decode_attention import (  # noqa: F401  (re-exported: notebooks and tests read them from here)
    _DEC_CONFIGS, MAX_ROWS, _decode_combine, _decode_rows_split, _decode_split, _decode_split_tuned, decode_rows_fit,
    default_num_splits, flash_decode, flash_decode_rows)
from .kernels.flash_attention import (  # noqa: F401
    _FWD_CONFIGS, _TMA_CONFIGS, DTYPES, HEAD_DIMS, LOG2E, _attn_fwd, _attn_fwd_tma, _attn_fwd_tma_tuned,
    _attn_fwd_tuned, _attn_inner, _attn_inner_tma, _bucket, _check, _flash_attention_tma, _launch_opts,
    _positions, _tma_block_shapes, flash_attention, tma_usable)


@torch.library.custom_op("labutils::flash_attention_backend", mutates_args=())
def _flash_backend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      num_splits: int | None = None) -> torch.Tensor:
    if q.shape[2] == 1:
        return flash_decode(q, k, v, q_pos, num_splits=num_splits)
    if q.shape[2] <= ROWS_MAX_T and decode_rows_fit(q, k):  # a few queries (drafts to verify): split the keys
        return flash_decode_rows(q, k, v, q_pos, num_splits=num_splits)
    return flash_attention(q, k, v, causal=True, q_pos=q_pos)


@_flash_backend_op.register_fake
def _(q, k, v, q_pos, num_splits=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


ROWS_MAX_T = 32  # up to this many new tokens the backend splits the keys (flash_decode_rows)


def flash_backend(q, k, v, q_pos, num_splits: int | None = None):
    """The attention seam (labutils.attention): flash_decode for one new token, flash_decode_rows for
    up to ``ROWS_MAX_T`` (the k + 1 tokens a target verifies, notebook 05), else causal
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
