"""Matrix-vector products (labutils.gemv): the Triton GEMV (run by Triton's interpreter on the CPU),
the linear_gemv custom op, GemvLinear and ReduceLinear against nn.Linear, and a decoder using them;
the 2-16-row tensor-core kernel (linear_small_m, SmallMLinear) the same way, and its sm_90 PTX."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import labutils.gemv as gemv
import labutils.kernels.gemv as gemv_kernels  # the custom ops look their launchers up here
from conftest import assert_rel_close, norm_rel_err, rel_err, tiny_hf_model
from labutils.decoder import Decoder
from labutils.gemv import GemvLinear, ReduceLinear, SmallMLinear, gemv_triton, small_m_triton
from labutils.kv_cache import static_caches

SHAPES = [(1, 1), (7, 33), (37, 203), (130, 1000)]  # (N, K): partial tiles in both directions
GEMV_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
LINEAR_TOL = 1e-5


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts calls of the Triton GEMV made by linear_gemv (it looks the launcher up in labutils.kernels.gemv
    at call time)."""
    calls = []
    inner = gemv.gemv_triton

    def counting(x, w, b=None):
        calls.append((tuple(w.shape), b is not None))
        return inner(x, w, b)

    monkeypatch.setattr(gemv_kernels, "gemv_triton", counting)
    return calls


# ---- the Triton kernel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,K", SHAPES)
def test_gemv_triton_against_float64(N, K, dtype, bias):
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = gemv_triton(x, w, b)
    assert y.shape == (N,) and y.dtype == dtype, f"output {tuple(y.shape)} {y.dtype}"
    ref = w.double() @ x.double() + (b.double() if bias else 0.0)  # exact products of the rounded inputs
    err = norm_rel_err(y, ref)
    tol = GEMV_TOL[dtype]
    assert err <= tol, f"gemv_triton ({N}, {K}) {dtype} bias={bias}: ||y - ref|| / ||ref|| = {err:.3e} > {tol:.0e}"


