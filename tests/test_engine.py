"""DecodeEngine (labutils.engine) against greedy decoding without a cache, and
Decoder.fuse_projections against the unfused decoder."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import TINY_FAMILIES, assert_rel_close, assert_same_tokens, tiny_hf_model
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.generate import encode_prompt, greedy_no_cache
from labutils.kv_cache import static_caches

N_NEW = 24
PROMPT = "Name three primary colors and one use for each."
FUSE_TOL = 1e-5



# ---- the embedded model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(embedded):
    return embedded[0]


@pytest.fixture(scope="module")
def reference(hf):
    """A decoder that never gets a cache: greedy_no_cache runs on it."""
    return Decoder.from_hf(hf)


@pytest.fixture(scope="module")
def engine1(hf):
    """A batch-1 eager engine on its own decoder (from_hf shares the HF weights, nothing is copied)."""
    return DecodeEngine(Decoder.from_hf(hf), batch=1, max_seq_len=80, mode="eager")


@pytest.fixture(scope="module")
def prompt_ids(embedded):
    ids = encode_prompt(embedded[1], PROMPT, chat=True)
    assert ids.shape[0] == 1 and 10 < ids.shape[1] <= 80 - N_NEW, f"prompt of {ids.shape[1]} tokens"
    return ids


def test_engine_generate_equals_greedy_no_cache(engine1, reference, prompt_ids):
    ref = greedy_no_cache(reference, prompt_ids, N_NEW)
    out = engine1.generate(prompt_ids, N_NEW)
    assert_same_tokens(out, ref, prompt_ids.shape[1], "embedded model, chat prompt, eager engine")


def test_engine_second_generate_resets(engine1, reference, prompt_ids, hf):
    engine1.generate(prompt_ids, N_NEW)  # leaves the cache filled up to prompt + N_NEW
    ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(17))
    first = engine1.prefill(ids)
    for i, cache in enumerate(engine1.caches):
        assert cache.k[:, :, ids.shape[1]:].abs().max() == 0 and cache.v[:, :, ids.shape[1]:].abs().max() == 0, \
            f"layer {i}: positions past the new prompt still hold the previous generation"
    assert int(engine1.pos) == ids.shape[1], f"position after prefill is {int(engine1.pos)}, not {ids.shape[1]}"
    out = engine1.generate(ids, 12)
    ref = greedy_no_cache(reference, ids, 12)
    assert torch.equal(first, ref[:, 9:10]), f"prefill's token {first.tolist()} vs {ref[:, 9].tolist()}"
    assert_same_tokens(out, ref, ids.shape[1], "second generate with a shorter prompt")
    again = engine1.generate(prompt_ids, 8)  # and back to the first prompt
    assert_same_tokens(again, greedy_no_cache(reference, prompt_ids, 8), prompt_ids.shape[1], "third generate")


def test_engine_batch_of_two(hf, reference):
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(23))
    assert not torch.equal(ids[0], ids[1])
    engine = DecodeEngine(Decoder.from_hf(hf), batch=2, max_seq_len=12 + N_NEW, mode="eager")
    out = engine.generate(ids, N_NEW)  # fills the cache exactly: positions 0 .. 12 + N_NEW - 2 written
    assert_same_tokens(out, greedy_no_cache(reference, ids, N_NEW), 12, "embedded model, batch of 2")
    with pytest.raises(ValueError, match="batch"):
        engine.prefill(ids[:1])
    with pytest.raises(ValueError, match="batch"):
        engine.generate(torch.cat([ids, ids]), 2)


# ---- engine limits and modes (tiny model) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=0))


def test_decode_past_max_seq_len(tiny):
    engine = DecodeEngine(tiny, batch=1, max_seq_len=16)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    engine.prefill(ids)
    with pytest.raises(ValueError):
        engine.decode(7)  # positions 10 .. 16: one too many
    assert int(engine.pos) == 10, "a refused decode moved the position"
    rest = engine.decode(6)  # positions 10 .. 15: exactly full
    assert rest.shape == (1, 6)
    with pytest.raises(ValueError):
        engine.decode(1)
    tiny.set_kv_caches(None)
    ref = greedy_no_cache(tiny, ids, 7)
    assert torch.equal(rest, ref[:, 11:]), f"decode up to the cache's end: {rest.tolist()} vs {ref[:, 11:].tolist()}"
    with pytest.raises(ValueError):
        DecodeEngine(tiny, batch=1, max_seq_len=tiny.cfg.max_seq_len + 1)


def test_generate_one_token(tiny):
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    out = DecodeEngine(tiny, batch=1, max_seq_len=8).generate(ids, 1)
    tiny.set_kv_caches(None)
    assert torch.equal(out, greedy_no_cache(tiny, ids, 1)), f"generate(ids, 1) gave {out.tolist()}"


def test_generate_zero_tokens(tiny):
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    out = DecodeEngine(tiny, batch=1, max_seq_len=8).generate(ids, 0)
    assert out.shape == ids.shape, f"generate(ids, 0) returned {tuple(out.shape)}, want {tuple(ids.shape)}"
    assert torch.equal(out, ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_modes_refused_on_cpu(tiny, mode):
    with pytest.raises(RuntimeError, match="GPU"):
        DecodeEngine(tiny, batch=1, max_seq_len=8, mode=mode)


def test_unknown_mode(tiny):
    with pytest.raises(ValueError, match="mode"):
        DecodeEngine(tiny, batch=1, max_seq_len=8, mode="turbo")


def test_decode_tok_s_positive(tiny):
    engine = DecodeEngine(tiny, batch=2, max_seq_len=16)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(8))
    rate = engine.decode_tok_s(ids, n=4, repeats=1)
    assert isinstance(rate, float) and math.isfinite(rate) and rate > 0, f"decode_tok_s = {rate!r}"


# ---- fuse_projections ------------------------------------------------------------------------------------
class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fuse_projections(family):
    hf_model = tiny_hf_model(family, seed=3)  # fresh: fusion mutates the decoder built on it
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(9))
    hf_weights = {k: t.clone() for k, t in hf_model.state_dict().items()}
    with torch.no_grad():
        hf_before = hf_model(ids).logits
        model = Decoder.from_hf(hf_model)
        ref = model(ids)
        assert model.fuse_projections() is model
        c = model.cfg
        for i, layer in enumerate(model.layers):
            a, m = layer.self_attn, layer.mlp
            for gone in ("q_proj", "k_proj", "v_proj"):
                assert not hasattr(a, gone), f"layer {i}: {gone} still present after fusion"
            for gone in ("gate_proj", "up_proj"):
                assert not hasattr(m, gone), f"layer {i}: {gone} still present after fusion"
            assert isinstance(a.qkv_proj, nn.Linear) and isinstance(m.gate_up_proj, nn.Linear)
            assert a.qkv_proj.weight.shape == ((c.n_head + 2 * c.n_kv_head) * c.head_dim, c.hidden_size)
            assert (a.qkv_proj.bias is not None) == c.qkv_bias, f"{family}: qkv bias {a.qkv_proj.bias is not None}"
            assert m.gate_up_proj.weight.shape == (2 * c.intermediate_size, c.hidden_size)
            assert a.o_proj.weight.data_ptr() == hf_model.model.layers[i].self_attn.o_proj.weight.data_ptr(), \
                "o_proj should still share the HF weight"
        out = model(ids)
        assert_rel_close(out, ref, FUSE_TOL, f"{family}: fused vs unfused logits")
        assert model.fuse_projections() is model  # a second call changes nothing
        assert_rel_close(model(ids), out, 0.0, f"{family}: second fuse_projections")

        hf_after = hf_model(ids).logits
        assert torch.equal(hf_after, hf_before), \
            f"{family}: HF logits changed after fusion by {(hf_after - hf_before).abs().max():.3e}"
        changed = [k for k, t in hf_model.state_dict().items() if not torch.equal(t, hf_weights[k])]
        assert not changed, f"{family}: fusion changed HF weights {changed[:4]}"

        # a cached decode step on the fused model
        model.set_kv_caches(static_caches(model, 2, 16))
        model(ids[:, :8], input_pos=torch.arange(8))
        step = model(ids[:, 8:9], input_pos=torch.tensor([8]))
        model.set_kv_caches(None)
        assert_rel_close(step, ref[:, 8:9], 1e-4, f"{family}: fused model, cached step")


@pytest.mark.parametrize("family", ["qwen2-gqa-tied", "llama-gqa-attn-bias"])
def test_swap_linears_after_fusion(family):
    hf_model = tiny_hf_model(family, seed=4)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(10))
    model = Decoder.from_hf(hf_model).fuse_projections()
    with torch.no_grad():
        ref = model(ids)
    wrapped = {}

    def make(name, linear):
        wrapped[name] = Wrap(linear)
        return wrapped[name]

    model.swap_linears(make)
    c = model.cfg
    expected = {f"layers.{i}.{p}" for i in range(c.n_layer)
                for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    if not c.tie_embeddings:
        expected.add("lm_head")
    assert set(wrapped) == expected, \
        f"wrapped: missing {sorted(expected - set(wrapped))}, extra {sorted(set(wrapped) - expected)}"
    for name, w in wrapped.items():
        assert model.get_submodule(name) is w, f"{name} not put in place"
    with torch.no_grad():
        assert_rel_close(model(ids), ref, 0.0, f"{family}: fused + delegating wrappers")


def test_engine_on_fused_model():
    hf_model = tiny_hf_model("qwen2-mha-untied", seed=5)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(12))
    ref = greedy_no_cache(Decoder.from_hf(hf_model), ids, 10)
    out = DecodeEngine(Decoder.from_hf(hf_model).fuse_projections(), batch=2, max_seq_len=16).generate(ids, 10)
    assert_same_tokens(out, ref, 6, "eager engine on the fused model vs unfused greedy")


def test_prefill_longer_than_cache_refused(tiny):
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="no room"):
        DecodeEngine(tiny, batch=1, max_seq_len=8).prefill(ids)


# ---- the HF baseline's timing and the step-cost helper ----------------------------------------------------
def test_hf_decode_tok_s_fresh_static_cache_per_call():
    """Every generate call gets an empty StaticCache: a used one holds the previous call's tokens, and
    transformers 5.17 then slices the prompt to nothing ("cannot reshape tensor of 0 elements")."""
    from labutils.engine import hf_decode_tok_s

    hf_tiny = tiny_hf_model("llama-gqa-tied", seed=0)
    seen, real_generate = [], hf_tiny.generate

    def spy(*args, **kwargs):
        cache = kwargs["past_key_values"]
        seen.append((cache, cache.get_seq_length()))  # keeps it alive: ids stay unique
        out = real_generate(*args, **kwargs)
        assert out.shape[1] == args[0].shape[1] + kwargs["max_new_tokens"], "generate did not make exactly k tokens"
        return out

    hf_tiny.generate = spy
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    rate = hf_decode_tok_s(hf_tiny, ids, n=4, repeats=2, static_cache_len=16)
    assert math.isfinite(rate) and rate > 0, f"hf_decode_tok_s = {rate!r}"
    assert len(seen) == 6, f"expected warm-up + 2 x 2 timed calls, saw {len(seen)}"
    assert len({id(c) for c, _ in seen}) == len(seen), "a StaticCache object was reused across generate calls"
    assert all(n == 0 for _, n in seen), f"caches handed to generate were not empty: {seen}"


def test_decode_step_ms(tiny):
    from labutils.generate import decode_step_ms

    DecodeEngine(tiny, batch=2, max_seq_len=16).prefill(torch.zeros(2, 3, dtype=torch.long))  # leaves caches
    for cached in (False, True):
        for n in (1, 7):
            ms = decode_step_ms(tiny, n, cached=cached, rep_ms=5)
            assert math.isfinite(ms) and ms > 0, f"decode_step_ms(n={n}, cached={cached}) = {ms!r}"
    assert all(layer.self_attn.kv_cache is None for layer in tiny.layers), "the helper left a cache attached"
    for bad in (0, tiny.cfg.max_seq_len + 1):
        with pytest.raises(ValueError, match="context"):
            decode_step_ms(tiny, bad)


def test_compile_layers_reuses_one_graph_per_shape():
    """Regional compilation on the CPU (Inductor's C++ backend): same logits as eager, and the layers
    share their compiled graphs (one per input shape, not one per layer); force_eager bypasses them."""
    from torch._dynamo.utils import counters

    from labutils.engine import compile_layers

    torch._dynamo.reset()
    counters.clear()
    hf_tiny = tiny_hf_model("qwen2-gqa-tied", seed=0)
    ref, model = Decoder.from_hf(hf_tiny), compile_layers(Decoder.from_hf(hf_tiny))
    assert len(model.layers) >= 2
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for m in (ref, model):
            m.set_kv_caches(static_caches(m, 1, 16))
        assert_rel_close(model(ids[:, :5], torch.arange(5)), ref(ids[:, :5], torch.arange(5)), 1e-5, "prefill")
        for t in (5, 6):
            pos = torch.tensor([t])
            assert_rel_close(model(ids[:, 5:6], pos), ref(ids[:, 5:6], pos), 1e-5, f"decode at {t}")
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2, f"{graphs} compiled graphs for {len(model.layers)} layers and 2 shapes"
        with torch.compiler.set_stance("force_eager"):
            model(ids[:, :3], torch.arange(3))
        assert counters["stats"]["unique_graphs"] == 2, "force_eager still compiled a new shape"
    torch._dynamo.reset()


def test_regional_needs_compile_mode(tiny):
    with pytest.raises(ValueError, match="regional"):
        DecodeEngine(tiny, batch=1, max_seq_len=8, mode="eager", regional=True)


# ---- the padded (bucketed) prefill: labutils.cuda_graphs.BucketedPrefill ---------------------------------
@pytest.mark.parametrize("bucket", [1, 8, 16, 64])
def test_padded_prefill_same_tokens(tiny, bucket):
    """Padding the prompt to a multiple of ``bucket`` tokens changes nothing: the pad tokens sit after
    every real one (the causal mask hides them) and decoding writes over them. bucket=64 with a cache
    of 48 positions exercises the fallback to the unpadded prompt."""
    g = torch.Generator().manual_seed(bucket)
    for B, T in ((1, 5), (1, 13), (2, 9)):
        ids = torch.randint(0, 128, (B, T), generator=g)
        want = DecodeEngine(tiny, batch=B, max_seq_len=48).generate(ids, 20)
        engine = DecodeEngine(tiny, batch=B, max_seq_len=48, prefill_bucket=bucket)
        got = engine.generate(ids, 20)
        assert_same_tokens(got, want, T, f"prefill_bucket={bucket}, batch {B}, prompt {T}")
        assert torch.equal(engine.generate(ids, 20), got), "a second call on the used cache differs"
        tiny.set_kv_caches(None)


def test_padded_prefill_logits_match(tiny):
    """The first token's logits from a padded prompt equal the unpadded forward's last row."""
    from labutils.cuda_graphs import BucketedPrefill

    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_h = tiny(ids, return_hidden=True)
    for full in (False, True):
        caches = static_caches(tiny, 1, 32)
        with tiny.kv_caches_attached(caches):
            out = BucketedPrefill(tiny, 32, bucket=16, full=full)(ids)
        if full:
            assert out[0].shape == ref_logits.shape and out[1].shape == ref_h.shape
            assert_rel_close(out[0], ref_logits, 1e-5, "padded prefill, every position's logits")
            assert_rel_close(out[1], ref_h, 1e-5, "padded prefill, hidden states")
        else:
            assert out.shape == (1, 1, ref_logits.shape[-1])
            assert_rel_close(out, ref_logits[:, -1:], 1e-5, "padded prefill, last position's logits")


def test_prefill_bucket_bad_input(tiny):
    for bad in (0, -4, 2.5, "64"):
        with pytest.raises((ValueError, TypeError)):
            DecodeEngine(tiny, batch=1, max_seq_len=16, prefill_bucket=bad)
