"""Matrix-vector products (labutils.gemv): the Triton GEMV (run by Triton's interpreter on the CPU),
the linear_gemv custom op, GemvLinear and ReduceLinear against nn.Linear, and a decoder using them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import labutils.gemv as gemv
from conftest import assert_rel_close, tiny_hf_model
from labutils.decoder import Decoder
from labutils.gemv import GemvLinear, ReduceLinear, gemv_triton
from labutils.kv_cache import static_caches

SHAPES = [(1, 1), (7, 33), (37, 203), (130, 1000)]  # (N, K): partial tiles in both directions
GEMV_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
LINEAR_TOL = 1e-5


def norm_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref||, in float64."""
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts calls of the Triton GEMV made through labutils.gemv (linear_gemv looks it up at call time)."""
    calls = []
    inner = gemv.gemv_triton

    def counting(x, w, b=None):
        calls.append((tuple(w.shape), b is not None))
        return inner(x, w, b)

    monkeypatch.setattr(gemv, "gemv_triton", counting)
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
