"""Rotary position embeddings against transformers, and grouped-query / causal attention."""
from __future__ import annotations

import math

import pytest
import torch

from labutils import attention
from labutils.decoder import apply_rope, rope_cos_sin

HEAD_DIM = 64
THETA = 10000.0


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- RoPE -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=8192, rope_theta=THETA)
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("theta", [THETA, 500000.0])
def test_rope_matches_transformers(theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=8192, rope_theta=theta)
    rotary = LlamaRotaryEmbedding(config)
    B, H, T = 2, 3, 64
    pos = torch.cat([torch.arange(0, 4096, 67), torch.tensor([4095, 4096])])[:T]
    T = pos.numel()
    q = torch.randn(B, H, T, HEAD_DIM, generator=_gen(0))
    k = torch.randn(B, 1, T, HEAD_DIM, generator=_gen(1))
    ref_cos, ref_sin = rotary(q, pos[None].expand(B, T))  # (B, T, head_dim)
    cos, sin = rope_cos_sin(pos, HEAD_DIM, theta, torch.float32)  # (T, head_dim)
    assert cos.shape == (T, HEAD_DIM)
    for name, out, ref in (("cos", cos, ref_cos[0]), ("sin", sin, ref_sin[0])):
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"{name} at positions up to {int(pos.max())}: max|diff| = {err:.2e}"
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    for name, x, ref in (("q", q, ref_q), ("k", k, ref_k)):
        err = (apply_rope(x, cos, sin) - ref).abs().max().item()
        assert err <= 1e-5, f"RoPE({name}) vs transformers, theta={theta}: max|diff| = {err:.2e}"


def test_rope_per_sequence_positions_match_transformers(hf_rope):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, T = 2, 2, 5
    pos = torch.stack([torch.arange(100, 100 + T), torch.arange(4092, 4092 + T)])  # (B, T)
    q = torch.randn(B, H, T, HEAD_DIM, generator=_gen(2))
    ref_cos, ref_sin = hf_rope(q, pos)
    cos, sin = rope_cos_sin(pos, HEAD_DIM, THETA, torch.float32)  # (B, T, head_dim)
    ref_q, _ = apply_rotary_pos_emb(q, q, ref_cos, ref_sin)
    err = (apply_rope(q, cos, sin) - ref_q).abs().max().item()
    assert err <= 1e-5, f"RoPE with (B, T) positions vs transformers: max|diff| = {err:.2e}"


def test_rope_preserves_norm():
    pos = torch.arange(0, 4097, 32)
    x = torch.randn(2, 3, pos.numel(), HEAD_DIM, generator=_gen(3))
    cos, sin = rope_cos_sin(pos, HEAD_DIM, THETA, torch.float32)
    y = apply_rope(x, cos, sin)
    rel = ((y.norm(dim=-1) - x.norm(dim=-1)).abs() / x.norm(dim=-1)).max().item()
    assert rel <= 1e-5, f"RoPE changed a vector's norm by a relative {rel:.2e}"
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :], atol=1e-3), "RoPE did not rotate anything"
    assert torch.allclose(y[..., 0, :], x[..., 0, :], atol=1e-6), "position 0 must be the identity"


def test_rope_scores_depend_only_on_relative_position():
    q = torch.randn(HEAD_DIM, generator=_gen(4))
    k = torch.randn(HEAD_DIM, generator=_gen(5))
    scale = (q.norm() * k.norm()).item()

    def score(m, n):
        pos = torch.tensor([m, n])
        cos, sin = rope_cos_sin(pos, HEAD_DIM, THETA, torch.float32)
        x = torch.stack([q, k])[None, None]  # (1, 1, 2, head_dim)
        r = apply_rope(x, cos, sin)[0, 0]
        return (r[0] @ r[1]).item()

    base = {(m, n): score(m, n) for m, n in [(5, 2), (17, 17), (40, 3), (3, 40)]}
    for (m, n), s0 in base.items():
        for shift in (1, 13, 200):
            s = score(m + shift, n + shift)
            assert abs(s - s0) <= 1e-4 * scale, \
                f"q.k at ({m + shift}, {n + shift}) = {s:.6f} but at ({m}, {n}) = {s0:.6f}"
    # ...and does depend on the difference (else the test above proves nothing)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3 * scale, "scores do not depend on the position difference"


# ---- attention: a reference written with explicit loops ---------------------------------------------
def reference_attention(q, k, v, q_pos):
    """Float64, one (batch, head) at a time: query head h reads KV head h // (n_head // n_kv_head)."""
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    S = k.shape[2]
    q_pos = q_pos.expand(B, T) if q_pos.dim() == 1 else q_pos
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // n_rep].double(), v[b, h // n_rep].double()
            scores = q[b, h].double() @ kh.T / math.sqrt(D)  # (T, S)
            visible = torch.arange(S)[None, :] <= q_pos[b][:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            out[b, h] = torch.softmax(scores, dim=-1) @ vh
    return out


def _qkv(B, H, KV, T, S, D=16, seed=0):
    g = _gen(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, S, D, generator=g),
            torch.randn(B, KV, S, D, generator=g))


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("H,KV", [(8, 2), (6, 3), (4, 1), (4, 4)])
def test_gqa_equals_explicit_repeat(H, KV):
    B, T, D = 2, 7, 16
    q, k, v = _qkv(B, H, KV, T, T, D, seed=H * 10 + KV)
    pos = torch.arange(T)
    n_rep = H // KV
    k_rep = torch.repeat_interleave(k, n_rep, dim=1)  # KV head j serves query heads j*n_rep .. j*n_rep+n_rep-1
    v_rep = torch.repeat_interleave(v, n_rep, dim=1)
    assert torch.equal(attention.repeat_kv(k, n_rep), k_rep), "repeat_kv does not repeat each head consecutively"
    gqa = attention.naive_attention(q, k, v, pos)
    explicit = attention.naive_attention(q, k_rep, v_rep, pos)
    sdpa = attention.sdpa_attention(q, k, v, pos)
    ref = reference_attention(q, k, v, pos)
    assert gqa.shape == (B, H, T, D)
    assert _err(gqa, explicit) <= 1e-6, f"GQA vs explicit repeat: {_err(gqa, explicit):.2e}"
    assert _err(gqa, sdpa) <= 1e-5, f"naive vs sdpa: {_err(gqa, sdpa):.2e}"
    assert _err(gqa, ref) <= 1e-5, f"naive vs loop reference: {_err(gqa, ref):.2e}"