def test_gemv_triton_strided_rows():
    """Rows of w further apart than K (a column slice of a wider matrix): stride(0) is honoured."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(19, 80, generator=g)
    w = wide[:, 5:50]  # (19, 45), stride (80, 1)
    x = torch.randn(45, generator=g)
    err = norm_rel_err(gemv_triton(x, w), w.double() @ x.double())
    assert err <= 1e-5, f"row-strided w: relative error {err:.3e}"


def test_gemv_triton_rejects_bad_shapes():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError):
        gemv_triton(torch.randn(15), w)  # K mismatch
    with pytest.raises(ValueError):
        gemv_triton(torch.randn(1, 16), w)  # a row, not a vector
    with pytest.raises(ValueError):
        gemv_triton(torch.randn(8), torch.randn(16, 8).t())  # w not contiguous along K


# ---- linear_gemv, GemvLinear, ReduceLinear vs nn.Linear ----------------------------------------------------
def _linear(N, K, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin.requires_grad_(False)


SINGLE_ROW = [(1, 1, 70), (1, 70), (70,)]
MULTI_ROW = [(3, 70), (2, 5, 70), (1, 4, 70)]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("x_shape", SINGLE_ROW + MULTI_ROW, ids=str)
def test_linear_modules_equal_nn_linear(x_shape, bias, gemv_calls):
    lin = _linear(45, 70, bias, seed=1)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2))
    ref = lin(x)
    single = x.numel() // x.shape[-1] == 1
    mods = {"linear_gemv op": lambda t: torch.ops.labutils.linear_gemv(t, lin.weight, lin.bias),
            "GemvLinear": GemvLinear(lin), "ReduceLinear": ReduceLinear(lin)}
    for name, fn in mods.items():
        before = len(gemv_calls)
        with torch.no_grad():
            out = fn(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype, \
            f"{name}, x {x_shape}: output {tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}"
        assert_rel_close(out, ref, LINEAR_TOL, f"{name}, x {x_shape}, bias={bias}")
        if name != "ReduceLinear":
            used = len(gemv_calls) - before
            assert used == (1 if single else 0), \
                f"{name}, x {x_shape}: Triton GEMV called {used} times ({'one row' if single else 'F.linear fallback'})"


def test_gemv_linear_shares_weights():
    lin = _linear(12, 20, True, seed=3)
    for cls in (GemvLinear, ReduceLinear):
        m = cls(lin)
        assert m.weight.data_ptr() == lin.weight.data_ptr() and m.bias.data_ptr() == lin.bias.data_ptr(), \
            f"{cls.__name__} copied the weights"
        assert (m.in_features, m.out_features) == (20, 12)
        assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]


# ---- a decoder on the Triton GEMV ------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_decoder_step_with_gemv_linears(fused, gemv_calls):
    hf_model = tiny_hf_model("llama-gqa-attn-bias", seed=0)  # untied lm_head, biased q/k/v/o
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    ref_model = Decoder.from_hf(hf_model)
    model = Decoder.from_hf(hf_model)
    if fused:
        model.fuse_projections()
    model.swap_linears(lambda name, linear: GemvLinear(linear))
    n_linear = sum(isinstance(m, GemvLinear) for m in model.modules())
    assert n_linear == (4 if fused else 7) * model.cfg.n_layer + 1, f"{n_linear} GemvLinear modules"
    with torch.no_grad():
        outs = []
        for m in (ref_model, model):
            m.set_kv_caches(static_caches(m, 1, 16))
            m(ids[:, :6], input_pos=torch.arange(6))  # prefill: several rows, the F.linear fallback
            assert not gemv_calls, f"the prefill made {len(gemv_calls)} Triton GEMV calls, want 0"
            outs.append(m(ids[:, 6:7], input_pos=torch.tensor([6])))  # one row: the Triton kernel
            m.set_kv_caches(None)
        assert len(gemv_calls) == n_linear, \
            f"the single-token step made {len(gemv_calls)} Triton GEMV calls, want {n_linear}"
    assert_rel_close(outs[1], outs[0], 1e-4, f"decoder with GemvLinear ({'fused' if fused else 'plain'}), cached step")



# ---- 1 to 16 rows: linear_small_m (GEMV for one row, _small_m_kernel for 2-16, cuBLAS above) -------------------
SMALL_M_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # max|y - ref| / max|ref|; fp16: a few output ulps


@pytest.fixture
def small_m_calls(monkeypatch):
    """Which path linear_small_m took: 'gemv' or 'mma' per Triton call (looked up at call time)."""
    calls = []
    gemv_inner, mma_inner = gemv.gemv_triton, gemv.small_m_triton

    def counting_gemv(x, w, b=None):
        calls.append("gemv")
        return gemv_inner(x, w, b)

    def counting_mma(x, w, b=None, split_k=None):
        calls.append("mma")
        return mma_inner(x, w, b, split_k)

    monkeypatch.setattr(gemv_kernels, "gemv_triton", counting_gemv)
    monkeypatch.setattr(gemv_kernels, "small_m_triton", counting_mma)
    return calls


def _expected_path(rows: int) -> list:
    return ["gemv"] if rows == 1 else ["mma"] if rows <= 16 else []


def _small_m_case(N, K, x_shape, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(*x_shape, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)  # exact products of the rounded inputs
    return x, w, b, ref


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,K", [(37, 200), (96, 64)])  # partial tiles along N and K; exact tiles
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 16, 17])
def test_linear_small_m_against_float64(M, N, K, dtype, bias, small_m_calls):
    x, w, b, ref = _small_m_case(N, K, (M, K), dtype, bias, seed=M * 100 + N)
    y = torch.ops.labutils.linear_small_m(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype, f"output {tuple(y.shape)} {y.dtype}"
    assert small_m_calls == _expected_path(M), f"{M} rows took {small_m_calls or 'F.linear'}"
    err, tol = rel_err(y, ref), SMALL_M_TOL[dtype]
    assert err <= tol, f"linear_small_m M={M} ({N}, {K}) {dtype} bias={bias}: rel. error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape", [(1, 1, 200), (1, 4, 200), (1, 16, 200), (2, 3, 200), (1, 17, 200)], ids=str)
def test_linear_small_m_leading_dims(x_shape, dtype, small_m_calls):
    """(B, T, K) as the decoder passes it: rows = B * T, the output keeps the leading dims."""
    x, w, b, ref = _small_m_case(37, 200, x_shape, dtype, True, seed=7)
    y = torch.ops.labutils.linear_small_m(x, w, b)
    assert y.shape == (*x_shape[:-1], 37), f"x {x_shape}: output {tuple(y.shape)}"
    assert small_m_calls == _expected_path(x_shape[0] * x_shape[1]), f"x {x_shape} took {small_m_calls}"
    assert_rel_close(y, ref, SMALL_M_TOL[dtype], f"linear_small_m, x {x_shape}, {dtype}")


@pytest.mark.parametrize("split_k", [1, 2, 3, 4, 5])  # K = 200: 4 chunks of 64 (the last partial); 3 and 5
def test_small_m_split_k(split_k):                    # splits leave the last split empty
    for dtype in (torch.float32, torch.float16):
        for bias in (False, True):
            x, w, b, ref = _small_m_case(37, 200, (6, 200), dtype, bias, seed=split_k)
            y = small_m_triton(x, w, b, split_k=split_k)
            assert y.shape == (6, 37) and y.dtype == dtype
            assert_rel_close(y, ref, SMALL_M_TOL[dtype], f"split_k={split_k} {dtype} bias={bias}")


def test_small_m_split_k_heuristic():
    """Only the long-K shape with few 16-row tiles is split (Qwen2.5-7B shapes, 132 SMs)."""
    shapes = {(4608, 3584): 1, (3584, 3584): 1, (37888, 3584): 1, (3584, 18944): 2, (152064, 3584): 1}
    got = {nk: gemv._split_k(*nk, 132) for nk in shapes}
    assert got == shapes, f"_split_k: {got}"


def test_small_m_strided_rows():
    """Rows of w further apart than K (a column slice): stride(0) is honoured, as in the GEMV."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(19, 80, generator=g)[:, 5:50]  # (19, 45), stride (80, 1)
    x = torch.randn(4, 45, generator=g)
    assert_rel_close(torch.ops.labutils.linear_small_m(x, w), x.double() @ w.double().T, 1e-5, "row-strided w")


