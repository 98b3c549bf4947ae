"""Notebook 01 (attention and a decoder from scratch): causal attention from its definition, rotary
position embeddings, and the FLOPs of generating without a cache."""
from __future__ import annotations

import math

import torch

from . import case, exercise


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


def _randn(*shape, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def ref_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    T, d = q.shape
    S = k.shape[0]
    scores = (q.double() @ k.double().T) / math.sqrt(d)                           # (T, S)
    visible = torch.arange(S)[None, :] <= q_pos[:, None]                          # key j visible to query i: j <= pos(i)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.double()).to(q.dtype)               # (T, d)


@exercise("causal_attention", reference=ref_causal_attention,
          hint="scores = q @ k.T / sqrt(d) (T, S); query i may see keys j <= q_pos[i] (set the others to -inf, "
               "not 0); softmax over the keys (last dim); then @ v. q_pos, not the row index, says where query i "
               "sits: the queries can be the last few positions of a longer sequence")
def _causal_attention_cases(g):
    d = 8
    k, v = _randn(6, d, g=g), _randn(6, d, g=g)
    yield case("queries at positions 0..5 of 6 keys", _randn(6, d, g=g), k, v, torch.arange(6))
    yield case("the last 2 positions only (as in decoding)", _randn(2, d, g=g), k, v, torch.tensor([4, 5]))
    yield case("one query at position 0: sees key 0 alone", _randn(1, d, g=g), k, v, torch.tensor([0]))
    yield case("head_dim 1", _randn(5, 1, g=g), _randn(5, 1, g=g), _randn(5, 1, g=g), torch.arange(5))
    yield case("large scores (|q.k| ~ 1e3): a stable softmax", 30 * _randn(4, d, g=g), 30 * _randn(4, d, g=g),
               _randn(4, d, g=g), torch.arange(4))
    yield case("positions not in order, one repeated", _randn(3, d, g=g), k, v, torch.tensor([5, 1, 1]))
    yield case("float32", _randn(7, 16, g=g, dtype=torch.float32), _randn(7, 16, g=g, dtype=torch.float32),
               _randn(7, 16, g=g, dtype=torch.float32), torch.arange(7))
    for _ in range(3):
        S, d = _randint(2, 40, g), [16, 32, 64][_randint(0, 3, g)]
        T = _randint(1, S + 1, g)
        yield case("random: the last T of S positions", _randn(T, d, g=g), _randn(S, d, g=g), _randn(S, d, g=g),
                   torch.arange(S - T, S))


def ref_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    T, d = x.shape
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)         # (d/2,) theta^(-2i/d)
    angles = pos[:, None].double() * inv_freq                                      # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[:, : d // 2].double(), x[:, d // 2:].double()                       # the pair (x_i, x_{i+d/2})
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@exercise("rope_rotate", reference=ref_rope,
          hint="pair x[:, i] with x[:, i + d/2] (the half-split layout of Llama/Qwen), angle = pos * theta^(-2i/d) "
               "for i = 0 .. d/2 - 1; rotate each pair by its angle: (a cos - b sin, b cos + a sin). Work in x's "
               "dtype (float64 here): float32 angles are off by ~1e-5 at position 500")
def _rope_cases(g):
    yield case("position 0: no rotation", _randn(1, 8, g=g), torch.tensor([0]))
    yield case("head_dim 2: one pair, position 1", torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([1]))
    yield case("positions 0..4, head_dim 8", _randn(5, 8, g=g), torch.arange(5))
    yield case("theta 1e6 (long-context models)", _randn(4, 16, g=g), torch.arange(4), 1e6)
    yield case("one token at position 1000", _randn(1, 64, g=g), torch.tensor([1000]))
    yield case("positions out of order", _randn(3, 8, g=g), torch.tensor([7, 2, 5]))
    for _ in range(3):
        T, d = _randint(1, 20, g), [4, 32, 64, 128][_randint(0, 4, g)]
        yield case("random x and positions", _randn(T, d, g=g), torch.randint(0, 512, (T,), generator=g))


def ref_no_cache_flops(n: int, n_weights: int, n_layer: int, d_attn: int) -> int:
    # step L (a forward over L tokens): 2 * N * L for the weights, 2 * n_layer * d_attn * L^2 for causal attention
    s1 = n * (n + 1) // 2                 # sum of L, L = 1 .. n
    s2 = n * (n + 1) * (2 * n + 1) // 6   # sum of L^2
    return 2 * n_weights * s1 + 2 * n_layer * d_attn * s2


@exercise("no_cache_flops", reference=ref_no_cache_flops,
          hint="without a cache, the step that makes token L+1 runs all L tokens: 2 * n_weights * L + 2 * n_layer * "
               "d_attn * L**2 FLOPs; sum that over L = 1 .. n (a loop is fine; the closed form uses n(n+1)/2 and "
               "n(n+1)(2n+1)/6)")
def _no_cache_flops_cases(g):
    yield case("one token", 1, 1000, 2, 64)
    yield case("two tokens", 2, 1000, 2, 64)
    yield case("no attention (d_attn = 0): the weights' part alone", 100, 10**6, 4, 0)
    yield case("SmolLM2-135M shape, 8192 tokens", 8192, 134_479_872, 30, 576)
    yield case("Qwen2.5-7B shape, 32768 tokens", 32768, 7_070_414_848, 28, 3584)
    for _ in range(3):
        yield case("random", _randint(1, 5000, g), _randint(1, 10**9, g), _randint(1, 80, g), 64 * _randint(1, 64, g))
