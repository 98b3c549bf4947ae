"""FlashAttention (labutils.flash_attention), run by Triton's interpreter on the CPU: the fused forward
and FlashDecoding against naive attention in float64, masks for a static cache, the 'flash' backend
in the lab decoder, and the cost formulas."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from conftest import assert_rel_close, norm_rel_err, tiny_hf_model
from labutils import attention
from labutils import flash_attention as fa
from labutils.attention import naive_attention
from labutils.decoder import Decoder
from labutils.flash_attention import (attention_flops, flash_attention, flash_attention_bytes, flash_backend,
                                      flash_decode, naive_attention_bytes)
from labutils.generate import greedy_cached, greedy_no_cache
from labutils.kv_cache import static_caches

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16"}


def qkv(B, H, KV, T, S, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((B, H, T, d), (B, KV, S, d), (B, KV, S, d)))
    return q, k, v


def reference(q, k, v, q_pos=None, causal=True, scale=None):
    """naive_attention on the (rounded) inputs in float64; non-causal = every query at the last position."""
    T, S, d = q.shape[2], k.shape[2], q.shape[3]
    if not causal:
        q_pos = torch.full((T,), S - 1)
    elif q_pos is None:
        q_pos = torch.arange(S - T, S)
    q = q.double() * (1.0 if scale is None else scale * math.sqrt(d))  # naive_attention scales by 1/sqrt(d)
    return naive_attention(q, k.double(), v.double(), q_pos)


def check(out, ref, dtype, what):
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}"
    err = norm_rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: ||out - ref|| / ||ref|| = {err:.2e} > {TOL[dtype]:.0e}"


# ---- the forward kernel ---------------------------------------------------------------------------------
# (B, n_head, n_kv_head, T, S, head_dim); interpreter blocks are 32 queries x 16 keys: 17, 45 and 100
# leave partial blocks, (7, 45) is a chunk of queries at the last positions of a longer sequence.
SHAPES = [(1, 2, 2, 1, 1, 16), (2, 4, 2, 17, 17, 16), (2, 4, 2, 100, 100, 16), (1, 2, 2, 100, 100, 64),
          (2, 4, 2, 7, 45, 64), (1, 4, 2, 20, 20, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,H,KV,T,S,d", SHAPES, ids=lambda x: str(x))
def test_flash_attention_against_float64(B, H, KV, T, S, d, causal, dtype):
    q, k, v = qkv(B, H, KV, T, S, d, dtype, seed=T * 7 + S + d)
    out = flash_attention(q, k, v, causal=causal)
    check(out, reference(q, k, v, causal=causal), dtype, f"{(B, H, KV, T, S, d)} causal={causal}")


@pytest.mark.parametrize("block", [(16, 16), (16, 32), (64, 16)], ids=str)
@pytest.mark.parametrize("T,S", [(100, 100), (9, 70)])
def test_block_shapes(block, T, S):
    """Other tilings than the interpreter's default: diagonal blocks wider and narrower than the query block."""
    q, k, v = qkv(1, 4, 2, T, S, 16, seed=5)
    for causal in (True, False):
        out = flash_attention(q, k, v, causal=causal, block=block)
        check(out, reference(q, k, v, causal=causal), torch.float32, f"block {block}, T={T}, S={S}, causal={causal}")
    q_pos = torch.arange(S - T, S)  # the same positions given explicitly: bounds from the loaded positions
    out = flash_attention(q, k, v, q_pos=q_pos[None], block=block)
    check(out, reference(q, k, v, q_pos), torch.float32, f"block {block}, T={T}, S={S}, explicit q_pos")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,H,KV,T,S,d", SHAPES, ids=lambda x: str(x))
