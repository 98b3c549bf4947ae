"""Bad input to the generation helpers, the decode engine, the static cache and perplexity: one clear
exception naming the argument (never a silent wrong answer, a bare IndexError or a half-written
state), 0 new tokens gives the prompt back, and an engine's caches never outlive its calls."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine, hf_decode_tok_s
from labutils.generate import decode_step_ms, greedy_cached, greedy_no_cache
from labutils.kv_cache import StaticKVCache, static_caches
from labutils.perplexity import nll, perplexity

VOCAB = 128
IDS = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
EMPTY = torch.zeros(1, 0, dtype=torch.long)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("llama-gqa-tied", seed=0)


@pytest.fixture(scope="module")
def model(hf):
    return Decoder.from_hf(hf)


def engine(model, batch=1, max_seq_len=16):
    return DecodeEngine(model, batch=batch, max_seq_len=max_seq_len)


def prefilled(model):
    e = engine(model)
    e.prefill(IDS)
    return e


class Tok:
    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


# (name, call(model, hf), exception type, message regex)
CASES = [
    # token ids: empty prompt, not 2-D, not integers, out of the vocabulary, wrong batch
    ("no_cache empty prompt", lambda m, h: greedy_no_cache(m, EMPTY, 3), ValueError, r"idx.*empty prompt.*T >= 1"),
    ("no_cache 1-D ids", lambda m, h: greedy_no_cache(m, IDS[0], 3), ValueError, r"idx.*2-D.*\(5,\).*\[None\]"),
    ("no_cache float ids", lambda m, h: greedy_no_cache(m, IDS.float(), 3), TypeError, r"idx.*integer.*float32"),
    ("no_cache list ids", lambda m, h: greedy_no_cache(m, IDS.tolist(), 3), TypeError, r"idx.*torch.Tensor.*list"),
    ("no_cache id past vocab", lambda m, h: greedy_no_cache(m, IDS + VOCAB, 3), ValueError, r"idx.*outside the vocabulary 0\.\.127"),
    ("no_cache negative count", lambda m, h: greedy_no_cache(m, IDS, -1), ValueError, r"max_new_tokens must be >= 0, got -1"),
    ("no_cache float count", lambda m, h: greedy_no_cache(m, IDS, 2.0), TypeError, r"max_new_tokens.*integer.*2\.0"),
    ("cached empty prompt", lambda m, h: greedy_cached(m, EMPTY, 3, static_caches(m, 1, 8)), ValueError, r"idx.*empty prompt"),
    ("cached 3-D ids", lambda m, h: greedy_cached(m, IDS[None], 3, static_caches(m, 1, 8)), ValueError, r"idx.*2-D.*\(1, 1, 5\)"),
    ("cached negative count", lambda m, h: greedy_cached(m, IDS, -2, static_caches(m, 1, 8)), ValueError, r"max_new_tokens must be >= 0, got -2"),
    ("cached no caches", lambda m, h: greedy_cached(m, IDS, 3, None), TypeError, r"caches must be a list of 2 KV caches"),
    ("cached wrong cache count", lambda m, h: greedy_cached(m, IDS, 3, static_caches(m, 1, 8)[:1]), ValueError, r"one cache per layer \(2\), got 1"),
    ("cached too small", lambda m, h: greedy_cached(m, IDS, 5, static_caches(m, 1, 8)), ValueError, r"needs 9 cache positions.*holds 8"),
    ("cached wrong batch", lambda m, h: greedy_cached(m, IDS, 2, static_caches(m, 2, 8)), ValueError, r"batch 2.*batch 1"),
    ("step_ms n=0", lambda m, h: decode_step_ms(m, 0), ValueError, r"context.*got n=0"),
    ("step_ms n float", lambda m, h: decode_step_ms(m, 3.5), TypeError, r"n \(the context length\).*3\.5"),
    ("step_ms rep_ms<=0", lambda m, h: decode_step_ms(m, 3, rep_ms=0), ValueError, r"rep_ms.*positive.*0"),
    # the engine
    ("engine generate empty prompt", lambda m, h: engine(m).generate(EMPTY, 3), ValueError, r"idx.*empty prompt"),
    ("engine generate 1-D ids", lambda m, h: engine(m).generate(IDS[0], 3), ValueError, r"idx.*2-D"),
    ("engine generate float ids", lambda m, h: engine(m).generate(IDS.double(), 3), TypeError, r"idx.*integer.*float64"),
    ("engine generate negative", lambda m, h: engine(m).generate(IDS, -1), ValueError, r"max_new_tokens must be >= 0, got -1"),
    ("engine generate overrun", lambda m, h: engine(m, max_seq_len=8).generate(IDS, 5), ValueError, r"max_new_tokens=5 needs 9 cache positions.*holds 8"),
    ("engine generate id past vocab", lambda m, h: engine(m).generate(IDS + VOCAB, 2), ValueError, r"outside the vocabulary"),
    ("engine prefill empty prompt", lambda m, h: engine(m).prefill(EMPTY), ValueError, r"idx.*empty prompt"),
    ("engine prefill bool ids", lambda m, h: engine(m).prefill(IDS > 3), TypeError, r"idx.*integer.*bool"),
    ("engine decode before prefill", lambda m, h: engine(m).decode(3), RuntimeError, r"call prefill\(idx\) first"),
    ("engine decode negative", lambda m, h: prefilled(m).decode(-1), ValueError, r"n must be >= 0, got -1"),
    ("engine decode float", lambda m, h: prefilled(m).decode(1.5), TypeError, r"n must be an integer.*1\.5"),
    ("engine tok_s n=0", lambda m, h: engine(m).decode_tok_s(IDS, n=0), ValueError, r"n must be >= 1, got 0"),
    ("engine tok_s repeats=0", lambda m, h: engine(m).decode_tok_s(IDS, n=2, repeats=0), ValueError, r"repeats must be >= 1, got 0"),
    ("engine tok_s empty prompt", lambda m, h: engine(m).decode_tok_s(EMPTY, n=2), ValueError, r"empty prompt"),
    ("engine tok_s overrun", lambda m, h: engine(m, max_seq_len=8).decode_tok_s(IDS, n=4), ValueError, r"needs 9 cache positions"),
    ("engine batch 0", lambda m, h: DecodeEngine(m, batch=0, max_seq_len=8), ValueError, r"batch must be >= 1, got 0"),
    ("engine max_seq_len float", lambda m, h: DecodeEngine(m, batch=1, max_seq_len=8.0), TypeError, r"max_seq_len.*integer.*8\.0"),
    ("hf tok_s empty prompt", lambda m, h: hf_decode_tok_s(h, EMPTY, n=4), ValueError, r"idx.*empty prompt"),
    ("hf tok_s n=1", lambda m, h: hf_decode_tok_s(h, IDS, n=1), ValueError, r"n must be >= 2, got 1"),
    ("hf tok_s negative n", lambda m, h: hf_decode_tok_s(h, IDS, n=-3), ValueError, r"n must be >= 2, got -3"),
    ("hf tok_s repeats=0", lambda m, h: hf_decode_tok_s(h, IDS, n=4, repeats=0), ValueError, r"repeats must be >= 1"),
    ("hf tok_s small static cache", lambda m, h: hf_decode_tok_s(h, IDS, n=4, static_cache_len=8), ValueError, r"static_cache_len=8.*>= 9"),
    ("hf tok_s 1-D ids", lambda m, h: hf_decode_tok_s(h, IDS[0], n=4), ValueError, r"idx.*2-D"),
    # the static cache
    ("static cache overrun", lambda m, h: static_caches(m, 1, 4)[0].update(
        torch.arange(3, 6), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16)), ValueError, r"input_pos 3\.\.5.*4 positions.*max_seq_len >= 6"),
    ("static cache negative pos", lambda m, h: static_caches(m, 1, 4)[0].update(
        torch.tensor([-1]), torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16)), ValueError, r"input_pos -1\.\.-1 is outside"),
    ("static cache pos shape", lambda m, h: static_caches(m, 1, 4)[0].update(
        torch.arange(2), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16)), ValueError, r"input_pos must be \(T,\).*got shape \(2,\)"),
    # perplexity
    ("nll float ids", lambda m, h: nll(m, torch.rand(10), window=4, progress=False), TypeError, r"ids.*integer.*float32"),
    ("nll 2-D ids", lambda m, h: nll(m, torch.zeros(2, 5, dtype=torch.long), window=4, progress=False), ValueError, r"one sequence.*\(2, 5\)"),
    ("perplexity stride 0", lambda m, h: perplexity(m, Tok(), "abcdefgh", window=4, stride=0, progress=False), ValueError, r"stride.*got window=4, stride=0"),
    ("perplexity max_tokens 0", lambda m, h: perplexity(m, Tok(), "abcdefgh", window=4, max_tokens=0, progress=False), ValueError, r"max_tokens.*got 0"),
    ("perplexity empty text", lambda m, h: perplexity(m, Tok(), "", window=4, progress=False), ValueError, r"nothing to score.*0 tokens"),
    ("perplexity bytes", lambda m, h: perplexity(m, Tok(), b"abc", window=4, progress=False), TypeError, r"text must be a str"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(model, hf, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(model, hf)
    assert all(layer.self_attn.kv_cache is None for layer in model.layers), "a refused call left a cache attached"


ZERO = [
    ("greedy_no_cache", lambda m: greedy_no_cache(m, IDS, 0)),
    ("greedy_cached", lambda m: greedy_cached(m, IDS, 0, static_caches(m, 1, 8))),
    ("engine.generate", lambda m: engine(m).generate(IDS, 0)),
]


@pytest.mark.parametrize("call", [z[1] for z in ZERO], ids=[z[0] for z in ZERO])
def test_zero_new_tokens_returns_the_prompt(model, call):
    out = call(model)
    assert torch.equal(out, IDS) and out is not IDS, f"0 new tokens gave {out.tolist()}"


def test_decode_zero_steps(model):
    e = prefilled(model)
    out = e.decode(0)
    assert out.shape == (1, 0) and int(e.pos) == IDS.shape[1]


def test_greedy_cached_matches_no_cache(model):
    ref = greedy_no_cache(model, IDS, 4)
    assert torch.equal(greedy_cached(model, IDS, 4, static_caches(model, 1, 8)), ref)


def test_no_cache_left_behind_by_engine(model):
    x = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    e = engine(model)
    e.generate(IDS, 6)
    assert all(layer.self_attn.kv_cache is None for layer in model.layers), "generate left its caches attached"
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after, before), f"a plain forward after generate changed by {(after - before).abs().max():.3e}"
    e.prefill(IDS)
    with torch.no_grad():
        assert torch.equal(model(x), before), "a plain forward between prefill and decode saw the engine's cache"
    assert torch.equal(e.decode(3), engine(model).generate(IDS, 4)[:, 6:]), "decode after a plain forward"
    assert perplexity(model, Tok(), "hello there, general", window=8, progress=False) > 0


def test_helpers_ignore_and_keep_someone_elses_caches(model):
    """A cache attached by someone else is neither written by the cache-free helpers nor dropped."""
    theirs = static_caches(model, 1, 16)
    ref = greedy_no_cache(model, IDS, 4)
    with model.kv_caches_attached(theirs):
        out = greedy_no_cache(model, IDS, 4)
        ppl = perplexity(model, Tok(), "hello there, general", window=8, progress=False)
        decode_step_ms(model, 4, rep_ms=1)
        cached = greedy_cached(model, IDS, 4, static_caches(model, 1, 8))
        e = engine(model)
        gen = e.generate(IDS, 4)
        assert [layer.self_attn.kv_cache for layer in model.layers] == theirs, "a helper dropped the caches"
    assert torch.equal(out, ref) and torch.equal(cached, ref) and torch.equal(gen, ref)
    assert all(c.k.abs().max() == 0 and c.v.abs().max() == 0 for c in theirs), "a helper wrote into someone else's cache"
    assert ppl == perplexity(model, Tok(), "hello there, general", window=8, progress=False)


def test_static_cache_overrun_in_a_forward(model):
    caches = static_caches(model, 1, 6)
    with model.kv_caches_attached(caches), torch.no_grad():
        model(IDS, torch.arange(5))
        with pytest.raises(ValueError, match=r"input_pos 6\.\.6 is outside this StaticKVCache's 6 positions"):
            model(IDS[:, :1], torch.tensor([6]))
    with pytest.raises(ValueError, match=r"input_pos 6\.\.8 .*max_seq_len >= 9"):
        StaticKVCache(2, 2, 8, 16, torch.float32).update(torch.tensor([[6, 7], [7, 8]]),
                                                         torch.zeros(2, 2, 2, 16), torch.zeros(2, 2, 2, 16))


def test_failed_prefill_leaves_the_engine_unready(model):
    e = prefilled(model)
    with pytest.raises(ValueError, match="empty prompt"):
        e.prefill(EMPTY)  # refused before touching anything: the previous prompt still decodes
    assert e.decode(1).shape == (1, 1)


@pytest.mark.parametrize("ids", [IDS[0], EMPTY, IDS.float()], ids=["1-D", "empty", "float"])
def test_decoder_forward_refuses_bad_ids(model, ids):
    with pytest.raises(ValueError, match=r"idx must be integer token ids \(B, T\) with T >= 1"):
        model(ids)