def test_linear_small_m_rejects_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="features"):
        torch.ops.labutils.linear_small_m(torch.randn(3, 15), w)  # K mismatch
    with pytest.raises(ValueError, match="contiguous along K"):
        torch.ops.labutils.linear_small_m(torch.randn(3, 16), torch.randn(16, 8).t())  # (8, 16), stride (1, 8)
    with pytest.raises(ValueError, match="contiguous along K"):  # also where cuBLAS would take the rows
        torch.ops.labutils.linear_small_m(torch.randn(40, 16), torch.randn(16, 8).t())
    with pytest.raises(ValueError):
        torch.ops.labutils.linear_small_m(torch.randn(3, 16, dtype=torch.float16), w)  # dtype mismatch
    with pytest.raises(ValueError):
        small_m_triton(torch.randn(17, 16), w)  # more rows than the tile


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("x_shape", SINGLE_ROW + MULTI_ROW + [(20, 70)], ids=str)
def test_small_m_linear_equals_nn_linear(x_shape, bias, small_m_calls):
    lin = _linear(45, 70, bias, seed=1)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2))
    mod = SmallMLinear(lin)
    assert mod.weight.data_ptr() == lin.weight.data_ptr(), "SmallMLinear copied the weight"
    assert [n for n, _ in mod.named_parameters()] == (["weight", "bias"] if bias else ["weight"])
    with torch.no_grad():
        ref, out = lin(x), mod(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_rel_close(out, ref, LINEAR_TOL, f"SmallMLinear, x {x_shape}, bias={bias}")
    assert small_m_calls == _expected_path(x.numel() // x.shape[-1]), f"x {x_shape} took {small_m_calls}"


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_decoder_verify_step_with_small_m_linears(fused, small_m_calls):
    """Prefill (20 rows: cuBLAS), a verification forward of 5 tokens (the tile kernel), then one
    decode token (the GEMV): the logits of each match the decoder on nn.Linear."""
    hf_model = tiny_hf_model("llama-gqa-attn-bias", seed=0)  # untied lm_head, biased q/k/v/o
    ids = torch.randint(0, 128, (1, 26), generator=torch.Generator().manual_seed(4))
    ref_model, model = Decoder.from_hf(hf_model), Decoder.from_hf(hf_model)
    if fused:
        ref_model.fuse_projections()
        model.fuse_projections()
    model.swap_linears(lambda name, linear: SmallMLinear(linear))
    n_linear = sum(isinstance(m, SmallMLinear) for m in model.modules())
    assert n_linear == (4 if fused else 7) * model.cfg.n_layer + 1, f"{n_linear} SmallMLinear modules"
    steps = [(0, 20, []), (20, 25, ["mma"] * n_linear), (25, 26, ["gemv"] * n_linear)]
    with torch.no_grad():
        outs = {}
        for name, m in (("ref", ref_model), ("small-m", model)):
            m.set_kv_caches(static_caches(m, 1, 32))
            for lo, hi, want in steps:
                before = len(small_m_calls)
                outs[name, lo] = m(ids[:, lo:hi], input_pos=torch.arange(lo, hi))
                if name == "small-m":
                    assert small_m_calls[before:] == want, f"tokens {lo}..{hi - 1}: Triton calls {small_m_calls[before:]}"
            m.set_kv_caches(None)
    for lo, hi, _ in steps:
        assert_rel_close(outs["small-m", lo], outs["ref", lo], 1e-4,
                         f"decoder with SmallMLinear ({'fused' if fused else 'plain'}), tokens {lo}..{hi - 1}")


# ---- what the 2-16-row kernel compiles to (sm_90 PTX, built on the CPU without a GPU) -------------------------
def test_small_m_ptx_uses_tensor_cores():
    """bf16 on sm_90: 16-feature tiles become mma.sync, 64-feature tiles wgmma (one warp group), both
    fed by pipelined 16-byte cp.async copies; the split-K variant (fp32 partials) too."""
    import os
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no CUDA backend")
    code = textwrap.dedent("""
        import json, os
        os.environ["TRITON_INTERPRET"] = "0"
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import labutils.gemv as G
        fn = G._small_m_kernel.fn
        div = ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "N", "K", "stride_wn"]  # as Triton specializes 3584 etc.
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
        out = {}
        for block_n, warps, stages, split in [(16, 4, 4, 1), (64, 4, 3, 1), (64, 4, 3, 2)]:
            sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*fp32" if split > 1 else "*bf16",
                   "M": "i32", "N": "i32", "K": "i32", "stride_wn": "i32", "HAS_BIAS": "constexpr",
                   "SPLIT_K": "constexpr", "DOT_PREC": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            const = {"HAS_BIAS": True, "SPLIT_K": split, "DOT_PREC": "tf32", "BLOCK_M": 16,
                     "BLOCK_N": block_n, "BLOCK_K": 128}
            src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
            opts = {"num_warps": warps, "num_stages": stages}
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
            out[f"{block_n}/{split}"] = {k: ptx.count(k) for k in ("mma.sync", "wgmma.mma_async", "cp.async.cg.shared.global")}
            out[f"{block_n}/{split}"]["16B"] = ptx.count("], 0x10")
        print(json.dumps(out))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"compiling _small_m_kernel for sm_90 failed:\n{res.stderr[-2000:]}"
    import json
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert counts["16/1"]["mma.sync"] > 0, f"BLOCK_N=16: no mma.sync in the PTX: {counts}"
    for variant in ("64/1", "64/2"):
        assert counts[variant]["wgmma.mma_async"] > 0, f"BLOCK_N=64 (split {variant[-1]}): no wgmma: {counts}"
    for variant, c in counts.items():
        assert c["cp.async.cg.shared.global"] > 0 and c["16B"] > 0, f"{variant}: loads not pipelined in 16-byte copies: {counts}"
