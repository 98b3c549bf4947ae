"""KV caches (labutils.kv_cache): cached decoding equals the no-cache forward, and the caches'
bookkeeping (where StaticKVCache writes, how ConcatKVCache grows, how many bytes they hold)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_FAMILIES, assert_rel_close, tiny_hf_model
from labutils import roofline
from labutils.decoder import Decoder
from labutils.generate import greedy_cached, greedy_no_cache
from labutils.kv_cache import ConcatKVCache, StaticKVCache, concat_caches, static_caches

TOL = 1e-4
B, P, N_STEPS = 2, 6, 5  # batch, prompt length, single-token steps after the prompt
MAX_SEQ = 32  # static cache length for the tiny models (their context is 256)
N_GREEDY = 16


@pytest.fixture(scope="module")
def tiny_decoder():
    """A fresh lab Decoder of a tiny family on each call (the HF weights are built once per family
    and shared): caches attached by one test or one loop never leak into the next."""
    hf = {}

    def get(family):
        if family not in hf:
            hf[family] = tiny_hf_model(family, seed=0)
        return Decoder.from_hf(hf[family])
    return get


def _ids(shape, seed, vocab=128):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _make_caches(kind, model, batch, max_seq_len=MAX_SEQ):
    return static_caches(model, batch, max_seq_len) if kind == "static" else concat_caches(model)


# ---- cached decoding == no-cache forward, every family ---------------------------------------------
@pytest.mark.parametrize("kind", ["static", "concat"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cached_steps_match_full_forward(tiny_decoder, family, kind):
    model = tiny_decoder(family)
    ids = _ids((B, P + N_STEPS), seed=11)
    with torch.no_grad():
        full = model(ids)  # (B, P + N_STEPS, vocab), no cache
        caches = _make_caches(kind, model, B)
        model.set_kv_caches(caches)
        try:
            prefill = model(ids[:, :P], input_pos=torch.arange(P))
            assert_rel_close(prefill, full[:, :P], TOL, f"{family}, {kind} cache, prefill of {P}")
            for pos in range(P, P + N_STEPS):
                step = model(ids[:, pos:pos + 1], input_pos=torch.tensor([pos]))
                assert step.shape == (B, 1, model.cfg.vocab_size), f"step logits shape {tuple(step.shape)}"
                assert_rel_close(step, full[:, pos:pos + 1], TOL, f"{family}, {kind} cache, step at position {pos}")
        finally:
            model.set_kv_caches(None)
    if kind == "concat":
        assert caches[-1].k.shape[2] == P + N_STEPS, f"concat cache holds {caches[-1].k.shape[2]} positions"
    else:
        written = caches[-1].k[:, :, :P + N_STEPS].abs().amax(dim=(0, 1, 3))
        assert bool((written > 0).all()), "static cache: some position up to the last step was never written"
        assert caches[-1].k[:, :, P + N_STEPS:].abs().max() == 0, "static cache written beyond the last step"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cached_greedy_equals_no_cache(tiny_decoder, family):
    model = tiny_decoder(family)
    ids = _ids((B, P), seed=21)
    with torch.no_grad():
        ref = greedy_no_cache(model, ids, N_GREEDY)
        for kind in ("static", "concat"):
            model = tiny_decoder(family)  # a fresh decoder per cache kind (see test_switch_cache_kinds)
            out = greedy_cached(model, ids, N_GREEDY, _make_caches(kind, model, B))
            assert all(layer.self_attn.kv_cache is None for layer in model.layers), \
                f"{kind}: greedy_cached left the caches attached"
            assert out.shape == ref.shape, f"{kind}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
            diff = (out != ref).nonzero()
            assert len(diff) == 0, (f"{family}, {kind} cache: {len(diff)} greedy tokens differ, first at "
                                    f"{diff[0].tolist()}: cached {out[:, P:].tolist()} vs no-cache {ref[:, P:].tolist()}")


def test_chunked_prefill_equals_single_prefill(tiny_decoder):
    model = tiny_decoder("qwen2-gqa-tied")
    ids = _ids((B, 8), seed=31)
    with torch.no_grad():
        model.set_kv_caches(static_caches(model, B, 16))
        single = model(ids, input_pos=torch.arange(8))
        model.set_kv_caches(static_caches(model, B, 16))
        first = model(ids[:, :4], input_pos=torch.arange(4))
        second = model(ids[:, 4:], input_pos=torch.arange(4, 8))  # a chunk over a non-empty cache
        model.set_kv_caches(None)
        full = model(ids)
    assert_rel_close(single, full, TOL, "static cache, single prefill of 0..7 vs no cache")
    assert_rel_close(first, single[:, :4], TOL, "chunk 0..3 vs single prefill")
    assert_rel_close(second, single[:, 4:], TOL, "chunk 4..7 after 0..3 vs single prefill")


@pytest.mark.parametrize("family", ["llama-gqa-tied", "qwen2-mha-untied"])
def test_per_sequence_positions_ragged_batch(tiny_decoder, family):
    """Two prompts of different lengths (5 and 8) in one static cache, decoded with (B, 1) positions:
    each sequence's logits equal its own no-cache forward."""
    model = tiny_decoder(family)
    lens, n = (5, 8), 4
    seqs = [_ids((1, L + n), seed=41 + i) for i, L in enumerate(lens)]
    with torch.no_grad():
        refs = [model(s) for s in seqs]  # no cache
        model.set_kv_caches(static_caches(model, 2, 16))
        try:
            # Both rows take positions 0..4; row 1 then 5..7. Row 0 gets filler at 5..7, which its own
            # decode steps overwrite before any query can see it (causal mask).
            first = torch.cat([seqs[0][:, :5], seqs[1][:, :5]])
            model(first, input_pos=torch.arange(5))
            filler = torch.zeros(1, 3, dtype=torch.long)
            model(torch.cat([filler, seqs[1][:, 5:8]]), input_pos=torch.arange(5, 8))
            for i in range(n):
                pos = torch.tensor([[lens[0] + i], [lens[1] + i]])
                tok = torch.stack([seqs[0][0, lens[0] + i], seqs[1][0, lens[1] + i]]).view(2, 1)
                out = model(tok, input_pos=pos)
                for b in range(2):
                    p = lens[b] + i
                    assert_rel_close(out[b:b + 1], refs[b][:, p:p + 1], TOL,
                                     f"{family}, ragged batch, sequence {b} at position {p}")
        finally:
            model.set_kv_caches(None)


