"""Property-based tests (hypothesis) of the Triton kernels against float64 references.

Shapes, dtypes (fp32, fp16), biases, strides and positions are drawn by hypothesis; each property
checks the same relative-error bound as the kernel's example-based tests (their tolerances and
reference functions are imported, never loosened). Sizes stay small so that Triton's interpreter
runs the whole file in well under a minute; derandomize=True makes every run draw the same cases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import labutils.actquant as A
import labutils.quant as Q
from conftest import rel_err
from labutils.flash_attention import flash_attention, flash_decode
from labutils.gemv import gemv_triton, small_m_triton
from test_flash_attention import TOL as FLASH_TOL
from test_flash_attention import check as flash_check
from test_flash_attention import reference as flash_reference
from test_gemv import GEMV_TOL, SMALL_M_TOL, norm_rel_err
from test_quant import KERNEL_TOL, gaussian

PROPS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([torch.float32, torch.float16])
SEEDS = st.integers(0, 2**16)


def _weight(N, K, dtype, g, row_pad):
    """(N, K) weight, contiguous along K; row_pad > 0: a column slice of a wider matrix (stride(0) > K)."""
    wide = torch.randn(N, K + row_pad, generator=g).to(dtype)
    off = row_pad // 2
    return wide[:, off:off + K]


# ---- GEMV and the small-M kernel ---------------------------------------------------------------------------
@PROPS
@given(N=st.integers(1, 70), K=st.integers(1, 90), dtype=DTYPES, bias=st.booleans(),
       row_pad=st.sampled_from([0, 0, 3, 16]), seed=SEEDS)
def test_gemv_triton_property(N, K, dtype, bias, row_pad, seed):
    g = torch.Generator().manual_seed(seed)
    w = _weight(N, K, dtype, g, row_pad)
    x = torch.randn(K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = gemv_triton(x, w, b)
    assert y.shape == (N,) and y.dtype == dtype
    ref = w.double() @ x.double() + (b.double() if bias else 0.0)
    err = norm_rel_err(y, ref)
    assert err <= GEMV_TOL[dtype], f"gemv ({N}, {K}) {dtype} bias={bias} pad={row_pad}: {err:.3e}"


@PROPS
@given(M=st.integers(1, 17), N=st.integers(1, 50), K=st.integers(1, 90), dtype=DTYPES, bias=st.booleans(),
       row_pad=st.sampled_from([0, 0, 5, 32]), x_transposed=st.booleans(), seed=SEEDS)
def test_linear_small_m_property(M, N, K, dtype, bias, row_pad, x_transposed, seed):
    """The op: one row -> GEMV, 2..16 -> the tensor-core kernel, 17 -> F.linear; x may be a transposed view."""
    g = torch.Generator().manual_seed(seed)
    w = _weight(N, K, dtype, g, row_pad)
    x = torch.randn(K, M, generator=g).to(dtype).t() if x_transposed else torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = torch.ops.labutils.linear_small_m(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    err = rel_err(y, ref)
    assert err <= SMALL_M_TOL[dtype], f"linear_small_m M={M} ({N}, {K}) {dtype} bias={bias}: {err:.3e}"


@PROPS
@given(M=st.integers(1, 16), N=st.integers(1, 40), K=st.integers(1, 150), dtype=DTYPES, bias=st.booleans(),
       split_k=st.integers(1, 4), row_pad=st.sampled_from([0, 7]), seed=SEEDS)
def test_small_m_triton_split_k_property(M, N, K, dtype, bias, split_k, row_pad, seed):
    g = torch.Generator().manual_seed(seed)
    w = _weight(N, K, dtype, g, row_pad)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = small_m_triton(x, w, b, split_k=split_k)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    err = rel_err(y, ref)
    assert err <= SMALL_M_TOL[dtype], f"small_m_triton M={M} ({N}, {K}) split_k={split_k} {dtype}: {err:.3e}"


# ---- FlashAttention and FlashDecoding ---------------------------------------------------------------------------
def _qkv(B, H, KV, T, S, d, dtype, g, transposed):
    """q (B, H, T, d), k/v (B, KV, S, d); transposed: views of (B, seq, heads, d) tensors (non-contiguous)."""
    if transposed:
        q = torch.randn(B, T, H, d, generator=g).to(dtype).transpose(1, 2)
        k, v = (torch.randn(B, S, KV, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(B, H, T, d, generator=g).to(dtype)
        k, v = (torch.randn(B, KV, S, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


@st.composite
def attention_case(draw):
    KV = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    S = draw(st.integers(1, 50))
    T = draw(st.integers(1, min(S, 40)))
    return dict(B=draw(st.integers(1, 2)), H=KV * group, KV=KV, T=T, S=S, d=draw(st.sampled_from([16, 32])),
                dtype=draw(DTYPES), transposed=draw(st.booleans()), seed=draw(SEEDS))


@PROPS
@given(case=attention_case(), causal=st.booleans())
def test_flash_attention_property(case, causal):
    B, H, KV, T, S, d, dtype = (case[k] for k in ("B", "H", "KV", "T", "S", "d", "dtype"))
    q, k, v = _qkv(B, H, KV, T, S, d, dtype, torch.Generator().manual_seed(case["seed"]), case["transposed"])
    out = flash_attention(q, k, v, causal=causal)
    assert out.shape == (B, H, T, d)
    flash_check(out, flash_reference(q, k, v, causal=causal), dtype, f"{case} causal={causal}")


@PROPS
@given(case=attention_case(), per_batch=st.booleans(), data=st.data())
def test_flash_attention_q_pos_property(case, per_batch, data):
    """Causal with explicit positions: each sequence's T queries at consecutive positions ending <= S - 1."""
    B, H, KV, T, S, d, dtype = (case[k] for k in ("B", "H", "KV", "T", "S", "d", "dtype"))
    q, k, v = _qkv(B, H, KV, T, S, d, dtype, torch.Generator().manual_seed(case["seed"]), case["transposed"])
    starts = data.draw(st.lists(st.integers(0, S - T), min_size=B if per_batch else 1,
                                max_size=B if per_batch else 1), label="starts")
    q_pos = torch.stack([torch.arange(s0, s0 + T) for s0 in starts])  # (B, T) or (1, T)
    q_pos = q_pos if per_batch else q_pos[0]
    out = flash_attention(q, k, v, q_pos=q_pos)
    flash_check(out, flash_reference(q, k, v, q_pos), dtype, f"{case} q_pos={q_pos.tolist()}")


