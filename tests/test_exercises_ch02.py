"""Notebook 02's exercises: plausible wrong answers fail, naming the case that shows the mistake."""
from __future__ import annotations

import pytest
import torch

from labutils.exercises import EXERCISES
from conftest import assert_fails_naming_the_case


def test_notebook_02_exercises_are_registered():
    assert {"static_cache_write", "kv_cache_size_bytes", "decode_tok_s_memory_bound"} <= set(EXERCISES)


# ---- static_cache_write ---------------------------------------------------------------------------------------------
def _prefix_off_by_one(cache, input_pos, new):
    out = cache.clone()
    out[:, :, input_pos] = new
    return out[:, :, : int(input_pos.max())]


def _appends_at_the_start(cache, input_pos, new):  # ignores input_pos: writes at 0..T-1
    out = cache.clone()
    out[:, :, : new.shape[2]] = new
    return out[:, :, : int(input_pos.max()) + 1]


def _whole_buffer(cache, input_pos, new):  # right write, but returns every slot
    out = cache.clone()
    out[:, :, input_pos] = new
    return out


def _forgets_the_past(cache, input_pos, new):  # a fresh zero cache each step
    out = torch.zeros_like(cache)
    out[:, :, input_pos] = new
    return out[:, :, : int(input_pos.max()) + 1]


def _prefix_to_the_old_end(cache, input_pos, new):  # valid = everything non-zero, stale slots included
    out = cache.clone()
    out[:, :, input_pos] = new
    used = int((out.abs().amax(dim=(0, 1, 3)) > 0).nonzero().max()) + 1
    return out[:, :, :used]


def _in_place(cache, input_pos, new):
    cache[:, :, input_pos] = new
    return cache[:, :, : int(input_pos.max()) + 1]


# ---- kv_cache_size_bytes ---------------------------------------------------------------------------------------------
def _mha_size(n_layer, n_head, n_kv_head, hidden_size, context, batch, dtype_bytes):  # n_head where n_kv_head belongs
    return 2 * n_layer * hidden_size * context * batch * dtype_bytes


def _keys_only(n_layer, n_head, n_kv_head, hidden_size, context, batch, dtype_bytes):
    return n_layer * n_kv_head * (hidden_size // n_head) * context * batch * dtype_bytes


def _per_sequence(n_layer, n_head, n_kv_head, hidden_size, context, batch, dtype_bytes):
    return 2 * n_layer * n_kv_head * (hidden_size // n_head) * context * dtype_bytes


# ---- decode_tok_s_memory_bound ---------------------------------------------------------------------------------------
def _weights_only(weight_bytes, kv_bytes_per_token, batch, context, bandwidth_gbps):
    return batch * bandwidth_gbps * 1e9 / weight_bytes


def _per_sequence_rate(weight_bytes, kv_bytes_per_token, batch, context, bandwidth_gbps):
    return bandwidth_gbps * 1e9 / (weight_bytes + batch * context * kv_bytes_per_token)


def _one_cache_for_all(weight_bytes, kv_bytes_per_token, batch, context, bandwidth_gbps):
    return batch * bandwidth_gbps * 1e9 / (weight_bytes + context * kv_bytes_per_token)


def _gibibytes(weight_bytes, kv_bytes_per_token, batch, context, bandwidth_gbps):
    return batch * bandwidth_gbps * 2**30 / (weight_bytes + batch * context * kv_bytes_per_token)


WRONG = [
    ("static_cache_write", _prefix_off_by_one, "prefill: 5 positions", "shape mismatch: got (2, 3, 4, 4), expected (2, 3, 5, 4)"),
    ("static_cache_write", _appends_at_the_start, "one decode step at position 7", "elements differ"),
    ("static_cache_write", _whole_buffer, "prefill: 5 positions", "shape mismatch: got (2, 3, 12, 4)"),
    ("static_cache_write", _forgets_the_past, "one decode step at position 7", "elements differ"),
    ("static_cache_write", _prefix_to_the_old_end, "rewrite 3..4 with stale entries beyond", "shape mismatch"),
    ("static_cache_write", _in_place, "prefill: 5 positions", "changed its inputs in place"),
    ("kv_cache_size_bytes", _mha_size, "GQA: Qwen2.5-7B", "got 1.3153337e+10, expected 1.8790482e+09"),
    ("kv_cache_size_bytes", _keys_only, "multi-head attention", "got 1.0737418e+09, expected 2.1474836e+09"),
    ("kv_cache_size_bytes", _per_sequence, "multi-query attention (1 KV head), batch 8", "expected"),
    ("decode_tok_s_memory_bound", _weights_only, "batch 1, 32k tokens of cache", "got 212.01413, expected 187.16021"),
    ("decode_tok_s_memory_bound", _per_sequence_rate, "batch 64", "expected"),
    ("decode_tok_s_memory_bound", _one_cache_for_all, "batch 64", "expected"),
    ("decode_tok_s_memory_bound", _gibibytes, "batch 1, empty cache", "expected 212.0"),
]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


def test_static_cache_write_matches_the_package_cache():
    """The reference is the package's StaticKVCache.update, cut to the written prefix."""
    from labutils.kv_cache import StaticKVCache

    ref = EXERCISES["static_cache_write"].reference
    for c in EXERCISES["static_cache_write"].cases(torch.Generator().manual_seed(1)):
        cache, pos, new = c.args
        B, H, S, D = cache.shape
        pkg = StaticKVCache(B, H, S, D, cache.dtype)
        pkg.k.copy_(cache)
        pkg.v.copy_(cache)
        k_all, _ = pkg.update(pos, new, new)
        assert torch.equal(ref(cache, pos, new), k_all[:, :, : int(pos.max()) + 1]), c.label


def test_size_and_bound_agree_with_roofline():
    """The references give the package's roofline numbers for the Qwen2.5-7B configuration."""
    from labutils import configs, roofline

    cfg = configs.arch("Qwen2.5-7B")
    size = EXERCISES["kv_cache_size_bytes"].reference
    got = size(cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
               cfg["hidden_size"], 1000, 3, 2)
    assert got == roofline.kv_cache_bytes(cfg, 1000, batch=3, dtype_bytes=2)
    step = roofline.decode_step(cfg, 8, 500, 2)
    weights = roofline.decode_step(cfg, 1, 0, 2)["bytes"]
    bound = EXERCISES["decode_tok_s_memory_bound"].reference(weights, roofline.kv_bytes_per_token(cfg, 2), 8, 500, 3000.0)
    assert bound == pytest.approx(8 * 3000e9 / step["bytes"], rel=1e-12)