def test_switch_cache_kinds_on_one_model(tiny_decoder):
    """One model, static cache, no cache, then a concat cache: each gives the no-cache logits."""
    model = tiny_decoder("llama-gqa-tied")
    ids = _ids((1, 6), seed=51)
    with torch.no_grad():
        ref = model(ids)
        for caches in (static_caches(model, 1, 8), None, concat_caches(model), static_caches(model, 1, 8)):
            model.set_kv_caches(caches)
            what = "no cache" if caches is None else type(caches[0]).__name__
            assert_rel_close(model(ids, input_pos=torch.arange(6)), ref, TOL, f"after switching to {what}")
        model.set_kv_caches(None)
        assert all(layer.self_attn.kv_cache is None for layer in model.layers)


# ---- StaticKVCache.update -------------------------------------------------------------------------
H, S, D = 3, 8, 4  # n_kv_head, max_seq_len, head_dim (H != T so a transposed write cannot line up)


def _kv(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g) + 1.0, torch.randn(B, H, T, D, generator=g) - 1.0


def test_static_update_writes_exactly_at_positions():
    cache = StaticKVCache(B, H, S, D, torch.float32)
    ptr_k, ptr_v = cache.k.data_ptr(), cache.v.data_ptr()
    k, v = _kv(2, seed=1)
    k_all, v_all = cache.update(torch.tensor([3, 4]), k, v)
    assert k_all.shape == v_all.shape == (B, H, S, D), f"returned {tuple(k_all.shape)}, want the full buffer"
    assert k_all is cache.k and v_all is cache.v, "update must return the cache's own buffers"
    assert cache.k.data_ptr() == ptr_k and cache.v.data_ptr() == ptr_v, "update reallocated the buffers"
    assert torch.equal(k_all[:, :, 3:5], k), f"K at 3..4 off by {(k_all[:, :, 3:5] - k).abs().max():.3e}"
    assert torch.equal(v_all[:, :, 3:5], v), f"V at 3..4 off by {(v_all[:, :, 3:5] - v).abs().max():.3e}"
    others = [p for p in range(S) if p not in (3, 4)]
    assert k_all[:, :, others].abs().max() == 0 and v_all[:, :, others].abs().max() == 0, \
        "positions other than 3, 4 were written"


def test_static_update_per_sequence_positions():
    cache = StaticKVCache(B, H, S, D, torch.float32)
    k, v = _kv(1, seed=2)
    k_all, v_all = cache.update(torch.tensor([[2], [5]]), k, v)  # sequence 0 at 2, sequence 1 at 5
    assert k_all.shape == (B, H, S, D)
    assert torch.equal(k_all[0, :, 2], k[0, :, 0]) and torch.equal(v_all[0, :, 2], v[0, :, 0]), "sequence 0 at 2"
    assert torch.equal(k_all[1, :, 5], k[1, :, 0]) and torch.equal(v_all[1, :, 5], v[1, :, 0]), "sequence 1 at 5"
    expect = torch.zeros(B, S, dtype=torch.bool)
    expect[0, 2] = expect[1, 5] = True
    for name, buf in (("K", k_all), ("V", v_all)):
        written = buf.abs().amax(dim=(1, 3)) > 0  # (B, S)
        assert torch.equal(written, expect), f"{name} written at {written.nonzero().tolist()}, want [[0, 2], [1, 5]]"

    # several tokens per sequence at its own positions
    cache = StaticKVCache(B, H, S, D, torch.float32)
    k, v = _kv(2, seed=3)
    pos = torch.tensor([[0, 1], [4, 6]])
    k_all, v_all = cache.update(pos, k, v)
    for b in range(B):
        for t in range(2):
            p = int(pos[b, t])
            assert torch.equal(k_all[b, :, p], k[b, :, t]), f"K of sequence {b}, token {t} not at {p}"
            assert torch.equal(v_all[b, :, p], v[b, :, t]), f"V of sequence {b}, token {t} not at {p}"
    assert int((k_all.abs().amax(dim=(1, 3)) > 0).sum()) == 4, "positions beyond the four were written"