def test_gqa_head_mapping_is_not_interleaved():
    """Query head h must read KV head h // n_rep, not h % n_kv_head: make the two choices differ."""
    B, H, KV, T, D = 1, 4, 2, 3, 8
    q, k, v = _qkv(B, H, KV, T, T, D, seed=9)
    v[:, 0], v[:, 1] = 1.0, -1.0  # every output of a head equals its KV head's constant value
    for fn in (attention.naive_attention, attention.sdpa_attention):
        out = fn(q, k, v, torch.arange(T))
        got = out[0, :, 0, 0].round().tolist()
        assert got == [1.0, 1.0, -1.0, -1.0], f"{fn.__name__}: heads read KV values {got}"


def test_causal_mask_shapes_and_values():
    S = 6
    q_pos = torch.tensor([2, 3, 5])
    m = attention.causal_mask(q_pos, S)
    expected = torch.tensor([[j <= p for j in range(S)] for p in q_pos.tolist()])
    assert m.shape == (3, S) and m.dtype == torch.bool
    assert torch.equal(m, expected), f"(T,) mask\n{m.int()}"
    q_pos_b = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mb = attention.causal_mask(q_pos_b, S)
    assert mb.shape == (2, 1, 3, S), f"(B, T) mask has shape {tuple(mb.shape)}"
    for b in range(2):
        exp = torch.tensor([[j <= p for j in range(S)] for p in q_pos_b[b].tolist()])
        assert torch.equal(mb[b, 0], exp), f"(B, T) mask, sequence {b}\n{mb[b, 0].int()}"


@pytest.mark.parametrize("fn", [attention.naive_attention, attention.sdpa_attention], ids=["naive", "sdpa"])
def test_decode_single_query_equals_last_row(fn):
    B, H, KV, S, D = 2, 6, 2, 11, 16
    q, k, v = _qkv(B, H, KV, S, S, D, seed=11)
    full = fn(q, k, v, torch.arange(S))
    for q_pos in (torch.tensor([S - 1]), torch.full((B, 1), S - 1)):
        one = fn(q[:, :, -1:], k, v, q_pos)
        assert one.shape == (B, H, 1, D)
        assert _err(one, full[:, :, -1:]) <= 1e-5, \
            f"{fn.__name__}, q_pos {tuple(q_pos.shape)}: decode vs last row {_err(one, full[:, :, -1:]):.2e}"


@pytest.mark.parametrize("fn", [attention.naive_attention, attention.sdpa_attention], ids=["naive", "sdpa"])
def test_earlier_query_ignores_later_keys(fn):
    B, H, KV, S, D, p = 1, 4, 2, 10, 16, 4
    q, k, v = _qkv(B, H, KV, 1, S, D, seed=12)
    out = fn(q, k, v, torch.tensor([p]))
    only_visible = fn(q, k[:, :, :p + 1], v[:, :, :p + 1], torch.tensor([p]))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p + 1:] = 100.0 * torch.randn_like(k2[:, :, p + 1:])
    v2[:, :, p + 1:] = 100.0
    changed_future = fn(q, k2, v2, torch.tensor([p]))
    ref = reference_attention(q, k, v, torch.tensor([p]))
    assert _err(out, only_visible) <= 1e-5, f"{fn.__name__}: keys after q_pos changed the output"
    assert _err(out, changed_future) <= 1e-5, f"{fn.__name__}: keys after q_pos changed the output"
    assert _err(out, ref) <= 1e-5, f"{fn.__name__}: vs loop reference {_err(out, ref):.2e}"
    everything = fn(q, k, v, torch.tensor([S - 1]))
    assert _err(out, everything) > 1e-3, "the query position made no difference"


@pytest.mark.parametrize("fn", [attention.naive_attention, attention.sdpa_attention], ids=["naive", "sdpa"])
def test_chunk_over_cache_matches_reference(fn):
    """T new queries at positions S-T .. S-1 over S keys (a prefill chunk after a cached prefix)."""
    B, H, KV, T, S, D = 2, 4, 2, 3, 9, 16
    q, k, v = _qkv(B, H, KV, T, S, D, seed=13)
    pos = torch.arange(S - T, S)
    out = fn(q, k, v, pos)
    ref = reference_attention(q, k, v, pos)
    assert _err(out, ref) <= 1e-5, f"{fn.__name__}: chunk vs reference {_err(out, ref):.2e}"
    pos_b = torch.stack([pos, pos])
    assert _err(fn(q, k, v, pos_b), ref) <= 1e-5, f"{fn.__name__}: (B, T) positions"


def test_get_backend():
    assert attention.get_backend("naive") is attention.naive_attention
    assert attention.get_backend("sdpa") is attention.sdpa_attention
    fn = lambda q, k, v, q_pos: q  # noqa: E731
    assert attention.get_backend(fn) is fn
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.get_backend("flash9")
