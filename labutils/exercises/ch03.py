"""Notebook 03 (FlashAttention): the HBM traffic of the tiled kernel, the online-softmax merge of
two partial states, and the inner loop of a FlashAttention kernel in Triton."""
from __future__ import annotations

import math

import torch

from . import case, exercise


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


# ---- 1. bytes moved by FlashAttention ----------------------------------------------------------------------------
def ref_flash_io_bytes(N: int, d: int, block_m: int, dtype_bytes: int) -> int:
    n_blocks = -(-N // block_m)  # ceil(N / block_m): a ragged last query block is still a program
    return dtype_bytes * (2 * N * d + 2 * N * d * n_blocks)  # Q read + O written; K and V read once per block


@exercise("flash_io_bytes", reference=ref_flash_io_bytes,
          hint="per head: Q is read once and O written once (N x d each); every query block of block_m rows "
               "streams all of K and V (N x d each), and there are ceil(N / block_m) query blocks (a ragged "
               "last block counts); multiply the element count by dtype_bytes")
def _flash_io_bytes_cases(g):
    yield case("N = 4096, d = 128, block_m = 128, fp16", 4096, 128, 128, 2)
    yield case("N not a multiple of block_m: the last block is ragged", 1000, 128, 128, 2)
    yield case("N smaller than one block: K and V read once", 100, 64, 128, 2)
    yield case("N = 1 (decode-like)", 1, 128, 64, 2)
    yield case("block_m = 1: K and V read once per query row", 300, 64, 1, 2)
    yield case("fp32 (4 bytes)", 2048, 64, 64, 4)
    for _ in range(4):
        yield case("random N, d, block_m", _randint(1, 20000, g), 2 ** _randint(4, 8, g), 2 ** _randint(4, 8, g), 2)


# ---- 2. merging two partial softmax states -----------------------------------------------------------------------
def ref_softmax_merge(m1, l1, acc1, m2, l2, acc2):
    m = torch.maximum(m1, m2)  # (T,) the merged max; finite where either side has seen a key
    w1 = torch.where(torch.isinf(m1), torch.zeros_like(m1), torch.exp(m1 - m))  # an empty state weighs 0
    w2 = torch.where(torch.isinf(m2), torch.zeros_like(m2), torch.exp(m2 - m))
    l = w1 * l1 + w2 * l2
    return (w1[:, None] * acc1 + w2[:, None] * acc2) / l[:, None]


def _state(s: torch.Tensor, v: torch.Tensor):
    """The (m, l, acc) an online softmax keeps after visiting keys with scores s (T, S) and values v (S, d)."""
    m = s.max(dim=1).values
    p = torch.exp(s - m[:, None])
    return m, p.sum(dim=1), p @ v


def _split_states(g, T, S1, S2, d, dtype=torch.float64, scale=1.0, shift2=0.0):
    s = scale * torch.randn(T, S1 + S2, generator=g, dtype=torch.float64)
    s[:, S1:] += shift2
    v = torch.randn(S1 + S2, d, generator=g, dtype=torch.float64)
    a, b = _state(s[:, :S1], v[:S1]), _state(s[:, S1:], v[S1:])
    return tuple(x.to(dtype) for x in (*a, *b))


@exercise("softmax_merge", reference=ref_softmax_merge,
          hint="move both states to the common max m = max(m1, m2): scale l1 and acc1 by exp(m1 - m), l2 and acc2 by "
               "exp(m2 - m), add, and divide the merged acc by the merged l; never exponentiate a score without "
               "subtracting a max first (exp(1000) overflows even in float64)")
def _softmax_merge_cases(g):
    yield case("two states of equal max", *_split_states(g, 1, 4, 4, 8, shift2=0.0, scale=0.0))
    yield case("the second half's scores much larger (the max moves)", *_split_states(g, 6, 16, 16, 8, shift2=5.0))
    yield case("the first half's scores much larger", *_split_states(g, 6, 16, 16, 8, shift2=-5.0))
    yield case("scores around 1000: exp overflows without the max", *_split_states(g, 4, 8, 8, 16, shift2=1000.0))
    m1, l1, a1, m2, l2, a2 = _split_states(g, 5, 8, 8, 4)
    m2[1], l2[1], a2[1] = float("-inf"), 0.0, 0.0  # row 1: the second state has seen no key yet
    m1[3], l1[3], a1[3] = float("-inf"), 0.0, 0.0  # row 3: the first one has not
    yield case("an empty state (m = -inf, l = 0, acc = 0) in some rows", m1, l1, a1, m2, l2, a2)
    yield case("one key on one side", *_split_states(g, 3, 1, 31, 8))
    yield case("float32", *_split_states(g, 7, 24, 40, 16, dtype=torch.float32, scale=3.0))
    for _ in range(3):
        yield case("random split of a row of scores", *_split_states(g, _randint(1, 9, g), _randint(1, 64, g),
                                                                     _randint(1, 64, g), 2 ** _randint(2, 6, g),
                                                                     scale=4.0))


# ---- 3. the inner loop of a FlashAttention kernel (Triton) -------------------------------------------------------
def ref_flash_inner_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of (H, N, d) tensors, computed in float64, returned in q's dtype."""
    s = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (torch.softmax(s, dim=-1) @ v.double()).to(q.dtype)


def _qkv(g, H, N, d, dtype=torch.float32, q_scale=1.0):
    q, k, v = (torch.randn(H, N, d, generator=g) for _ in range(3))
    return (q * q_scale).to(dtype), k.to(dtype), v.to(dtype)


@exercise("flash_inner_loop", reference=ref_flash_inner_loop,
          hint="per key block: load K and V rows start..start+BLOCK_N with a mask (rows >= N are out of range), "
               "convert them to float32, s = tl.dot(q, tl.trans(k)) * qk_scale, set the scores of columns >= N to -inf (not 0), "
               "m_new = max(m_i, rowmax s), p = exp(s - m_new), alpha = exp(m_i - m_new), "
               "l_i = l_i * alpha + rowsum p, acc = acc * alpha + p v, m_i = m_new")
def _flash_inner_loop_cases(g):
    yield case("N = 1: a single key", *_qkv(g, 1, 1, 16))
    yield case("N = 16: exactly one block of keys", *_qkv(g, 1, 16, 16))
    yield case("N = 40: three key blocks, the last one ragged (keys 32..39 of a 16-wide block)", *_qkv(g, 1, 40, 16))
    yield case("N = 100, 2 heads, d = 32: several query and key blocks", *_qkv(g, 2, 100, 32))
    yield case("float16 inputs, d = 64", *_qkv(g, 2, 33, 64, dtype=torch.float16))
    yield case("float16, large scores (q x 40): exp(s) overflows without the running max",
               *_qkv(g, 1, 48, 16, dtype=torch.float16, q_scale=40.0))
    yield case("random H, N", *_qkv(g, _randint(1, 4, g), _randint(2, 90, g), 16))
