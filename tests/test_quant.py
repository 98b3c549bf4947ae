"""Weight-only quantization (labutils.quant): round-trip bounds derived from each format, packing,
storage size, the W8A16 / W4A16 Triton kernels in the interpreter against F.linear on the
dequantized weight, the modules and quantize_model on tiny lab decoders, and AWQ-style scaling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labutils.kernels.quant as QK  # the custom ops look _launch up here
import labutils.quant as Q
from conftest import norm_rel_err, tiny_hf_model
from labutils.decoder import Decoder

KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
FP16_ULP = 2.0 ** -10  # relative spacing of fp16 numbers (scales are stored in fp16, rounded up)


def gaussian(N, K, seed=0, outliers=True):
    """Gaussian weights, plus a few large entries so that rows / groups get very different scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    if outliers:
        idx = torch.randint(0, N * K, (max(1, N * K // 500),), generator=g)
        W.view(-1)[idx] *= 25
    return W


# ---- packing --------------------------------------------------------------------------------------
def test_pack_unpack_every_byte_and_nibble_order():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = Q.unpack_int4(every)  # (512,)
    assert torch.equal(codes[0::2], every & 15) and torch.equal(codes[1::2], every >> 4), \
        "byte j must hold element 2j in its low nibble and 2j + 1 in its high nibble"
    assert torch.equal(Q.pack_int4(codes), every), "pack_int4(unpack_int4(b)) != b"
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16)).reshape(1, -1)  # all 256 (lo, hi) pairs
    assert torch.equal(Q.unpack_int4(Q.pack_int4(pairs)), pairs.to(torch.uint8)), "unpack_int4(pack_int4(q)) != q"
    assert Q.pack_int4(torch.tensor([1, 2])).item() == 0x21


def test_odd_k_and_bad_codes_rejected():
    with pytest.raises(ValueError, match="odd"):
        Q.pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        Q.pack_int4(torch.tensor([16, 0]))
    for quantize in (Q.quantize_int4, Q.quantize_nf4):
        with pytest.raises(ValueError, match="odd"):
            quantize(torch.randn(4, 129))
        with pytest.raises(ValueError, match="power of two"):
            quantize(torch.randn(4, 128), 48)
    Q.quantize_int8(torch.randn(4, 129))  # INT8 needs no pairs


# ---- round trips: bounds from the formats ---------------------------------------------------------------------
SHAPES = [(37, 256), (19, 200)]  # 200: a last group of 72 (G = 128) / 8 (B = 64)


@pytest.mark.parametrize("N,K", SHAPES)
def test_int8_round_trip(N, K):
    W = gaussian(N, K)
    q = Q.quantize_int8(W)
    assert q.q.dtype == torch.int8 and q.q.shape == (N, K) and q.scale.shape == (N,) and q.scale.dtype == torch.float16
    s = q.scale.float()
    amax = W.abs().amax(1)
    assert torch.all(s >= amax / 127) and torch.all(s <= amax / 127 * (1 + FP16_ULP)), "scale != absmax / 127 rounded up"
    assert torch.all(q.q.abs().amax(1) == 127), "every row should use the full [-127, 127] range"
    err = (W - q.dequantize()).abs()
    assert torch.all(err <= s[:, None] / 2 * (1 + 1e-6)), f"max error / (scale/2) = {(err / (s[:, None] / 2)).max():.4f} > 1"
    bound = (s.pow(2).mean() * K / 4).sqrt() * N ** 0.5 / W.norm()  # from |err| <= s/2 elementwise
    assert Q.quant_error(W, q) <= bound.item()


@pytest.mark.parametrize("N,K", SHAPES)
def test_int4_round_trip(N, K):
    G = 128
    W = gaussian(N, K)
    W[0] = 0.3  # an all-positive row: the range is widened to [0, 0.3]
    W[:, 5] = 0.0  # zeros must come back exactly (the range always contains 0)
    q = Q.quantize_int4(W, G)
    n_groups = math.ceil(K / G)
    assert q.packed.shape == (N, K // 2) and q.packed.dtype == torch.uint8
    assert q.scale.shape == q.zero.shape == (N, n_groups) and q.zero.max() <= 15
    deq = q.dequantize()
    s = q.scale.float().repeat_interleave(G, 1)[:, :K]  # (N, K) scale of each element
    err = (W - deq).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-6)), f"max error / (scale/2) = {(err / (s / 2)).max():.4f} > 1"
    assert torch.all(deq[:, 5] == 0), "an exact zero did not survive"
    Wg = F.pad(W, (0, -K % G)).view(N, n_groups, G)
    span = Wg.amax(-1).clamp(min=0) - Wg.amin(-1).clamp(max=0)
    assert torch.all(q.scale.float() >= span / 15) and torch.all(q.scale.float() <= span / 15 * (1 + FP16_ULP))
    assert Q.quant_error(W, q) < Q.quant_error(W, Q.quantize_int4(W, 256)) or K <= 128, \
        "smaller groups should give a smaller error"


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,K", SHAPES)
def test_int4_offset_round_trip(N, K, scale_dtype):
    """Float offsets: code 0 at m <= the group's minimum, code 15 at m + 15 s >= its maximum (both in
    fp32, as the kernels dequantize), so |W - deq| <= s / 2; no zero point, 4 bytes per group."""
    G = 64
    W = gaussian(N, K)
    W[0] = 0.3 + 0.01 * torch.rand(K)  # all positive, far from 0: the integer grid would waste its codes
    W[-1, :G] = 0.125  # a constant group
    q = Q.quantize_int4(W, G, scale_dtype=scale_dtype, offset=True)
    n_groups = math.ceil(K / G)
    assert q.zero is None and q.offset.shape == q.scale.shape == (N, n_groups)
    assert q.offset.dtype == q.scale.dtype == scale_dtype
    deq = q.dequantize()
    s = q.scale.float().repeat_interleave(G, 1)[:, :K]
    err = (W - deq).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-6)), f"max error / (scale/2) = {(err / (s / 2)).max():.4f} > 1"
    Wg = torch.cat([W, W[:, -1:].expand(N, -K % G)], 1).view(N, n_groups, G)
    m, top = q.offset.float(), q.offset.float() + 15 * q.scale.float()
    assert torch.all(m <= Wg.amin(-1)) and torch.all(top >= Wg.amax(-1))
    assert torch.all(err[-1, :G] == 0), "a constant group comes back exactly"
    row0 = Q.quantize_int4(W[:1], G, scale_dtype=scale_dtype, offset=True)
    assert Q.quant_error(W[:1], row0) < Q.quant_error(W[:1], Q.quantize_int4(W[:1], G)) / 5, \
        "on an all-positive row the offset grid should be far finer than one widened to contain 0"
    assert q.nbytes == N * K // 2 + N * n_groups * 2 * scale_dtype.itemsize


