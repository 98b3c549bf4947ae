"""The lab decoder against Hugging Face transformers: logits, greedy tokens and the three seams."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import TINY_FAMILIES, assert_rel_close, assert_same_tokens, rel_err, tiny_config, tiny_hf_model
from labutils.decoder import Decoder, DecoderConfig
from labutils.generate import encode_prompt, greedy_no_cache

TOL = 1e-4
N_NEW = 32
PROMPT = "Explain in one paragraph why the sky is blue."
BACKENDS = ["sdpa", "naive"]


def hf_greedy(hf_model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy decoding of exactly n tokens: (B, T + n)."""
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False,
                            pad_token_id=hf_model.config.pad_token_id)
    assert out.shape == (ids.shape[0], ids.shape[1] + n), f"HF generated {out.shape[1] - ids.shape[1]} tokens, not {n}"
    return out



# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(embedded):
    return embedded[0]


@pytest.fixture(scope="module")
def prompt_ids(embedded):
    ids = encode_prompt(embedded[1], PROMPT, chat=True)
    assert ids.shape[0] == 1 and ids.shape[1] > 5
    return ids


@pytest.fixture(scope="module")
def random_ids(hf):
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, hf.config.vocab_size, (2, 12), generator=gen)


@pytest.fixture(scope="module")
def hf_prompt_tokens(hf, prompt_ids):
    return hf_greedy(hf, prompt_ids, N_NEW)


@pytest.fixture(scope="module")
def hf_random_tokens(hf, random_ids):
    return hf_greedy(hf, random_ids, N_NEW)


