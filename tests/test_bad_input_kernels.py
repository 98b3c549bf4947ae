"""Bad input fails at once with one clear exception naming the argument (issue: "Every public function
fails clearly on bad input, and leaves no state behind"): raw quantized ops, the quantizers at extreme
magnitudes, the activation quantizers, the attention reference, and the embedded GGUF / cache checks."""
from __future__ import annotations

import math
import os

import pytest
import torch

import labutils.actquant as A
import labutils.attention as att
import labutils.models as models
import labutils.quant as Q

N, K, G = 16, 64, 32


def _w(scale=0.02, n=N, k=K, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


_i8 = Q.quantize_int8(_w())
_i4 = Q.quantize_int4(_w(), group_size=G)
_nf = Q.quantize_nf4(_w(), block_size=G)
_x = torch.randn(2, K)
_xq, _xs = A.quant_rows(torch.randn(3, K))
_qkv = [torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)]
_pos = torch.arange(5)

w8 = torch.ops.labutils.w8a16_linear
w4 = torch.ops.labutils.w4a16_linear

CASES = [
    # raw INT8 op
    ("w8 int x", w8, (_x.to(torch.int32), _i8.q, _i8.scale), TypeError, r"x must be a floating-point.*int32"),
    ("w8 short scale", w8, (_x, _i8.q, _i8.scale[:-1]), ValueError, r"scale must have shape \(16,\).*\(15,\)"),
    ("w8 2-D scale", w8, (_x, _i8.q, _i8.scale[:, None]), ValueError, r"scale must have shape \(16,\)"),
    ("w8 int scale", w8, (_x, _i8.q, _i8.scale.to(torch.int32)), TypeError, r"scale must be floating"),
    ("w8 bias", w8, (_x, _i8.q, _i8.scale, torch.zeros(3)), ValueError, r"bias must have shape \(16,\)"),
    ("w8 q dtype", w8, (_x, _i8.q.float(), _i8.scale), ValueError, r"q must be int8"),
    ("w8 features", w8, (torch.randn(2, 32), _i8.q, _i8.scale), ValueError, r"x has 32 features.*64"),
    # raw 4-bit op (INT4 and NF4)
    ("w4 int x", w4, (_x.long(), _i4.packed, _i4.scale, _i4.zero, None, None, None, G), TypeError,
     r"x must be a floating-point.*int64"),
    ("w4 short scale", w4, (_x, _i4.packed, _i4.scale[:, :1], _i4.zero, None, None, None, G), ValueError,
     r"scale must have shape \(N, ceil\(K/group_size\)\) = \(16, 2\).*\(16, 1\)"),
    ("w4 group mismatch", w4, (_x, _i4.packed, _i4.scale, _i4.zero, None, None, None, 16), ValueError,
     r"scale must have shape .*\(16, 4\)"),
    ("w4 short zero", w4, (_x, _i4.packed, _i4.scale, _i4.zero[:8], None, None, None, G), ValueError,
     r"zero must be uint8 \(zero points\) or floating point \(offsets\) of shape \(16, 2\)"),
    ("w4 zero dtype", w4, (_x, _i4.packed, _i4.scale, _i4.zero.to(torch.int32), None, None, None, G), ValueError,
     r"zero must be uint8 \(zero points\) or floating point"),
    ("w4 nf4 no code", w4, (_x, _nf.packed, _nf.absmax, None, None, None, None, G), ValueError,
     r"needs code"),
    ("w4 nf4 short code", w4, (_x, _nf.packed, _nf.absmax, None, Q.NF4_CODE[:8], None, None, G), ValueError,
     r"needs code"),
    ("w4 in_scale", w4, (_x, _i4.packed, _i4.scale, _i4.zero, None, torch.ones(K - 1), None, G), ValueError,
     r"in_scale must have shape \(64,\)"),
    ("w4 bias", w4, (_x, _i4.packed, _i4.scale, _i4.zero, None, None, torch.ones(N + 1), G), ValueError,
     r"bias must have shape \(16,\)"),
    ("w4 packed dtype", w4, (_x, _i4.packed.to(torch.int8), _i4.scale, _i4.zero, None, None, None, G), ValueError,
     r"packed must be uint8"),
    ("w4 group 0", w4, (_x, _i4.packed, _i4.scale, _i4.zero, None, None, None, 0), ValueError, r"group_size"),
    # quantizers
    ("int8 int W", Q.quantize_int8, (torch.ones(4, 8, dtype=torch.int32),), TypeError, r"floating-point.*int32"),
    ("int8 1-D", Q.quantize_int8, (torch.ones(8),), ValueError, r"\(N, K\)"),
    ("int8 nan", Q.quantize_int8, (torch.full((2, 8), float("nan")),), ValueError, r"non-finite"),
    ("int8 huge fp16 scale", Q.quantize_int8, (torch.full((2, 8), 1e9),), ValueError,
     r"does not fit scale_dtype=torch.float16.*float32"),
    ("int4 huge fp16 scale", Q.quantize_int4, (torch.full((2, 64), -1e8),), ValueError, r"scale_dtype=torch.float32"),
    ("nf4 huge fp16 scale", Q.quantize_nf4, (torch.full((2, 64), 1e6),), ValueError, r"does not fit"),
    ("int8 tiny fp16 scale", Q.quantize_int8, (torch.full((2, 8), 1e-9),), ValueError,
     r"underflows scale_dtype=torch.float16.*every code would round to zero"),
    ("nf4 tiny fp16 scale", Q.quantize_nf4, (torch.full((2, 64), 1e-9),), ValueError, r"underflows"),
    ("bad scale dtype", lambda: Q.quantize_int8(_w(), scale_dtype=torch.int8), (), ValueError, r"scale_dtype must be"),
    ("awq X", Q.awq_search, (_w(), torch.randn(8, K - 1), torch.ones(K)), ValueError, r"X must be .*\(rows, 64\)"),
    ("awq act_mean", Q.awq_search, (_w(), torch.randn(8, K), torch.ones(3)), ValueError, r"act_mean must have shape \(64,\)"),
    ("awq n_grid", lambda: Q.awq_search(_w(), torch.randn(8, K), torch.ones(K), n_grid=0), (), ValueError, r"n_grid"),
    ("awq fmt", Q.awq_search, (_w(), torch.randn(8, K), torch.ones(K), "int8"), ValueError, r"4-bit formats"),
    # activation quantization
    ("quant_rows int x", A.quant_rows, (torch.ones(2, 8, dtype=torch.int32),), TypeError, r"x must be floating.*int32"),
    ("quant_rows dtype", A.quant_rows, (torch.randn(2, 8), torch.float16), ValueError, r"int8 or torch.float8"),
    ("quant_rows 1-D", A.quant_rows, (torch.randn(8),), ValueError, r"rows, features"),
    ("w8a8 short xs", A.w8a8_matmul, (_xq, _xs[:1], _i8.q, _i8.scale), ValueError, r"xs must be .*\(3, 1\)"),
    ("w8a8 short ws", A.w8a8_matmul, (_xq, _xs, _i8.q, _i8.scale[:4]), ValueError, r"ws must be .*\(16,\)"),
    ("w8a8 features", A.w8a8_matmul, (_xq, _xs, torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)), ValueError,
     r"x has 64 features, the weight 32"),
    ("w8a8 out_dtype", lambda: A.w8a8_matmul(_xq, _xs, _i8.q, _i8.scale, out_dtype=torch.int32), (), ValueError,
     r"out_dtype must be a floating"),
    ("w8a8 3-D", A.w8a8_matmul, (_xq[None], _xs, _i8.q, _i8.scale), ValueError, r"must be 2-D"),
    ("w8a8_linear K", A.w8a8_linear, (torch.randn(2, 32), _i8.q, _i8.scale), ValueError, r"must agree on K"),
    ("fp8 rows int W", A.quantize_fp8_rows, (torch.ones(2, 8, dtype=torch.int8),), ValueError, r"floating-point"),
    ("fp8 rows inf", A.quantize_fp8_rows, (torch.full((2, 8), float("inf")),), ValueError, r"inf or NaN"),
    ("fp8_linear w8", A.fp8_linear, (_x, torch.zeros(4, K), torch.ones(4, 1)), ValueError, r"w8 must be e4m3"),
    # attention backends
    ("naive heads", att.naive_attention, (torch.randn(1, 3, 5, 8), *_qkv[1:], _pos), ValueError,
     r"n_head=3 must be a multiple of n_kv_head=2"),
    ("sdpa heads", att.sdpa_attention, (torch.randn(1, 3, 5, 8), *_qkv[1:], _pos), ValueError,
     r"n_head=3 must be a multiple of n_kv_head=2"),
    ("naive head_dim", att.naive_attention, (torch.randn(1, 4, 5, 16), *_qkv[1:], _pos), ValueError,
     r"head_dim and lengths must agree"),
    ("sdpa head_dim", att.sdpa_attention, (_qkv[0], _qkv[1], torch.randn(1, 2, 5, 4), _pos), ValueError,
     r"head_dim and lengths must agree"),
    ("naive 3-D", att.naive_attention, (_qkv[0][0], *_qkv[1:], _pos), ValueError, r"must be 4-D"),
]