def test_tma_kernel_against_float64(B, H, KV, T, S, d, causal):
    """The tensor-descriptor kernel (the default for fp16/bf16 on sm_90+) on the same shapes, with q as
    a transposed view (B, T, H, d) -> (B, H, T, d), as the decoder passes it; LSE too."""
    q, k, v = qkv(B, H, KV, T, S, d, torch.float16, seed=T * 5 + S + d)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides of a transposed view
    out, lse = flash_attention(q, k, v, causal=causal, kernel="tma", return_lse=True)
    check(out, reference(q, k, v, causal=causal), torch.float16, f"tma {(B, H, KV, T, S, d)} causal={causal}")
    out_p, lse_p = flash_attention(q, k, v, causal=causal, kernel="pointer", return_lse=True)
    assert norm_rel_err(out, out_p) <= 2e-3, "tma and pointer kernels disagree"
    assert (lse - lse_p).abs().max() <= 1e-3, "tma and pointer kernels disagree on the log-sum-exp"


@pytest.mark.parametrize("block", [(16, 16), (16, 32), (64, 16)], ids=str)
def test_tma_block_shapes(block):
    q, k, v = qkv(1, 4, 2, 45, 70, 16, torch.float16, seed=6)
    for causal in (True, False):
        out = flash_attention(q, k, v, causal=causal, block=block, kernel="tma")
        check(out, reference(q, k, v, causal=causal), torch.float16, f"tma block {block}, causal={causal}")


def test_kernel_choice():
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    assert not fa.tma_usable(q, k, v), "fp32 must stay on the pointer kernel (exact dots)"
    assert fa.tma_usable(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="kernel='tma' needs"):
        flash_attention(q, k, v, kernel="tma")
    with pytest.raises(ValueError, match="kernel='tma' needs"):
        flash_attention(q.half(), k.half(), v.half(), q_pos=torch.arange(8), kernel="tma")
    with pytest.raises(ValueError, match="kernel must be"):
        flash_attention(q, k, v, kernel="fast")
    odd = torch.randn(1, 2, 8, 20, dtype=torch.float16)[..., :16]  # rows 40 bytes apart: no TMA
    assert not fa.tma_usable(odd, odd, odd)
    check(flash_attention(odd, odd, odd), reference(odd, odd, odd), torch.float16, "unaligned strides -> pointer kernel")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_custom_scale(causal):
    q, k, v = qkv(2, 4, 2, 33, 33, 16, seed=8)
    out = flash_attention(q, k, v, causal=causal, scale=0.7)
    check(out, reference(q, k, v, causal=causal, scale=0.7), torch.float32, f"scale=0.7, causal={causal}")
    assert norm_rel_err(out, reference(q, k, v, causal=causal)) > 1e-2, "scale argument ignored"


def test_log_sum_exp():
    q, k, v = qkv(2, 4, 2, 20, 37, 32, seed=9)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert torch.equal(out, flash_attention(q, k, v))
    kk = attention.repeat_kv(k.double(), 2)
    scores = (q.double() @ kk.transpose(-2, -1)) / math.sqrt(32)
    scores = scores.masked_fill(~attention.causal_mask(torch.arange(17, 37), 37), float("-inf"))
    assert lse.shape == (2, 4, 20) and lse.dtype == torch.float32
    assert (lse.double() - torch.logsumexp(scores, -1)).abs().max() <= 1e-5