def test_static_reset_zeroes_in_place():
    cache = StaticKVCache(B, H, S, D, torch.float32)
    cache.update(torch.arange(S), *_kv(S, seed=4))
    assert cache.k.abs().min() > 0, "precondition: every position written"
    ptr = cache.k.data_ptr()
    cache.reset()
    assert cache.k.abs().max() == 0 and cache.v.abs().max() == 0, "reset left non-zero entries"
    assert cache.k.data_ptr() == ptr, "reset reallocated the buffer (a captured CUDA graph would lose it)"
    assert cache.max_seq_len == S


# ---- ConcatKVCache ----------------------------------------------------------------------------------
def test_concat_grows_and_refuses_out_of_order():
    cache = ConcatKVCache()
    with pytest.raises(ValueError):
        cache.update(torch.tensor([1]), *_kv(1, seed=5))  # must start at 0
    sizes, start = [], 0
    parts = []
    for T, seed in ((3, 6), (1, 7), (2, 8)):
        k, v = _kv(T, seed)
        parts.append(k)
        k_all, v_all = cache.update(torch.arange(start, start + T), k, v)
        start += T
        sizes.append(k_all.shape[2])
        assert v_all.shape == k_all.shape == (B, H, start, D), f"after {start} positions: {tuple(k_all.shape)}"
    assert sizes == [3, 4, 6], f"cache lengths {sizes}, want [3, 4, 6]"
    assert torch.equal(cache.k, torch.cat(parts, dim=2)), "concatenated keys out of order"
    for bad in (start + 1, start - 1, 0):
        with pytest.raises(ValueError):
            cache.update(torch.tensor([bad]), *_kv(1, seed=9))
    assert cache.k.shape[2] == 6, "a refused update changed the cache"
    cache.reset()
    assert cache.k is None and cache.v is None
    cache.update(torch.tensor([0]), *_kv(1, seed=10))  # accepted again from 0
    assert cache.k.shape[2] == 1


# ---- static_caches: limits, layout and size --------------------------------------------------------
def test_static_caches_layout_and_limit(tiny_decoder):
    model = tiny_decoder("llama-mha-untied")
    c = model.cfg
    caches = static_caches(model, 3, 20)
    assert len(caches) == c.n_layer
    for cache in caches:
        assert cache.k.shape == cache.v.shape == (3, c.n_kv_head, 20, c.head_dim), tuple(cache.k.shape)
        assert cache.k.dtype == model.dtype and cache.k.device == model.device
    assert len({cache.k.data_ptr() for cache in caches}) == c.n_layer, "layers share a cache buffer"
    half = static_caches(model, 1, 4, dtype=torch.float16)
    assert half[0].k.dtype == torch.float16
    assert len(static_caches(model, 1, c.max_seq_len)) == c.n_layer  # the full context is allowed
    with pytest.raises(ValueError, match="exceeds"):
        static_caches(model, 1, c.max_seq_len + 1)


def _cache_bytes(caches):
    return sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v))


@pytest.mark.parametrize("dtype,dtype_bytes", [(torch.float32, 4), (torch.float16, 2)])
def test_static_cache_bytes_match_roofline(embedded, dtype, dtype_bytes):
    hf = embedded[0]
    model = Decoder.from_hf(hf)
    c = model.cfg
    seq, batch = 64, 2
    with pytest.raises(ValueError):
        static_caches(model, 1, c.max_seq_len + 1)
    caches = static_caches(model, batch, seq, dtype=dtype)
    got = _cache_bytes(caches)
    cfg = {"num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
           "head_dim": c.head_dim, "hidden_size": c.hidden_size}
    want = roofline.kv_cache_bytes(cfg, seq, batch=batch, dtype_bytes=dtype_bytes)
    assert got == want, f"static caches hold {got} bytes, roofline.kv_cache_bytes says {want}"
    assert roofline.kv_cache_bytes(hf.config.to_dict(), seq, batch=batch, dtype_bytes=dtype_bytes) == want, \
        "the HF config dict gives another size than the decoder's config"
    assert got == 2 * c.n_layer * c.n_kv_head * c.head_dim * seq * batch * dtype_bytes