@pytest.fixture(scope="module")
def tiny_models():
    """Built lazily, once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_hf_model(family, seed=0)
        return cache[family]
    return get


# ---- (a) logits of the embedded model ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_logits_prompt(hf, prompt_ids, backend):
    model = Decoder.from_hf(hf, attention=backend)
    with torch.no_grad():
        ref = hf(prompt_ids).logits
        out = model(prompt_ids)
    assert_rel_close(out, ref, TOL, f"embedded model, real prompt, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_logits_random_batch(hf, random_ids, backend):
    model = Decoder.from_hf(hf, attention=backend)
    with torch.no_grad():
        ref = hf(random_ids, attention_mask=torch.ones_like(random_ids)).logits
        out = model(random_ids)
        last = model(random_ids, last_only=True)
    assert_rel_close(out, ref, TOL, f"embedded model, random batch of 2, {backend}")
    assert last.shape == (2, 1, hf.config.vocab_size)
    assert_rel_close(last, ref[:, -1:], TOL, f"last_only, {backend}")


def test_decoder_shares_hf_storage(hf):
    model = Decoder.from_hf(hf)
    assert model.layers[0].self_attn.q_proj.weight.data_ptr() == \
        hf.model.layers[0].self_attn.q_proj.weight.data_ptr(), "from_hf copied the weights"
    assert model.lm_head.weight is model.embed_tokens.weight, "tied embeddings are not tied"


# ---- (b) greedy tokens of the embedded model ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_greedy_prompt(hf, embedded, prompt_ids, hf_prompt_tokens, backend):
    model = Decoder.from_hf(hf, attention=backend)
    lab = greedy_no_cache(model, prompt_ids, N_NEW)
    eos = embedded[1].eos_token_id
    assert eos not in lab[0, prompt_ids.shape[1]:].tolist(), \
        "precondition: the lab output holds EOS, which HF's min_new_tokens suppresses; pick another prompt"
    assert_same_tokens(lab, hf_prompt_tokens, prompt_ids.shape[1], f"embedded greedy, real prompt, {backend}")


def test_embedded_greedy_random_batch(hf, random_ids, hf_random_tokens):
    model = Decoder.from_hf(hf, attention="sdpa")
    lab = greedy_no_cache(model, random_ids, N_NEW)
    assert_same_tokens(lab, hf_random_tokens, random_ids.shape[1], "embedded greedy, random batch of 2")


# ---- (c) every tiny random family ---------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_logits_and_greedy(tiny_models, family):
    hf_model = tiny_models(family)
    model = Decoder.from_hf(hf_model)
    cfg = hf_model.config
    assert model.cfg.n_kv_head == cfg.num_key_value_heads and model.cfg.tie_embeddings == cfg.tie_word_embeddings
    ids = torch.randint(1, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf_model(ids, attention_mask=torch.ones_like(ids)).logits
        for backend in BACKENDS:
            assert_rel_close(model.set_attention(backend)(ids), ref, TOL, f"{family}, {backend}")
    model.set_attention("sdpa")
    lab = greedy_no_cache(model, ids, N_NEW)
    assert_same_tokens(lab, hf_greedy(hf_model, ids, N_NEW), ids.shape[1], f"{family} greedy")


# ---- (d) per-sequence positions -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_positions(tiny_models, backend):
    model = Decoder.from_hf(tiny_models("qwen2-gqa-tied"), attention=backend)
    B, T = 3, 9
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T).expand(B, T).contiguous()
    with torch.no_grad():
        ref = model(ids)
        out = model(ids, input_pos=pos)
        out_1d = model(ids, input_pos=torch.arange(T))
    assert_rel_close(out, ref, TOL, f"(B, T) input_pos vs default, {backend}")
    assert_rel_close(out_1d, ref, TOL, f"(T,) input_pos vs default, {backend}")


def test_embedded_per_sequence_positions(hf, random_ids):
    model = Decoder.from_hf(hf)
    B, T = random_ids.shape
    with torch.no_grad():
        assert_rel_close(model(random_ids, input_pos=torch.arange(T).expand(B, T)), model(random_ids), TOL,
                         "embedded, (B, T) input_pos")


# ---- (e) the KV-cache seam ------------------------------------------------------------------------------
class ConcatCache:
    """Test-only KV cache: appends the new K/V along the sequence axis and returns everything so far."""

    def __init__(self):
        self.k = self.v = None
        self.positions = []

    def update(self, input_pos, k, v):
        assert k.dim() == 4 and k.shape == v.shape, f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        n_before = 0 if self.k is None else self.k.shape[2]
        first = int(input_pos.reshape(-1, input_pos.shape[-1])[0, 0])
        assert first == n_before, f"cache holds {n_before} positions, new tokens start at {first}"
        self.positions.append(input_pos.clone())
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@pytest.mark.parametrize("pos_shape", ["(T,)", "(B,T)"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama-gqa-tied", "qwen2-mha-untied"])
def test_kv_cache_seam(tiny_models, family, backend, pos_shape):
    hf_model = tiny_models(family)
    model = Decoder.from_hf(hf_model, attention=backend)
    n_layer, n_kv, hd = model.cfg.n_layer, model.cfg.n_kv_head, model.cfg.head_dim
    B, P, N = 2, 6, 8  # prompt of P tokens, a chunk of 3, then one token at a time
    ids = torch.randint(0, model.cfg.vocab_size, (B, P + 3 + N), generator=torch.Generator().manual_seed(5))

    def positions(start, stop):
        p = torch.arange(start, stop)
        return p if pos_shape == "(T,)" else p.expand(B, stop - start).contiguous()

    with torch.no_grad():
        full = model(ids)  # (B, S, vocab), no cache
        caches = [ConcatCache() for _ in range(n_layer)]
        model.set_kv_caches(caches)
        pieces = [model(ids[:, :P], input_pos=positions(0, P)),
                  model(ids[:, P:P + 3], input_pos=positions(P, P + 3))]  # a chunk over a non-empty cache
        for pos in range(P + 3, ids.shape[1]):
            step_pos = torch.tensor([pos]) if pos_shape == "(T,)" else torch.full((B, 1), pos)
            pieces.append(model(ids[:, pos:pos + 1], input_pos=step_pos))
        cached = torch.cat(pieces, dim=1)
        assert caches[0].k.shape == (B, n_kv, ids.shape[1], hd), f"cache K shape {tuple(caches[0].k.shape)}"
        assert all(c.k is not None for c in caches), "some layer never used its cache"
        assert_rel_close(cached, full, TOL, f"{family}, {backend}, KV cache vs full forward")

        model.set_kv_caches(None)
        assert all(layer.self_attn.kv_cache is None for layer in model.layers)
        again = model(ids)
        assert_rel_close(again, full, 0.0, "after set_kv_caches(None)")


def test_kv_cache_seam_embedded(hf, prompt_ids):
    model = Decoder.from_hf(hf)
    ids = prompt_ids[:, :24]
    P = 16
    with torch.no_grad():
        full = model(ids)
        model.set_kv_caches([ConcatCache() for _ in range(model.cfg.n_layer)])
        pieces = [model(ids[:, :P], input_pos=torch.arange(P))]
        for pos in range(P, ids.shape[1]):
            pieces.append(model(ids[:, pos:pos + 1], input_pos=torch.tensor([pos])))
        model.set_kv_caches(None)
    assert_rel_close(torch.cat(pieces, 1), full, TOL, "embedded, KV cache vs full forward")


def test_kv_cache_wrong_length(tiny_models):
    model = Decoder.from_hf(tiny_models("llama-gqa-tied"))
    n = model.cfg.n_layer
    for wrong in (n - 1, n + 1, 0):
        with pytest.raises(ValueError):
            model.set_kv_caches([ConcatCache() for _ in range(wrong)])
    assert all(layer.self_attn.kv_cache is None for layer in model.layers), "a failed call left caches set"


# ---- (f) the linear seam --------------------------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self, name, inner):
        super().__init__()
        self.name, self.inner, self.calls = name, inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _check_swap(model, ids):
    with torch.no_grad():
        ref = model(ids)
    wrapped = {}

    def make(name, linear):
        assert isinstance(linear, nn.Linear), f"{name} is a {type(linear).__name__}"
        wrapped[name] = Counting(name, linear)
        return wrapped[name]

    assert model.swap_linears(make) is model
    expected = {f"layers.{i}.{p}" for i in range(model.cfg.n_layer) for p in PROJ}
    if not model.cfg.tie_embeddings:
        expected.add("lm_head")
    assert set(wrapped) == expected, (f"wrapped {len(wrapped)} (expected {len(expected)}): missing "
                                      f"{sorted(expected - set(wrapped))}, extra {sorted(set(wrapped) - expected)}")
    assert len(expected) == 7 * model.cfg.n_layer + (0 if model.cfg.tie_embeddings else 1)
    for name, w in wrapped.items():
        assert model.get_submodule(name) is w, f"{name} was not put in place"
    with torch.no_grad():
        out = model(ids)
    assert_rel_close(out, ref, 0.0, "logits after swap_linears with a delegating wrapper")
    uncalled = [n for n, w in wrapped.items() if w.calls != 1]
    assert not uncalled, f"wrappers not called exactly once per forward: {uncalled[:5]}"


def test_swap_linears_embedded_tied(hf, random_ids):
    _check_swap(Decoder.from_hf(hf), random_ids)


@pytest.mark.parametrize("family", ["llama-mha-untied", "qwen2-gqa-tied", "mistral-gqa-untied"])
def test_swap_linears_tiny(tiny_models, family):
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    _check_swap(Decoder.from_hf(tiny_models(family)), ids)


# ---- (g) errors -------------------------------------------------------------------------------------------
def test_unknown_attention_backend(tiny_models):
    model = Decoder.from_hf(tiny_models("llama-gqa-tied"))
    with pytest.raises(ValueError, match="nope"):
        model.set_attention("nope")
    with pytest.raises(ValueError):
        Decoder.from_hf(tiny_models("llama-gqa-tied"), attention="nope")


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}


@pytest.mark.parametrize("how", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_not_implemented(how):
    import transformers

    fields = {how: dict(LLAMA3_ROPE, rope_theta=500000.0) if how == "rope_parameters" else dict(LLAMA3_ROPE)}
    config = tiny_config("llama-gqa-tied", **fields)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert config.rope_parameters["rope_type"] == "llama3", config.rope_parameters
    with pytest.raises(NotImplementedError, match="llama3"):
        DecoderConfig.from_hf(config)


def test_plain_rope_config_accepted():
    config = tiny_config("llama-gqa-tied", rope_theta=12345.0)
    cfg = DecoderConfig.from_hf(config)
    assert cfg.rope_theta == 12345.0, f"rope_theta read as {cfg.rope_theta}"
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (4, 2, 16)


@pytest.mark.parametrize("family,fields", [
    ("mistral-gqa-untied", dict(sliding_window=4)),
    ("qwen2-gqa-tied", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
], ids=["mistral", "qwen2"])
def test_sliding_window_refused_or_exact(family, fields):
    """An unsupported feature must raise, never give different logits: refuse it or implement it."""
    hf_model = tiny_hf_model(family, seed=1, **fields)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(8))  # longer than the window
    try:
        model = Decoder.from_hf(hf_model)
    except NotImplementedError:
        return
    with torch.no_grad():
        assert_rel_close(model(ids), hf_model(ids).logits, TOL, f"{family} with sliding window 4 over 12 tokens")


def test_gelu_not_implemented():
    with pytest.raises(NotImplementedError, match="gelu"):
        DecoderConfig.from_hf(tiny_config("llama-gqa-tied", hidden_act="gelu"))


def test_mlp_bias_not_implemented():
    with pytest.raises(NotImplementedError):
        DecoderConfig.from_hf(tiny_config("llama-gqa-tied", mlp_bias=True))


def test_rel_err_helper_detects_difference():
    a = torch.ones(3, dtype=torch.float64)
    assert rel_err(a, a) == 0.0
    assert rel_err(a + 1e-3, a) == pytest.approx(1e-3, rel=1e-9)
    with pytest.raises(AssertionError, match=r"max\|diff\|"):
        assert_rel_close(a * (1 + 2 * TOL), a, TOL, "deliberately off")