# ---- a static KV cache: S larger than the filled length ------------------------------------------------------
def poison(k, v, lengths):
    """Copies of k, v with NaN at every position >= lengths[b]: positions that must never be read."""
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lengths):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
def test_static_cache_positions(dtype):
    """Queries at given positions over a 64-slot cache: (T,) positions shared by the batch and (B, T)
    positions that differ per sequence; slots past the last position hold NaN and must not be read.
    q is a transposed view (B, T, H, d) -> (B, H, T, d), as the decoder passes it."""
    B, H, KV, T, S, d = 2, 4, 2, 40, 64, 16
    q, k, v = qkv(B, H, KV, T, S, d, dtype, seed=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    for q_pos in (torch.arange(10, 50), torch.stack([torch.arange(0, 40), torch.arange(21, 61)])):
        last = q_pos.reshape(-1, T)[:, -1].expand(B)
        kp, vp = poison(k, v, (last + 1).tolist())
        out = flash_attention(q, kp, vp, q_pos=q_pos)
        assert torch.isfinite(out).all(), f"q_pos {q_pos.tolist()}: a slot past the last position was read"
        check(out, reference(q, k, v, q_pos), dtype, f"q_pos {q_pos.tolist()}")


# ---- decode ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("H,KV", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_flash_decode_per_sequence_lengths(H, KV, dtype):
    """Three sequences of 1, 18 and 40 keys in a 40-slot cache (16-key blocks: 3 of them), split 1 to 7 ways."""
    B, S, d = 3, 40, 16
    q, k, v = qkv(B, H, KV, 1, S, d, dtype, seed=H + KV)
    q_pos = torch.tensor([[0], [17], [39]])
    kp, vp = poison(k, v, [1, 18, 40])
    ref = reference(q, k, v, q_pos)
    for num_splits in (1, 2, 3, 7):
        out = flash_decode(q, kp, vp, q_pos, num_splits=num_splits)
        check(out, ref, dtype, f"flash_decode, {num_splits} splits")
    shared = torch.tensor([30])  # one (1,) position for the whole batch
    check(flash_decode(q, k, v, shared, num_splits=2), reference(q, k, v, shared), dtype, "flash_decode, q_pos (1,)")


def test_flash_decode_large_group():
    """8 query heads per KV head at head_dim 64, the default number of splits."""
    q, k, v = qkv(2, 8, 1, 1, 50, 64, seed=4)
    q_pos = torch.tensor([[12], [49]])
    check(flash_decode(q, k, v, q_pos), reference(q, k, v, q_pos), torch.float32, "flash_decode, group of 8")


# ---- the backend in the lab decoder ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf():
    return tiny_hf_model("llama-gqa-tied", seed=0)


def test_backend_registered():
    assert attention.get_backend("flash") is flash_backend


def test_decoder_logits_flash_vs_sdpa(tiny_hf):
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = Decoder.from_hf(tiny_hf)(ids)
        out = Decoder.from_hf(tiny_hf).set_attention("flash")(ids)
    assert_rel_close(out, ref, 1e-4, "decoder logits, 'flash' vs 'sdpa'")


@pytest.mark.parametrize("num_splits", [None, 3], ids=["default-splits", "3-splits"])
def test_decoder_greedy_static_cache(tiny_hf, num_splits):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = greedy_no_cache(Decoder.from_hf(tiny_hf), ids, 8)
    model = Decoder.from_hf(tiny_hf).set_attention(functools.partial(flash_backend, num_splits=num_splits))
    out = greedy_cached(model, ids, 8, static_caches(model, 2, 32))
    assert torch.equal(out, ref), f"greedy tokens differ:\n{out}\nvs\n{ref}"


# ---- errors and cost formulas ----------------------------------------------------------------------------
def test_rejects_bad_inputs():
    q, k, v = qkv(1, 2, 2, 4, 4, 24)
    with pytest.raises(ValueError, match="head_dim=24 is not supported; supported: 16, 32, 64, 128"):
        flash_attention(q, k, v)
    q, k, v = qkv(1, 2, 2, 4, 4, 256)
    with pytest.raises(ValueError, match="head_dim=256"):
        flash_decode(q[:, :, :1], k, v, torch.tensor([3]))
    q, k, v = qkv(1, 2, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q.half(), k, v)
    with pytest.raises(ValueError, match="device"):
        flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="bfloat16"):
        flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(*qkv(1, 3, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="q_pos"):
        flash_attention(q, k, v, q_pos=torch.arange(3))
    with pytest.raises(ValueError, match="one query"):
        flash_decode(q, k, v, torch.tensor([3]))


def test_cost_formulas():
    assert attention_flops(2, 3, 5, 7, 16, causal=False) == 4 * 2 * 3 * 5 * 7 * 16
    assert attention_flops(2, 3, 8, 8, 16, causal=True) == 2 * 2 * 3 * 8 * 8 * 16
    assert attention_flops(1, 1, 1, 9, 16, causal=True) == 4 * 9 * 16  # decode: nothing to halve
    # Q, K, V read (3 N d) + scores written and read (2 N^2) + probabilities written and read (2 N^2) + O (N d)
    assert naive_attention_bytes(1, 1, 10, 4, 2) == 2 * (3 * 40 + 2 * 100 + 2 * 100 + 40)
    assert naive_attention_bytes(2, 3, 10, 4, 2) == 6 * naive_attention_bytes(1, 1, 10, 4, 2)
    assert flash_attention_bytes(2, 3, 10, 4, 2) == 2 * 3 * 2 * 4 * 10 * 4


# ---- a few queries per sequence: flash_decode_rows (speculative verification) -----------------------------
@pytest.mark.parametrize("H,KV,T,dtype", [(4, 2, 5, torch.float32), (4, 2, 5, torch.float16),
                                         (2, 2, 9, torch.float32), (3, 1, 17, torch.float16)],
                         ids=lambda x: DT_IDS.get(x, str(x)))
def test_flash_decode_rows(H, KV, T, dtype):
    """T queries at consecutive positions (the last committed token and k drafts) ending anywhere in
    a 48-slot cache whose later slots hold NaN; (T,) and (B, T) positions; 1 and 7 splits, so that some
    splits hold keys past some rows' positions (rows that see nothing there)."""
    from labutils.flash_attention import flash_decode_rows

    B, S, d = 2, 48, 16
    q, k, v = qkv(B, H, KV, T, S, d, dtype, seed=H * T)
    for ends in ((T - 1, T - 1), (20, 47), (35, 40)):
        q_pos = torch.stack([torch.arange(e - T + 1, e + 1) for e in ends])  # (B, T)
        kp, vp = poison(k, v, [e + 1 for e in ends])
        ref = reference(q, k, v, q_pos)
        for num_splits in (1, 7):
            out = flash_decode_rows(q, kp, vp, q_pos, num_splits=num_splits)
            assert torch.isfinite(out).all(), f"ends {ends}, {num_splits} splits: a slot past a position was read"
            check(out, ref, dtype, f"flash_decode_rows, ends {ends}, {num_splits} splits")
    shared = torch.arange(30 - T, 30)  # (T,) positions for the whole batch; a transposed q as the decoder passes it
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    check(flash_decode_rows(qt, k, v, shared, num_splits=3), reference(q, k, v, shared), dtype,
          "flash_decode_rows, q_pos (T,)")


def test_flash_decode_rows_limits():
    from labutils.flash_attention import MAX_ROWS, flash_decode_rows

    q, k, v = qkv(1, 8, 1, MAX_ROWS // 8 + 1, 40, 16)
    with pytest.raises(ValueError, match="rows"):
        flash_decode_rows(q, k, v, torch.arange(40 - q.shape[2], 40))
    with pytest.raises(ValueError, match="q_pos"):
        flash_decode_rows(q[:, :, :4], k, v, torch.arange(3))


def test_decoder_verify_step_flash(tiny_hf):
    """The decoder with the flash backend scoring 6 tokens after a cached prefix (the verification
    forward): the same logits as SDPA."""
    ids = torch.randint(0, 128, (1, 26), generator=torch.Generator().manual_seed(8))
    out = {}
    for backend in ("sdpa", "flash"):
        model = Decoder.from_hf(tiny_hf).set_attention(backend)
        caches = static_caches(model, 1, 40)
        with torch.no_grad(), model.kv_caches_attached(caches):
            model(ids[:, :20], torch.arange(20))
            out[backend] = model(ids[:, 20:], torch.arange(20, 26))
    assert_rel_close(out["flash"], out["sdpa"], 1e-4, "verification logits, 'flash' vs 'sdpa'")
