"""Notebook 01's exercises: plausible wrong answers fail, naming the case that catches them."""
from __future__ import annotations

import math

import pytest
import torch

from labutils.decoder import apply_rope, rope_cos_sin
from labutils.exercises import EXERCISES
from conftest import assert_fails_naming_the_case


def test_notebook_01_exercises_are_registered():
    assert {"causal_attention", "rope_rotate", "no_cache_flops"} <= set(EXERCISES)


def _attention(q, k, v, visible, scale=True):
    scores = q @ k.T / (math.sqrt(q.shape[-1]) if scale else 1.0)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def _mask_by_row_index(q, k, v, q_pos):  # assumes query i sits at position i
    return _attention(q, k, v, torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None])


def _no_scale(q, k, v, q_pos):
    return _attention(q, k, v, torch.arange(k.shape[0])[None, :] <= q_pos[:, None], scale=False)


def _strict_mask(q, k, v, q_pos):  # a token may not see itself
    return _attention(q, k, v, torch.arange(k.shape[0])[None, :] < q_pos[:, None])


def _mask_with_zeros(q, k, v, q_pos):  # masked scores set to 0, not -inf: they still get weight
    scores = q @ k.T / math.sqrt(q.shape[-1])
    scores = scores * (torch.arange(k.shape[0])[None, :] <= q_pos[:, None])
    return torch.softmax(scores, dim=-1) @ v


def _unstable_softmax(q, k, v, q_pos):
    scores = q @ k.T / math.sqrt(q.shape[-1])
    e = torch.exp(scores) * (torch.arange(k.shape[0])[None, :] <= q_pos[:, None])  # no max subtracted: exp overflows
    return (e / e.sum(-1, keepdim=True)) @ v


def _rope_with(x, pos, theta, layout="half", sign=1, exponent=2):
    T, d = x.shape
    inv_freq = theta ** (-exponent * torch.arange(0, d // 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv_freq
    cos, sin = ang.cos(), sign * ang.sin()
    if layout == "half":
        a, b = x[:, : d // 2], x[:, d // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
    a, b = x[:, 0::2], x[:, 1::2]  # interleaved pairs (x_0, x_1), (x_2, x_3): GPT-J's layout
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def _rope_interleaved(x, pos, theta=10000.0):
    return _rope_with(x, pos, theta, layout="interleaved")


def _rope_backwards(x, pos, theta=10000.0):
    return _rope_with(x, pos, theta, sign=-1)


def _rope_exponent_i_over_d(x, pos, theta=10000.0):
    return _rope_with(x, pos, theta, exponent=1)


def _rope_float32_angles(x, pos, theta=10000.0):
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta, x.dtype)  # angles in float32, as the decoder does
    return apply_rope(x, cos, sin)


def _weights_only_flops(n, n_weights, n_layer, d_attn):
    return 2 * n_weights * n * (n + 1) // 2


def _last_step_only(n, n_weights, n_layer, d_attn):
    return 2 * n_weights * n + 2 * n_layer * d_attn * n * n


def _off_by_one_range(n, n_weights, n_layer, d_attn):  # sums L = 0 .. n-1
    return sum(2 * n_weights * L + 2 * n_layer * d_attn * L * L for L in range(n))


WRONG = [("causal_attention", _mask_by_row_index, "the last 2 positions only", "elements differ"),
         ("causal_attention", _no_scale, "queries at positions 0..5", "elements differ"),
         ("causal_attention", _strict_mask, "queries at positions 0..5", "elements differ"),
         ("causal_attention", _mask_with_zeros, "queries at positions 0..5", "elements differ"),
         ("causal_attention", _unstable_softmax, "large scores", "elements differ"),
         ("rope_rotate", _rope_interleaved, "positions 0..4, head_dim 8", "elements differ"),
         ("rope_rotate", _rope_backwards, "head_dim 2: one pair, position 1", "first at [0, 1]: got -0.841471, expected 0.841471"),
         ("rope_rotate", _rope_exponent_i_over_d, "positions 0..4, head_dim 8", "elements differ"),
         ("rope_rotate", _rope_float32_angles, "positions 0..4, head_dim 8", "elements differ"),
         ("no_cache_flops", _weights_only_flops, "one token", "got 2000, expected 2256"),
         ("no_cache_flops", _last_step_only, "two tokens", "got 5024, expected 7280"),
         ("no_cache_flops", _off_by_one_range, "one token", "got 0, expected 2256")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


def test_causal_attention_reference_agrees_with_the_package():
    from labutils import attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(9)
    ref = EXERCISES["causal_attention"].reference
    torch.testing.assert_close(ref(q[0, 0], k[0, 0], v[0, 0], pos), attention.naive_attention(q, k, v, pos)[0, 0])


def test_rope_reference_agrees_with_the_decoder_in_float64_at_small_positions():
    x, pos = torch.randn(6, 32, dtype=torch.float64), torch.arange(6)
    cos, sin = rope_cos_sin(pos, 32, 10000.0, torch.float64)
    torch.testing.assert_close(EXERCISES["rope_rotate"].reference(x, pos), apply_rope(x, cos, sin), rtol=1e-6, atol=1e-6)


def test_no_cache_flops_reference_is_the_sum_of_prefill_flops():
    from labutils import configs, roofline

    cfg = configs.arch("SmolLM2-135M")
    n = 50
    total = sum(roofline.prefill(cfg, L)["flops"] for L in range(1, n + 1))
    d_attn = cfg["num_attention_heads"] * cfg["head_dim"]
    assert EXERCISES["no_cache_flops"].reference(n, roofline.linear_params(cfg), cfg["num_hidden_layers"], d_attn) == total