@PROPS
@given(case=attention_case(), num_splits=st.integers(1, 5), data=st.data())
def test_flash_decode_property(case, num_splits, data):
    B, H, KV, S, d, dtype = (case[k] for k in ("B", "H", "KV", "S", "d", "dtype"))
    q, k, v = _qkv(B, H, KV, 1, S, d, dtype, torch.Generator().manual_seed(case["seed"]), case["transposed"])
    last = data.draw(st.lists(st.integers(0, S - 1), min_size=B, max_size=B), label="last positions")
    q_pos = torch.tensor(last)[:, None]  # (B, 1)
    out = flash_decode(q, k, v, q_pos, num_splits=num_splits)
    flash_check(out, flash_reference(q, k, v, q_pos), dtype, f"flash_decode {case} q_pos={last} splits={num_splits}")


# ---- weight-only quantized linears ----------------------------------------------------------------------------
@st.composite
def quant_case(draw):
    return dict(rows=draw(st.integers(1, 16)), N=draw(st.integers(1, 40)), K=draw(st.integers(1, 80)) * 2,
                dtype=draw(DTYPES), bias=draw(st.booleans()), seed=draw(SEEDS))


def _quant_inputs(c):
    W = gaussian(c["N"], c["K"], seed=c["seed"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(c["rows"], c["K"], generator=g).to(c["dtype"])
    b = torch.randn(c["N"], generator=g).to(c["dtype"]) if c["bias"] else None
    return W, x, b


def _quant_check(y, x, deq, b, c, what):
    assert y.shape == (c["rows"], c["N"]) and y.dtype == c["dtype"], f"{what}: {tuple(y.shape)} {y.dtype}"
    ref = F.linear(x.double(), deq, None if b is None else b.double())
    err = norm_rel_err(y, ref)
    assert err <= KERNEL_TOL[c["dtype"]], f"{what} {c}: rel err {err:.2e}"


@PROPS
@given(c=quant_case())
def test_w8a16_linear_property(c):
    W, x, b = _quant_inputs(c)
    qw = Q.quantize_int8(W)
    y = torch.ops.labutils.w8a16_linear(x, qw.q, qw.scale, b)
    _quant_check(y, x, qw.dequantize(torch.float64), b, c, "w8a16")


@PROPS
@given(c=quant_case(), group=st.sampled_from([32, 64, 128]), nf4=st.booleans())
def test_w4a16_linear_property(c, group, nf4):
    W, x, b = _quant_inputs(c)
    if nf4:
        qw = Q.quantize_nf4(W, group)
        y = torch.ops.labutils.w4a16_linear(x, qw.packed, qw.absmax, None, Q.NF4_CODE, None, b, group)
    else:
        qw = Q.quantize_int4(W, group)
        y = torch.ops.labutils.w4a16_linear(x, qw.packed, qw.scale, qw.zero, None, None, b, group)
    _quant_check(y, x, qw.dequantize(torch.float64), b, c, f"w4a16 {'nf4' if nf4 else 'int4'} G={group}")


# ---- W8A8 int8 GEMM -------------------------------------------------------------------------------------------
@PROPS
@given(M=st.integers(1, 17), N=st.integers(1, 40), K=st.integers(1, 100), seed=SEEDS)
def test_w8a8_matmul_property(M, N, K, seed):
    """int32 accumulation, then both scales: equal to float64 on the same codes (bound of test_actquant)."""
    g = torch.Generator().manual_seed(seed)
    xq, xs = A.quant_rows(torch.randn(M, K, generator=g), torch.int8)
    wq = Q.quantize_int8(torch.randn(N, K, generator=g) * 0.02)
    y = A.w8a8_matmul(xq, xs, wq.q, wq.scale, out_dtype=torch.float32)
    ref = (xq.double() @ wq.q.double().T) * xs.double() * wq.scale.double()[None, :]
    assert y.shape == (M, N)
    assert norm_rel_err(y, ref) < 1e-6, f"w8a8 ({M}, {N}, {K})"