def test_int4_offset_recovers_a_q4_1_grid_exactly():
    """Weights stored as Q4_1 (fp16 d and m per 32, codes 0-15, dequantized in fp32), quantized again
    with float offsets at the same group size: the same codes, scales and offsets, the same weights."""
    g = torch.Generator().manual_seed(3)
    N, K, G = 48, 320, 32
    d = (torch.rand(N, K // G, generator=g) * 0.01 + 1e-4).half()
    m = (torch.randn(N, K // G, generator=g) * 0.05).half()
    codes = torch.randint(0, 16, (N, K), generator=g)
    codes[:, ::G], codes[:, 1::G] = 0, 15  # every group uses both ends of the grid, as Q4_1's do
    W = codes.float() * d.float().repeat_interleave(G, 1) + m.float().repeat_interleave(G, 1)
    q = Q.quantize_int4(W, G, offset=True)
    assert torch.equal(q.scale, d) and torch.equal(q.offset, m)
    assert torch.equal(Q.unpack_int4(q.packed).long(), codes) and torch.equal(q.dequantize(), W)
    qi = Q.quantize_int4(W, G)  # an integer zero point cannot hold m: the grid is lost
    assert Q.quant_error(W, qi) > 1e-3 > Q.quant_error(W, q) == 0


def test_int4_weight_needs_one_of_zero_and_offset():
    q = Q.quantize_int4(gaussian(4, 64), 32)
    with pytest.raises(ValueError, match="exactly one of zero"):
        Q.Int4Weight(q.packed, q.scale, q.zero, 32, offset=q.scale)
    with pytest.raises(ValueError, match="exactly one of zero"):
        Q.Int4Weight(q.packed, q.scale, None, 32)


@pytest.mark.parametrize("N,K", SHAPES)
def test_nf4_round_trip(N, K):
    B = 64
    W = gaussian(N, K)
    q = Q.quantize_nf4(W, B)
    code = Q.NF4_CODE
    assert code.shape == (16,) and code[0] == -1 and code[7] == 0 and code[15] == 1 and torch.all(code.diff() > 0)
    assert abs(code[1].item() - (-0.6961928009986877)) < 1e-12 and abs(code[8].item() - 0.07958029955625534) < 1e-12
    idx = Q.unpack_int4(q.packed).long()  # (N, K)
    absmax = q.absmax.float().repeat_interleave(B, 1)[:, :K]
    deq = q.dequantize()
    assert torch.equal(deq, code[idx] * absmax), "NF4 values must be exactly code-book entries times the absmax"
    v = W / absmax  # in [-1, 1]
    assert v.abs().max() <= 1
    chosen = (v - code[idx]).abs()
    nearest = (v[..., None] - code).abs().amin(-1)
    assert torch.all(chosen <= nearest + 1e-6), "a value was not mapped to its nearest NF4 level"
    assert (deq - W).abs().max() <= (absmax * code.diff().max() / 2).max()


def test_nbytes_match_the_formats():
    N, K = 37, 200
    W = gaussian(N, K)
    assert Q.quantize_int8(W).nbytes == N * K + 2 * N
    assert Q.quantize_int8(W, scale_dtype=torch.float32).nbytes == N * K + 4 * N
    assert Q.quantize_int4(W, 128).nbytes == N * K // 2 + N * 2 * (2 + 1)  # 2 groups: fp16 scale + uint8 zero
    assert Q.quantize_int4(W, 32).nbytes == N * K // 2 + N * 7 * (2 + 1)
    assert Q.quantize_nf4(W, 64).nbytes == N * K // 2 + N * 4 * 2  # 4 blocks: fp16 absmax
    lin = nn.Linear(K, N)
    assert Q.Int4Linear.from_linear(lin, group_size=128).nbytes == N * K // 2 + N * 2 * 3
    assert Q.Int4Linear.from_linear(lin, act_scale=torch.rand(K) + 0.5, group_size=128).nbytes == N * K // 2 + N * 6 + 2 * K


def test_error_ordering_on_gaussian_weights():
    W = gaussian(64, 512, outliers=False)
    e8, e4, enf = Q.quant_error(W, Q.quantize_int8(W)), Q.quant_error(W, Q.quantize_int4(W, 128)), \
        Q.quant_error(W, Q.quantize_nf4(W, 64))
    # INT8 steps are ~16x finer than INT4's; on Gaussian weights NF4 (block 64) beats INT4 (group 128)
    assert e8 < 0.01 and e8 * 8 < e4 and enf < e4 < 0.15, f"int8 {e8:.4f}, int4 {e4:.4f}, nf4 {enf:.4f}"


# ---- kernels and modules ------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches made by the custom ops (through labutils.kernels.quant._launch)."""
    calls = []
    inner = Q._launch

    def counting(kernel, x, N, *args, **kw):
        calls.append(x.numel() // x.shape[-1])
        return inner(kernel, x, N, *args, **kw)

    monkeypatch.setattr(QK, "_launch", counting)
    return calls


def _linear(N, K, seed, W=None):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(gaussian(N, K, seed) if W is None else W)
        lin.bias.normal_()  # large next to the products: a dropped bias cannot hide
    return lin.requires_grad_(False)


KW = {"int8": {}, "int4": {"group_size": 128}, "int4o": {"group_size": 128, "offset": True}, "nf4": {"block_size": 64}}
MODULE = {"int8": Q.Int8Linear, "int4": Q.Int4Linear, "int4o": Q.Int4Linear, "nf4": Q.NF4Linear}  # int4o: float offsets


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4o", "nf4"])
@pytest.mark.parametrize("N,K", SHAPES)
def test_kernel_modules_against_dequantized_reference(N, K, fmt, dtype, rows, launches):
    lin = _linear(N, K, seed=N + K).to(dtype)
    mod = MODULE[fmt].from_linear(lin, **KW[fmt])
    assert mod.bias is lin.bias
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.no_grad():
        y = mod(x)
    assert launches == [rows], f"expected one Triton launch for {rows} rows, got {launches}"
    assert y.shape == (rows, N) and y.dtype == dtype
    ref = F.linear(x.double(), mod.dequantize(torch.float64), mod.bias.double())
    err = norm_rel_err(y, ref)
    assert err <= KERNEL_TOL[dtype], f"{fmt} {dtype} rows={rows} ({N}, {K}): rel err {err:.2e}"


@pytest.mark.parametrize("fmt", ["int4", "int4o", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape", [(1, 1, 200), (2, 3, 200), (40, 200)], ids=str)
def test_awq_input_scale_inside_the_kernel(fmt, dtype, x_shape, launches):
    """in_scale (x / s per input channel) is applied by the kernel (1..16 rows) and by the fallback."""
    N, K = 19, 200
    lin = _linear(N, K, seed=5).to(dtype)
    s = torch.rand(K, generator=torch.Generator().manual_seed(6)) * 4 + 0.25
    mod = MODULE[fmt].from_linear(lin, act_scale=s, **KW[fmt])
    assert mod.in_scale is not None and torch.allclose(1 / mod.in_scale.float(), s, rtol=2 * FP16_ULP)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        y = mod(x)
    rows = x.numel() // K
    assert launches == ([rows] if rows <= Q.MAX_ROWS else []), f"launches {launches} for {rows} rows"
    ref = F.linear(x.double(), mod.dequantize(torch.float64), lin.bias.double())
    assert y.shape == ref.shape and norm_rel_err(y, ref) <= KERNEL_TOL[dtype]
    plain = F.linear(x.double(), lin.weight.double(), lin.bias.double())  # scaling undone: still ~ W x
    assert norm_rel_err(y, plain) < 0.25  # without the in-kernel x / s it would be O(1)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4o", "nf4"])
def test_many_rows_fall_back_and_no_bias(fmt, launches):
    N, K = 37, 256
    lin = _linear(N, K, seed=9)
    lin.bias = None
    mod = MODULE[fmt].from_linear(lin, **KW[fmt])
    x = torch.randn(2, 17, K, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x.double(), mod.dequantize(torch.float64))
    with torch.no_grad():
        assert norm_rel_err(mod(x), ref) <= 1e-5 and not launches, "34 rows should take the F.linear fallback"
        assert norm_rel_err(mod(x[:1, :2]), ref[:1, :2]) <= 1e-5 and launches == [2]


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and dispatch are consistent: torch.compile / graphs see one op."""
    N, K = 19, 256
    W = gaussian(N, K)
    x = torch.randn(3, K)
    b = torch.randn(N)
    q8, q4, nf = Q.quantize_int8(W), Q.quantize_int4(W, 128), Q.quantize_nf4(W, 64)
    torch.library.opcheck(torch.ops.labutils.w8a16_linear, (x, q8.q, q8.scale, b))
    torch.library.opcheck(torch.ops.labutils.w4a16_linear, (x, q4.packed, q4.scale, q4.zero, None, None, b, 128))
    qo = Q.quantize_int4(W, 128, offset=True)
    torch.library.opcheck(torch.ops.labutils.w4a16_linear, (x, qo.packed, qo.scale, qo.offset, None, None, b, 128))
    torch.library.opcheck(torch.ops.labutils.w4a16_linear,
                          (x[:1], nf.packed, nf.absmax, None, Q.NF4_CODE, torch.rand(K).half() + 0.5, None, 64))


def test_module_state_and_repr():
    lin = _linear(19, 256, seed=2)
    for fmt in MODULE:
        mod = MODULE[fmt].from_linear(lin, **KW[fmt])
        assert (mod.in_features, mod.out_features) == (256, 19)
        assert [n for n, _ in mod.named_parameters()] == ["bias"] and mod.bias is lin.bias
        assert "weight" not in dict(mod.named_buffers()), "the float weight must not be kept"
        twin = MODULE[fmt](mod.qweight, lin.bias)
        twin.load_state_dict(mod.state_dict())
        assert torch.equal(twin.dequantize(), mod.dequantize())
        assert fmt[:4].replace("int", "Int").replace("nf4", "NF4") in type(mod).__name__ and "bias=True" in repr(mod)
        assert ("float offsets" in repr(mod)) == (fmt == "int4o") and "None" not in repr(mod)


# ---- whole (tiny) decoders --------------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("family", ["llama-gqa-attn-bias", "qwen2-gqa-tied"])
def test_quantize_model_on_tiny_decoder(family, launches):
    """Every linear swapped (a tied lm_head left alone), kernels used for a short input, logits close."""
    hf = tiny_hf_model(family, seed=0)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = _logits(Decoder.from_hf(hf), ids)
    tied = hf.config.tie_word_embeddings
    bounds = {"int8": 3e-2, "int4": 0.4, "nf4": 0.4}  # ||logits - ref|| / ||ref||; tiny random models amplify
    errs = {}
    for fmt, bound in bounds.items():
        model = Q.quantize_model(Decoder.from_hf(hf), fmt, **KW[fmt])
        n_q = sum(isinstance(m, Q.FORMATS[fmt]) for m in model.modules())
        assert n_q == 7 * model.cfg.n_layer + (0 if tied else 1), f"{fmt}: {n_q} quantized linears"
        assert type(model.lm_head) is (nn.Linear if tied else Q.FORMATS[fmt])
        if tied:
            assert model.lm_head.weight is model.embed_tokens.weight
        del launches[:]
        out = _logits(model, ids)
        assert launches == [12] * n_q, "each quantized linear should run its kernel once (12 rows)"
        sim = _logits(Q.quantize_model(Decoder.from_hf(hf), fmt, simulate=True, **KW[fmt]), ids)
        assert norm_rel_err(out, sim) < 1e-5, f"{fmt}: kernels differ from the dequantized weights"
        errs[fmt] = norm_rel_err(out, ref)
        assert errs[fmt] < bound, f"{fmt}: logits rel err {errs[fmt]:.3e} >= {bound}"
    assert errs["int8"] * 5 < min(errs["int4"], errs["nf4"]), f"int8 should be far closer than 4-bit: {errs}"


def test_quantize_model_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt"):
        Q.quantize_model(Decoder.from_hf(tiny_hf_model("llama-gqa-tied")), "int3")
    with pytest.raises(ValueError, match="4-bit"):
        Q.Int8Linear.from_linear(nn.Linear(64, 8), act_scale=torch.ones(64))


# ---- AWQ-style scaling --------------------------------------------------------------------------------------------------
def test_awq_search_helps_a_layer_with_large_input_channels():
    g = torch.Generator().manual_seed(0)
    N, K = 96, 256
    W = torch.randn(N, K, generator=g) / K ** 0.5
    X = torch.randn(512, K, generator=g)
    X[:, [3, 77, 130, 200]] *= 30  # a few salient input channels, as in LLM activations
    for fmt, kw in (("int4", {"group_size": 128}), ("nf4", {"block_size": 64})):
        s, info = Q.awq_search(W, X, X.abs().mean(0), fmt, **kw)
        assert info["alpha"] > 0 and info["err"] < 0.5 * info["err_rtn"], f"{fmt}: {info}"
        assert s.shape == (K,) and s[[3, 77, 130, 200]].min() > s.median() * 2, "the large channels should be scaled up"
        # the module built with these scales reproduces the error awq_search measured
        lin = nn.Linear(K, N, bias=False)
        lin.weight.data = W
        mod = Q.FORMATS[fmt].from_linear(lin, act_scale=s, **kw)
        err = (X @ mod.dequantize().T - X @ W.T).pow(2).mean().item()
        assert math.isclose(err, info["err"], rel_tol=1e-4), f"{fmt}: module error {err} vs search {info['err']}"


def test_awq_scales_on_tiny_decoder():
    """Calibration hooks, per-linear search (never worse than round-to-nearest on the calibration rows),
    and, on a model whose norms make a few large input channels, a smaller end-to-end error."""
    hf = tiny_hf_model("llama-gqa-attn-bias", seed=0)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.input_layernorm.weight[[5, 17, 40]] *= 20
            layer.post_attention_layernorm.weight[[2, 33]] *= 20
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (4, 64), generator=g)
    model = Decoder.from_hf(hf)
    kw = {"group_size": 32}
    scales, info = Q.awq_scales(model, calib, "int4", return_info=True, progress=False, **kw)
    assert set(scales) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not any(m._forward_pre_hooks for m in model.modules()), "calibration hooks left behind"
    for name, i in info.items():
        assert i["err"] <= i["err_rtn"], f"{name}: AWQ error {i['err']} > round-to-nearest {i['err_rtn']}"
    assert sum(i["err"] for i in info.values()) < 0.8 * sum(i["err_rtn"] for i in info.values())
    ref = _logits(model, calib)
    rtn = _logits(Q.quantize_model(Decoder.from_hf(hf), "int4", simulate=True, **kw), calib)
    awq = _logits(Q.quantize_model(Decoder.from_hf(hf), "int4", awq=scales, simulate=True, **kw), calib)
    e_rtn, e_awq = norm_rel_err(rtn, ref), norm_rel_err(awq, ref)
    assert e_awq < 0.85 * e_rtn, f"AWQ logits error {e_awq:.3f} vs round-to-nearest {e_rtn:.3f}"


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("fmt,K,words", [("int8", 256, True), ("int8", 129, False), ("int4", 200, True),
                                         ("nf4", 200, True), ("int4", 196, False), ("int4o", 200, True),
                                         ("int4o", 196, False)])
def test_kernel_choice_by_rows_and_k(fmt, K, words, rows, monkeypatch):
    """One activation row runs the int32-word GEMV (K % 4 == 0 for INT8, K % 8 == 0 for 4-bit); 2-16
    rows of 4-bit codes run the word-wise tensor-core kernel when K allows; the rest take the byte
    tile kernels; all match the dequantized reference."""
    used = []
    inner = Q._launch
    monkeypatch.setattr(QK, "_launch", lambda kernel, *a, **kw: used.append(kernel) or inner(kernel, *a, **kw))
    lin = _linear(23, K, seed=K)
    kw = {"int8": {}, "int4": {"group_size": 64}, "int4o": {"group_size": 64, "offset": True}, "nf4": {"block_size": 32}}[fmt]
    mod = MODULE[fmt].from_linear(lin, **kw)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = mod(x)
    if fmt == "int8":
        expected = Q._w8_gemv_kernel if words and rows == 1 else Q._w8a16_kernel
    else:
        expected = (Q._w4_gemv_kernel if rows == 1 else Q._w4_mma_kernel) if words else Q._w4a16_kernel
    assert used == [expected], f"{fmt}, K={K}, rows={rows}: launched {used}"
    ref = F.linear(x.double(), mod.dequantize(torch.float64), lin.bias.double())
    assert norm_rel_err(y, ref) <= KERNEL_TOL[torch.float32]


def test_magic_number_conversions_are_exact():
    """The bit tricks of the GEMV kernels, in torch: every INT8 code and every nibble, exactly."""
    c8 = torch.arange(-127, 128, dtype=torch.int32)
    u = c8 & 0xFF
    f8 = ((u ^ 0x80) | 0x4B000000).view(torch.float32) - 8388736.0
    assert torch.equal(f8, c8.float())
    nib = torch.arange(16, dtype=torch.int32)
    for z in (0, 7, 15):
        f4 = (nib | 0x4B000000).view(torch.float32) - (8388608.0 + z)
        assert torch.equal(f4, (nib - z).float())


# ---- what the GEMV kernels compile to (sm_90 PTX, built on the CPU without a GPU) -----------------------------
def _ptx(kernel, signature, constexprs, divisible):
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import labutils.quant as Q
        fn = Q.{kernel}.fn
        attrs = {{(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in {divisible!r}}}
        src = ASTSource(fn=fn, signature={signature!r}, constexprs={constexprs!r}, attrs=attrs)
        print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}}).asm["ptx"])
    """)
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no CUDA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, f"compiling {kernel} for sm_90 failed:\n{out.stderr[-2000:]}"
    return out.stdout


def _int_to_float(ptx: str) -> int:
    return sum(ptx.count(f"cvt.rn.f32.{t}") for t in ("s8", "u8", "s16", "u16", "s32", "u32"))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4o"])
def test_gemv_ptx_has_vector_loads_and_no_int_to_float(fmt):
    """The two claims of the GEMV design, checked in the compiled code: codes arrive in 16-byte vector
    loads, and no code goes through an int-to-float conversion (INT4 converts one zero point per group;
    with float offsets, int4o, none)."""
    if fmt == "int8":
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16",
               "N": "i32", "K": "i32", "KW": "i32", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr"}  # divisibility as Triton specializes K = 3584, KW = 896
        ptx = _ptx("_w8_gemv_kernel", sig, {"HAS_BIAS": False, "BLOCK_N": 8, "BLOCK_K": 1024},
                   ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "K", "KW"])
        max_cvt = 0
    else:
        foff = fmt == "int4o"
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16" if foff else "*u8",
               "code_ptr": "*fp32", "xs_ptr": "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32",
               "KW": "i32", "NG": "i32", "NF4": "constexpr", "FOFF": "constexpr", "GROUP": "constexpr",
               "HAS_XS": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        ptx = _ptx("_w4_gemv_kernel", sig, {"NF4": False, "FOFF": foff, "GROUP": 128, "HAS_XS": False,
                                            "HAS_BIAS": False, "BLOCK_N": 8, "BLOCK_K": 512},
                   ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "code_ptr", "xs_ptr", "b_ptr", "y_ptr", "N", "K", "KW", "NG"])
        max_cvt = 0 if foff else 1  # the group's zero point
    assert "ld.global.v4.b32" in ptx, "the codes are not loaded as 16-byte vectors"
    n_cvt = _int_to_float(ptx)
    assert n_cvt <= max_cvt, f"{n_cvt} integer-to-float conversions in the {fmt} GEMV"


def test_ptx_check_sees_int_to_float_in_the_tile_kernel():
    """The detector above is not vacuous: the 2-16-row tile kernel converts each INT4 code to a float
    (there the conversion is shared by 16 rows of tl.dot; in a GEMV it would be paid per row)."""
    sig = {"x_ptr": "*bf16", "p_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "code_ptr": "*fp32",
           "xs_ptr": "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "NG": "i32",
           "NF4": "constexpr", "FOFF": "constexpr", "GROUP": "constexpr", "HAS_XS": "constexpr", "HAS_BIAS": "constexpr",
           "BLOCK_M": "constexpr", "DOT_PREC": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    ptx = _ptx("_w4a16_kernel", sig, {"NF4": False, "FOFF": False, "GROUP": 128, "HAS_XS": False, "HAS_BIAS": False, "BLOCK_M": 16,
                                      "DOT_PREC": "tf32", "BLOCK_N": 16, "BLOCK_K": 64},
               ["x_ptr", "p_ptr", "s_ptr", "z_ptr", "code_ptr", "xs_ptr", "b_ptr", "y_ptr", "N", "K"])
    assert _int_to_float(ptx) >= 1
