"""The fast INT4 / INT8 weight-only kernels (labutils.kernels.int4_fast) in Triton's CPU interpreter:
the re-layout round-trips, every kernel variant equals "dequantize, then matmul" in fp16 and fp32,
bad inputs fail with clear errors, and the module wrappers reproduce labutils.quant's INT4 / INT8
paths on a tiny decoder."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import labutils.quant as Q
from conftest import tiny_hf_model
from labutils.decoder import Decoder
from labutils.kernels import int4_fast as F4

# fp32: exact dequantization, fp32 accumulation (the "one"/"after" tricks cancel a sum of x: a few
# ulps more); fp16: inputs and the output rounded to fp16 (2^-11 relative) dominate.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel_err(y, ref) -> float:
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def weight(N, K, seed=0):
    """Gaussian with a few large entries, so groups and rows get very different scales and zeros."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    idx = torch.randint(0, N * K, (max(1, N * K // 300),), generator=g)
    W.view(-1)[idx] *= 20
    return W


def xrows(rows, K, dtype, seed=1):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- packing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K,G", [(64, 128, 32), (64, 320, 64), (8, 256, 256), (3, 384, 128)])
def test_int4_pack_round_trip(N, K, G):
    q = Q.quantize_int4(weight(N, K), G)
    p = F4.pack_int4(q)
    assert p.qweight.dtype == torch.int32 and p.qweight.shape == (N, K // 8) and p.sz.shape == (K // G, N)
    codes, scale, zero = F4.unpack_int4(p)
    assert torch.equal(codes, Q.unpack_int4(q.packed)) and torch.equal(scale, q.scale) and torch.equal(zero, q.zero)
    assert torch.equal(p.dequantize(), q.dequantize())
    # the interleave: nibble i of word j of a block is element i * iw + j of the block
    words = p.qweight[0, : p.iw].to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        assert torch.equal((words >> (4 * i)) & 15, codes[0, i * p.iw:(i + 1) * p.iw].to(torch.int64))
    # from codes, and from a float weight (quantized the same way)
    again = F4.pack_int4(codes, G, scale=scale, zero=zero)
    assert torch.equal(again.qweight, p.qweight) and torch.equal(again.sz, p.sz)
    W = weight(N, K)
    assert torch.equal(F4.pack_int4(W, G).qweight, p.qweight)


def test_int4_pack_every_code_and_extreme_words():
    """All 16 codes in every nibble position (nibble 7 sets the int32 sign bit)."""
    N, K, G = 16, 128, 128
    codes = (torch.arange(N * K) % 16).view(N, K).to(torch.uint8)
    codes[1] = 15
    scale = torch.full((N, 1), 0.5, dtype=torch.float16)
    zero = torch.full((N, 1), 15, dtype=torch.uint8)
    p = F4.pack_int4(codes, G, scale=scale, zero=zero)
    assert (p.qweight[1] == -1).all()
    assert torch.equal(p.codes(), codes)


@pytest.mark.parametrize("N,K", [(64, 128), (5, 320), (7, 36)])
def test_int8_pack_round_trip(N, K):
    w8 = Q.quantize_int8(weight(N, K))
    p = F4.pack_int8(w8)
    assert p.qweight.shape == (N, K // 4) and p.scale.dtype == torch.float32
    assert torch.equal(p.codes(), w8.q) and torch.equal(F4.unpack_int8(p)[0], w8.q)
    assert torch.equal(p.dequantize(), w8.dequantize())
    full = torch.arange(-128, 128, dtype=torch.int8).view(1, 256).repeat(2, 1)
    assert torch.equal(F4.pack_int8(full, scale=torch.ones(2)).codes(), full)


# ---- kernels against the dequantized reference ------------------------------------------------------------
INT4_CASES = [  # (N, K, G, rows, kernel, deq, join)
    (64, 128, 32, 1, "gemv", "one", True), (64, 320, 64, 1, "gemv", "magic", True),
    (320, 128, 128, 1, "gemv", "int", True), (128, 320, 64, 1, "gemv", "one", True),
    (64, 128, 32, 2, "mma", "after", True), (64, 320, 64, 5, "mma", "one", True),
    (128, 256, 128, 16, "mma", "after", False), (320, 128, 128, 5, "mma", "magic", False),
    (64, 320, 64, 16, "mma", "int", True), (128, 128, 32, 1, "mma", "after", True),
    (64, 320, 64, 2, "mma", "after", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,K,G,rows,kernel,deq,join", INT4_CASES, ids=str)
def test_int4_kernels(N, K, G, rows, kernel, deq, join, dtype):
    q = Q.quantize_int4(weight(N, K, seed=N + K), G)
    p = F4.pack_int4(q)
    x = xrows(rows, K, dtype, seed=rows)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(dtype) if rows != 2 else None
    y = F4.int4_linear(x, p, bias, kernel=kernel, deq=deq, join=join, split_k=1)
    ref = x.double() @ q.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    assert y.shape == (rows, N) and y.dtype == dtype
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"{kernel}/{deq}/join={join} {dtype} rows={rows} ({N}, {K}, G={G}): {err:.2e}"


INT8_CASES = [(64, 128, 1, "gemv", "one", True), (64, 320, 1, "gemv", "magic", True), (128, 64, 1, "gemv", "int", True),
              (64, 320, 5, "mma", "int", True), (128, 128, 16, "mma", "magic", False), (320, 64, 2, "mma", "magic", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,K,rows,kernel,deq,join", INT8_CASES, ids=str)
def test_int8_kernels(N, K, rows, kernel, deq, join, dtype):
    w8 = Q.quantize_int8(weight(N, K, seed=N * K))
    p = F4.pack_int8(w8)
    x = xrows(rows, K, dtype, seed=rows + 7)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = F4.int8_linear(x, p, bias, kernel=kernel, deq=deq, join=join, split_k=1)
    ref = x.double() @ w8.dequantize(torch.float64).T + bias.double()
    err = rel_err(y, ref)
    assert y.shape == (rows, N) and err <= TOL[dtype], f"int8 {kernel}/{deq} {dtype} rows={rows}: {err:.2e}"


@pytest.mark.parametrize("fmt,kernel,rows", [("int4", "gemv", 1), ("int4", "mma", 3), ("int8", "gemv", 1),
                                              ("int8", "mma", 4)])
def test_split_k_matches_and_is_deterministic(fmt, kernel, rows):
    """Split-K partials summed in a fixed order, the bias added once; default_split_k splits a skinny shape."""
    N, K = 40, 1024
    W = weight(N, K, seed=11)
    p = F4.pack_int4(W, 128) if fmt == "int4" else F4.pack_int8(W)
    fn = F4.int4_linear if fmt == "int4" else F4.int8_linear
    x = xrows(rows, K, torch.float32)
    b = torch.randn(N)
    ref = x.double() @ p.dequantize(torch.float64).T + b.double()
    y1 = fn(x, p, b, kernel=kernel, split_k=1)
    y3 = fn(x, p, b, kernel=kernel, split_k=3)  # 3 does not divide the chunk count: a short last split
    assert rel_err(y1, ref) <= 1e-5 and rel_err(y3, ref) <= 1e-5
    assert torch.equal(y3, fn(x, p, b, kernel=kernel, split_k=3))
    assert F4.default_split_k(3584, 18944, 32, 132) > 1 and F4.default_split_k(18944, 3584, 16, 132) == 1


def test_more_rows_fall_back_and_leading_dims():
    N, K = 24, 128
    p = F4.pack_int4(weight(N, K), 64)
    x = xrows(40, K, torch.float32).view(2, 20, K)
    ref = x.double() @ p.dequantize(torch.float64).T
    assert rel_err(F4.int4_linear(x, p), ref) <= 1e-6  # 40 rows: dequantize + F.linear
    y = F4.int4_linear(x[:1, :3], p)  # (1, 3, K): 3 rows through the tile kernel
    assert y.shape == (1, 3, N) and rel_err(y, ref[:1, :3]) <= 1e-5


# ---- bad input ------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    W = weight(16, 128)
    with pytest.raises(NotImplementedError, match="float offsets"):
        F4.pack_int4(Q.quantize_int4(W, 64, offset=True))
    with pytest.raises(ValueError, match="must divide K"):
        F4.pack_int4(weight(16, 96), 64)
    with pytest.raises(ValueError, match="power of two"):
        F4.pack_int4(W, 48)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        F4.pack_int4(torch.full((16, 128), 16, dtype=torch.uint8), 128, scale=torch.ones(16, 1).half(),
                     zero=torch.zeros(16, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale and zero"):
        F4.pack_int4(torch.zeros(16, 128, dtype=torch.uint8), 64, scale=torch.ones(16, 1).half(),
                     zero=torch.zeros(16, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="fp16"):
        F4.pack_int4(Q.quantize_int4(W, 64, scale_dtype=torch.float32), 64)
    with pytest.raises(TypeError, match="Int4Weight"):
        F4.pack_int4("weights")
    with pytest.raises(ValueError, match="multiple of 4"):
        F4.pack_int8(weight(4, 30))
    p, p8 = F4.pack_int4(W, 64), F4.pack_int8(W)
    with pytest.raises(ValueError, match="features"):
        F4.int4_linear(torch.randn(1, 64), p)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        F4.int4_linear(torch.ones(1, 128, dtype=torch.int32), p)
    with pytest.raises(TypeError, match="PackedInt4"):
        F4.int4_linear(torch.randn(1, 128), p8)
    with pytest.raises(ValueError, match="bias"):
        F4.int4_linear(torch.randn(1, 128), p, torch.randn(15))
    with pytest.raises(ValueError, match="one row"):
        F4.int4_linear(torch.randn(2, 128), p, kernel="gemv")
    with pytest.raises(ValueError, match="deq"):
        F4.int4_linear(torch.randn(1, 128), p, kernel="gemv", deq="after")
    with pytest.raises(ValueError, match="group_size >= 128"):
        F4.int4_linear(torch.randn(3, 128), p, deq="after", join=False)
    with pytest.raises(ValueError, match="split_k"):
        F4.int4_linear(torch.randn(1, 128), p, split_k=0)
    with pytest.raises(ValueError, match="deq"):
        F4.int8_linear(torch.randn(3, 128), p8, kernel="mma", deq="one")
    with pytest.raises(ValueError, match="violates"):
        F4.int4_linear(torch.randn(1, 128), p, config=(8, 100, 1, 1))


# ---- modules on a tiny decoder ------------------------------------------------------------------------------------
def test_modules_on_tiny_decoder_match_labutils_quant():
    """Int4FastLinear / Int8FastLinear through swap_linears: the same logits as labutils.quant's modules
    (same codes and scales), for a short prompt (2-16 rows: tile kernel) and for one token (GEMV)."""
    hf = tiny_hf_model("llama-gqa-attn-bias", seed=0, num_hidden_layers=1)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    for fmt, kw, inputs in (("int4", {"group_size": 32}, (ids, ids[:, :1])), ("int8", {}, (ids[:, :1],))):
        ref_model = Q.quantize_model(Decoder.from_hf(hf), fmt, **kw)
        cls = F4.Int4FastLinear if fmt == "int4" else F4.Int8FastLinear
        fast = Decoder.from_hf(hf).swap_linears(lambda name, lin: cls.from_quant(Q.FORMATS[fmt].from_linear(lin, **kw)))
        assert sum(isinstance(m, cls) for m in fast.modules()) == 7 * fast.cfg.n_layer + 1
        with torch.no_grad():
            for inp in inputs:
                ref, out = ref_model(inp), fast(inp)
                assert rel_err(out, ref) < 1e-5, f"{fmt} {tuple(inp.shape)}: {rel_err(out, ref):.2e}"
        lin = next(m for m in fast.modules() if isinstance(m, cls))
        assert "variant=''" in repr(lin) and lin.bias is not None
    twin = F4.quantize_model_fast(Decoder.from_hf(hf), "int4", group_size=32, variant="deq=magic")
    with torch.no_grad():
        assert rel_err(twin(ids[:, :1]), ref_model_int4_logits(hf, ids[:, :1])) < 1e-5


def ref_model_int4_logits(hf, ids):
    with torch.no_grad():
        return Q.quantize_model(Decoder.from_hf(hf), "int4", group_size=32)(ids)


def test_custom_ops_pass_opcheck():
    N, K = 19, 128
    W = weight(N, K)
    p, p8 = F4.pack_int4(W, 64), F4.pack_int8(W)
    x, b = torch.randn(3, K), torch.randn(N)
    torch.library.opcheck(torch.ops.labutils.int4_fast_linear, (x, p.qweight, p.sz, b, 64, p.iw, "deq=one"))
    torch.library.opcheck(torch.ops.labutils.int8_fast_linear, (x[:1], p8.qweight, p8.scale, None, p8.iw, ""))