@pytest.mark.parametrize("fn, args, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_one_clear_error(fn, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(*args)


# ---- extreme magnitudes: no NaN, bounded error, or the clear error above -------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("magnitude, scale_dtype", [(6e4, torch.float16), (1e-3, torch.float16),
                                                    (1e30, torch.float32), (1e-30, torch.float32),
                                                    (1e30, torch.bfloat16)])
def test_round_trip_at_extreme_magnitudes(fmt, magnitude, scale_dtype):
    W = _w(1.0) / 4 * magnitude  # |W| up to about magnitude
    W[0, :G] = 0.0  # an all-zero group / row stays exact
    quantize = {"int8": Q.quantize_int8, "int4": lambda W, **kw: Q.quantize_int4(W, group_size=G, **kw),
                "nf4": lambda W, **kw: Q.quantize_nf4(W, block_size=G, **kw)}[fmt]
    qw = quantize(W, scale_dtype=scale_dtype)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[0, :G] == 0).all()
    assert Q.quant_error(W, qw) < 0.2, "bounded relative error (4-bit NF4 ~0.1, INT8 ~0.01)"


# ---- the attention reference does not overflow in fp16 -----------------------------------------------
def test_naive_attention_fp16_large_scores_matches_fp64():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 64, generator=g) * 150  # q.k ~ 150^2 * sqrt(64) = 1.8e5: past fp16 max
    k = torch.randn(1, 1, 6, 64, generator=g) * 150
    v = torch.randn(1, 1, 6, 64, generator=g)
    pos = torch.arange(6)
    q16, k16, v16 = q.half(), k.half(), v.half()
    assert not torch.isfinite(q16 @ k16.repeat(1, 2, 1, 1).transpose(-2, -1)).all(), "the test needs overflow"
    out = att.naive_attention(q16, k16, v16, pos)
    ref = att.naive_attention(q16.double(), k16.double(), v16.double(), pos)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=2e-3, rtol=1e-3)


# ---- embedded GGUF and cache: checked before the ~20 s dequantization ------------------------------
def _no_dequantize(*args, **kwargs):
    pytest.fail("dequantization must not start on a bad GGUF or an unwritable cache")


def _fake_gguf(tmp_path, data: bytes):
    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.write_bytes(data)
    return path


_FAKE = b"GGUF" + (3).to_bytes(4, "little") + bytes(range(256)) * 8  # magic, version, then junk


@pytest.mark.parametrize("data, pattern", [(_FAKE[:100], r"truncated or empty \(100 bytes\)"),
                                           (b"", r"truncated or empty \(0 bytes\)"),
                                           (b"PK\x03\x04" + _FAKE[4:], r"not a GGUF file.*b'GGUF'")],
                         ids=["truncated", "empty", "wrong-magic"])
def test_bad_gguf_named_before_dequantizing(monkeypatch, tmp_path, data, pattern):
    path = _fake_gguf(tmp_path, data)
    monkeypatch.setenv("LABUTILS_GGUF", str(path))
    monkeypatch.setenv("LABUTILS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_dequantize", _no_dequantize)
    with pytest.raises(models.ModelUnavailableError, match=pattern) as info:
        models._embedded_cache()
    assert str(path) in str(info.value) and "LABUTILS_GGUF" in str(info.value)
    assert not (tmp_path / "cache" / "smollm2-135m-instruct-q4_1").exists()


def test_gguf_reader_error_names_the_file(monkeypatch, tmp_path):
    """A file that passes the quick checks but that the reader rejects: ModelUnavailableError naming it."""
    path = _fake_gguf(tmp_path, _FAKE)
    monkeypatch.setenv("LABUTILS_GGUF", str(path))
    monkeypatch.setenv("LABUTILS_CACHE", str(tmp_path / "cache"))
    import transformers

    def reader_fails(*args, **kwargs):
        raise ValueError("unpack requires a buffer of 8 bytes")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reader_fails)
    with pytest.raises(models.ModelUnavailableError, match="cannot read the GGUF file") as info:
        models._embedded_cache()
    assert str(path) in str(info.value)
    assert not (tmp_path / "cache" / "smollm2-135m-instruct-q4_1").exists()
    assert not [p for p in (tmp_path / "cache").iterdir()], "no temporary files left behind"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_cache_reported_before_dequantizing(monkeypatch, tmp_path):
    path = _fake_gguf(tmp_path, _FAKE)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        monkeypatch.setenv("LABUTILS_GGUF", str(path))
        monkeypatch.setenv("LABUTILS_CACHE", str(locked / "cache"))
        monkeypatch.setattr(models, "_dequantize", _no_dequantize)
        with pytest.raises(models.ModelUnavailableError, match=r"not writable.*LABUTILS_CACHE"):
            models._embedded_cache()
    finally:
        locked.chmod(0o700)


def test_cache_that_is_a_file_reported_before_dequantizing(monkeypatch, tmp_path):
    """Works as root too: the cache path is an existing regular file."""
    path = _fake_gguf(tmp_path, _FAKE)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LABUTILS_GGUF", str(path))
    monkeypatch.setenv("LABUTILS_CACHE", str(blocker))
    monkeypatch.setattr(models, "_dequantize", _no_dequantize)
    with pytest.raises(models.ModelUnavailableError, match=rf"{blocker}.*not writable"):
        models._embedded_cache()
