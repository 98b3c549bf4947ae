"""W8A16 / W4A16 / NF4 products in Triton (notebook 04): the weight-only quantized formats of
labutils.quant_formats multiplied without dequantizing them to memory.

Kernels (Triton, one program per BLOCK_N output rows, streaming the packed weights along K in
BLOCK_K chunks, fp32 accumulation), INT4 and NF4 sharing one kernel by a constexpr switch (NF4 looks
its codes up in the 16-entry table):

- one activation row (decode), ``_w8_gemv_kernel`` / ``_w4_gemv_kernel``: the codes read as int32
  words and unpacked with shifts, converted to floats by the magic-number trick instead of the slow
  integer-to-float unit, 4-bit chunks spanning whole groups with one scale multiply per group
  (see the comment above them); K % 4 == 0 (INT8) or K % 8 == 0 (4-bit);
- 2 to 16 rows (and single rows of other K), ``_w8a16_kernel`` / ``_w4a16_kernel``: all rows sit in
  one (16, BLOCK_K) tile that meets the dequantized weight tile in ``tl.dot``, so each program still
  reads its weights once; a 4-bit chunk never straddles a group (G % BLOCK_K == 0). Custom ops ``labutils::w8a16_linear`` / ``labutils::w4a16_linear`` wrap
them for torch.compile and CUDA graphs; more than 16 rows (prefill) dequantize and call F.linear.

``_launch`` runs any of them on x (..., K) with 1 to 16 rows; the custom ops send other row counts to
F.linear on the dequantized weight (``_fallback``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import runtime
from ..quant_formats import Int4Weight, Int8Weight, NF4Weight

MAX_ROWS = 16  # activation rows the kernels take; more (prefill) dequantize and call F.linear


# ---- Triton kernels -----------------------------------------------------------------------------------
def _configs():
    if runtime.triton_interpreted():  # one configuration: chunks smaller than a group, partial tiles
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    # 2-16 rows (single rows go to the GEMV kernels below, unless K does not split into words).
    # Each tiling is a compile of ~1 s on the GPU machine per dtype and constexpr combination, so the
    # list stays short; BLOCK_N >= 16 for tl.dot.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=st)
            for bn, bk, st in [(16, 64, 3), (16, 128, 3), (32, 64, 2), (32, 128, 3)]]


def _prune(configs, named_args, **kwargs):
    """4-bit chunks must not straddle groups (GROUP % BLOCK_K == 0)."""
    group = {**named_args, **kwargs}.get("GROUP", 0)
    keep = [c for c in configs if not group or group % c.kwargs["BLOCK_K"] == 0]
    return keep or configs[:1]


@triton.autotune(configs=_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w8a16_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (M, N) = x (M, K) @ (q (N, K) int8 * s (N,))^T + b, for M <= BLOCK_M rows (rows past M masked)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    n_ok = rn < N
    w_rows = q_ptr + rn.to(tl.int64)[:, None] * K  # (BLOCK_N, 1)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # one activation tile per chunk, weights read once
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        out = tl.dot(x, tl.trans(w.to(x.dtype)), out, input_precision=DOT_PREC)  # int8 -> fp16/bf16 exact
    out = out * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]  # per-row scale, once
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w4_tile(p_rows, s_ptr, z_ptr, code_ptr, sz_rows, n_ok, k0, KH,
             NF4: tl.constexpr, FOFF: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr):
    """Dequantize the 2 * HALF weights from k0 of BLOCK_N rows: (w_even, w_odd), each (BLOCK_N, HALF)
    fp32 (elements k0 + 2i and k0 + 2i + 1), plus the byte indices j (HALF,) and their mask."""
    j = k0 // 2 + tl.arange(0, HALF)  # bytes; byte j holds elements 2j (low nibble) and 2j + 1 (high)
    j_ok = j < KH
    b = tl.load(p_rows + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0)  # (BLOCK_N, HALF) uint8
    lo, hi = (b & 0xF).to(tl.int32), (b >> 4).to(tl.int32)
    g = k0 // GROUP  # the chunk lies inside one group
    s = tl.load(s_ptr + sz_rows + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]  # (BLOCK_N, 1)
    if NF4:
        w_even = tl.load(code_ptr + lo) * s  # 16-entry table, L1-resident
        w_odd = tl.load(code_ptr + hi) * s
    else:
        z = tl.load(z_ptr + sz_rows + g, mask=n_ok, other=0).to(tl.float32)[:, None]
        if FOFF:  # a float offset: q s + m
            w_even = lo.to(tl.float32) * s + z
            w_odd = hi.to(tl.float32) * s + z
        else:  # an integer zero point: (q - z) s
            w_even = (lo.to(tl.float32) - z) * s
            w_odd = (hi.to(tl.float32) - z) * s
    return w_even, w_odd, j, j_ok


@triton.autotune(configs=_configs(), key=["N", "K", "GROUP", "NF4", "FOFF"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, code_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, NG,
                  NF4: tl.constexpr, FOFF: tl.constexpr, GROUP: tl.constexpr, HAS_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (M, N) = (x * xs) (M, K) @ deq(p (N, K/2), s (N, NG), z or code)^T + b; 4-bit codes, M <= BLOCK_M."""
    HALF: tl.constexpr = BLOCK_K // 2
    KH = K // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_ok = rn < N
    p_rows = p_ptr + rn.to(tl.int64)[:, None] * KH  # (BLOCK_N, 1)
    sz_rows = rn * NG  # (BLOCK_N,) offsets of each row's scales / zeros
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_even, w_odd, j, j_ok = _w4_tile(p_rows, s_ptr, z_ptr, code_ptr, sz_rows, n_ok, k0, KH, NF4, FOFF, GROUP, HALF)
        mask = m_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * K + 2 * j[None, :], mask=mask, other=0.0)  # (BLOCK_M, HALF)
        x_odd = tl.load(x_ptr + rm[:, None] * K + 2 * j[None, :] + 1, mask=mask, other=0.0)
        if HAS_XS:  # AWQ: x / s, one multiply per input channel
            xs_even = tl.load(xs_ptr + 2 * j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
            xs_odd = tl.load(xs_ptr + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)[None, :]
            x_even = (x_even.to(tl.float32) * xs_even).to(x_ptr.dtype.element_ty)
            x_odd = (x_odd.to(tl.float32) * xs_odd).to(x_ptr.dtype.element_ty)
        out = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), out, input_precision=DOT_PREC)
        out = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), out, input_precision=DOT_PREC)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---- one activation row (decode): GEMV kernels on 32-bit words -------------------------------------------
# At batch 1 a layer is a pass over its packed weights, and that pass must run at memory speed. Two
# things stand in the way besides tile sizes (chunks of 512-2048 codes per row keep enough bytes in
# flight): the conversion of each code to a float, and the per-element bookkeeping of 4-bit groups.
#
# - Integer-to-float conversion (I2F) runs at a fraction of the FP32 rate on Hopper, and a 7B layer
#   converts tens of millions of codes. The *magic-number* trick avoids it: OR-ing a code c < 2^23
#   into the mantissa of 2^23 (bits 0x4B000000) gives the float 2^23 + c exactly, and one FP32
#   subtraction leaves c. For signed INT8, (byte XOR 0x80) is c + 128, so subtract 2^23 + 128.
# - The codes are read as int32 words (4 INT8 codes, 8 INT4 codes) and taken apart with shifts and
#   masks, one static step per code position; each step meets the matching strided slice of x
#   (L1-resident). A 4-bit chunk spans whole groups: the INT4 zero point is folded into the
#   subtraction constant (2^23 + z), and the group's scale multiplies the group's partial dot product
#   once, after the sum over its codes, instead of every element.
# Each thread loads its words as 16-byte vectors only if Triton can prove that rows start 16-byte
# aligned. It knows one fact per integer argument (divisible by 16 or not), so the word count per row
# is passed as an argument of its own: K // 8 computed inside would be known only to be even, and the
# INT4 loads would shrink to 8 bytes. tests/test_quant.py compiles the kernels for sm_90 on the CPU
# and checks the PTX for those vector loads and for the absence of int-to-float conversions. Open question
# for the GPU: the x values meet the codes as strided scalar loads (one per code, L1-resident);
# if they limit the kernel, an interleaved packing (code i of word w = element i * GW + w of its group)
# would make them contiguous.
def _gemv_configs(word_codes: int):
    if runtime.triton_interpreted():  # small: the interpreter is exact but slow
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": bk}, num_warps=1) for bk in (64, 256, 512)]
    # Untimed guesses (2026-11-23): 2-8 KiB of codes per row block and chunk, as the bf16 GEMV of
    # labutils.gemv needed to stream at ~2.5-3 TB/s; to be narrowed by a sweep on the GPU.
    if word_codes == 4:  # INT8
        tiles = [(4, 1024, 4), (4, 2048, 4), (8, 1024, 4), (8, 2048, 8), (16, 512, 4), (16, 1024, 8)]
    else:  # 4-bit; BLOCK_K a multiple of the group
        tiles = [(4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in tiles]


def _prune_gemv(configs, named_args, **kwargs):
    """A 4-bit chunk holds whole groups (BLOCK_K % GROUP == 0); the interpreter runs the smallest fit."""
    group = {**named_args, **kwargs}.get("GROUP", 1)
    keep = [c for c in configs if c.kwargs["BLOCK_K"] % group == 0]
    if not keep:  # a group larger than every chunk: one chunk per group
        keep = [triton.Config({**configs[0].kwargs, "BLOCK_K": group}, num_warps=configs[0].num_warps)]
    return keep[:1] if runtime.triton_interpreted() else keep


@triton.autotune(configs=_gemv_configs(4), key=["N", "K"], prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _w8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, KW,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) = (q * s[:, None]) x + b for one row x (K,); q (N, K) int8 read as KW = K / 4 int32 words."""
    BW: tl.constexpr = BLOCK_K // 4  # words per row and chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW  # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 // 4 + tl.arange(0, BW)  # (BW,) word index along the row
        c_ok = c < KW
        words = tl.load(w_rows + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0)  # (BLOCK_N, BW) int32
        for i in tl.static_range(4):  # code i of each word is element 4c + i
            u = (words >> (8 * i)) & 0xFF  # the code's byte: c + 256 if c < 0
            w = ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # (2^23 + c + 128) - (2^23 + 128)
            x = tl.load(x_ptr + 4 * c + i, mask=c_ok, other=0.0).to(tl.float32)  # (BW,)
            acc += w * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.autotune(configs=_gemv_configs(8), key=["N", "K", "GROUP", "NF4", "FOFF"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _w4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, xs_ptr, b_ptr, y_ptr, N, K, KW, NG,
                    NF4: tl.constexpr, FOFF: tl.constexpr, GROUP: tl.constexpr, HAS_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) = deq(codes) (x * xs) + b for one row x (K,); the packed codes read as int32 words of 8
    (K % 8 == 0, KW = K / 8 words per row): INT4 (q - z) * s per group (FOFF: q * s + m, the offset
    m times the group's sum of x added once), or NF4 code[q] * absmax."""
    GW: tl.constexpr = GROUP // 8  # words per group
    NGB: tl.constexpr = BLOCK_K // GROUP  # groups per chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * KW  # (BLOCK_N, 1, 1)
    acc = tl.zeros((BLOCK_N, NGB), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP + tl.arange(0, NGB)  # (NGB,) the groups of this chunk
        c = g[:, None] * GW + tl.arange(0, GW)[None, :]  # (NGB, GW) word index along the row
        c_ok = c < KW  # a last group may be short
        words = tl.load(w_rows + c[None, :, :], mask=n_ok[:, None, None] & c_ok[None, :, :], other=0)
        sz = rn[:, None] * NG + g[None, :]  # (BLOCK_N, NGB) this row's scale (and zero) of each group
        sz_ok = n_ok[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)
        if FOFF:  # the offset m: added once per group, times the group's sum of x
            m = tl.load(z_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)
            xsum = tl.zeros((NGB, GW), dtype=tl.float32)
            off = tl.full((BLOCK_N, NGB), 8388608.0, tl.float32)  # 2^23: the codes themselves
        elif not NF4:  # 2^23 + z: the magic constant and the zero point in one subtraction
            off = 8388608.0 + tl.load(z_ptr + sz, mask=sz_ok, other=0).to(tl.float32)
        part = tl.zeros((BLOCK_N, NGB, GW), dtype=tl.float32)
        for i in tl.static_range(8):  # code i of each word is element 8c + i (low nibble first)
            u = (words >> (4 * i)) & 0xF
            if NF4:
                w = tl.load(code_ptr + u)  # the 16-entry table, L1-resident
            else:
                w = (u | 0x4B000000).to(tl.float32, bitcast=True) - off[:, :, None]  # q - z (or q), exactly
            x = tl.load(x_ptr + 8 * c + i, mask=c_ok, other=0.0).to(tl.float32)  # (NGB, GW)
            if HAS_XS:  # AWQ: x / s per input channel
                x *= tl.load(xs_ptr + 8 * c + i, mask=c_ok, other=0.0).to(tl.float32)
            part += w * x[None, :, :]
            if FOFF:
                xsum += x
        acc += tl.sum(part, axis=2) * s  # one scale multiply per group
        if FOFF:
            acc += tl.sum(xsum, axis=1)[None, :] * m
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# ---- 2 to 16 activation rows (small batches, speculative verification): words and tensor cores ----------
# The byte-tile kernel above converts every code with an integer-to-float instruction and splits
# bytes into even and odd halves; at 16 rows of the 3584 -> 18944 layer it took 2x cuBLAS's time
# (H100, 2026-11-23). This one reads the codes as int32 words like the GEMV, turns each nibble
# into a float with the magic number, applies its group's scale, and hands the (BLOCK_N, BW) tile of
# nibble position i (elements 8c + i) to tl.dot with the matching strided columns of x: eight
# products of depth BW = BLOCK_K / 8 per chunk, all accumulating into one (BLOCK_M, BLOCK_N) tile.
# The dequantization is paid once per code for all rows; the multiply-adds go to the tensor cores.
# Measured (H200, CUDA graphs, scripts/probes/probe_quant6.py): better than the byte tile on three
# of the four Qwen2.5-7B projections (down_proj at 16 rows 219 us against 349, o_proj 42 against 63)
# but not on up_proj at 1-8 rows (74-79 us against 52-65), and every 4-bit kernel at 2-16 rows is
# still 1.7-4.7x slower than cuBLAS bf16 (~45 us on the two MLP shapes): far from the ~12 us the
# bytes allow. Open: too few programs on down_proj (N = 3584 in tiles of 32 rows is 112 programs
# for 132 SMs; split-K would help), and the dequantized tile's trip through shared memory into the
# operand layout. The weights are tl.dot's left operand (y^T = W x^T): that beat making them the
# right operand (y = x W^T) by 0-20% (probe 6, both runs).
def _mma_configs():
    if runtime.triton_interpreted():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=1)]
    # Untimed guesses (2026-11-30), BW = BLOCK_K / 8 >= 16 for tl.dot.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in [(16, 256, 4, 3), (32, 256, 4, 3), (32, 512, 4, 3), (64, 256, 4, 3),
                                  (64, 512, 8, 3), (16, 512, 4, 4)]]


@triton.autotune(configs=_mma_configs(), key=["N", "K", "GROUP", "NF4", "FOFF"])
@triton.jit
def _w4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, KW, NG,
                   NF4: tl.constexpr, FOFF: tl.constexpr, GROUP: tl.constexpr, HAS_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (M, N) = (x * xs) (M, K) @ deq(codes)^T + b, M <= BLOCK_M; codes as KW = K / 8 int32 words per
    row (K % 8 == 0, GROUP % 8 == 0): INT4 (q - z) * s per group, or NF4 code[q] * absmax."""
    GW: tl.constexpr = GROUP // 8  # words per group
    BW: tl.constexpr = BLOCK_K // 8  # words per row and chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW  # (BLOCK_N, 1)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * K  # (BLOCK_M, 1)
    out = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T = W x^T: the dequantized tile is the left operand
    for k0 in range(0, K, BLOCK_K):
        c = k0 // 8 + tl.arange(0, BW)  # (BW,) word index along the row
        c_ok = c < KW
        wmask = n_ok[:, None] & c_ok[None, :]
        words = tl.load(w_rows + c[None, :], mask=wmask, other=0)  # (BLOCK_N, BW) int32
        sz = rn[:, None] * NG + (c // GW)[None, :]  # each word's group: its scale (and zero point)
        s = tl.load(s_ptr + sz, mask=wmask, other=0.0).to(tl.float32)
        if FOFF:
            m = tl.load(z_ptr + sz, mask=wmask, other=0.0).to(tl.float32)  # the offset of each word's group
        elif not NF4:
            off = 8388608.0 + tl.load(z_ptr + sz, mask=wmask, other=0).to(tl.float32)  # 2^23 + z
        for i in tl.static_range(8):  # nibble i of word c is element 8c + i
            u = (words >> (4 * i)) & 0xF
            if NF4:
                w = tl.load(code_ptr + u) * s
            elif FOFF:
                w = ((u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * s + m  # q s + m
            else:
                w = ((u | 0x4B000000).to(tl.float32, bitcast=True) - off) * s  # (q - z) s
            x = tl.load(x_rows + 8 * c[None, :] + i, mask=m_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_M, BW)
            if HAS_XS:
                x = (x.to(tl.float32) * tl.load(xs_ptr + 8 * c + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                     ).to(x_ptr.dtype.element_ty)
            out = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), out, input_precision=DOT_PREC)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :] * N + rn[:, None], out.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _launch(kernel, x, N, args, bias, **meta):
    """Run ``kernel`` on x (..., K) with 1..16 rows -> (..., N) in x's dtype. The GEMV kernels take
    one row and no row count; the tile kernels take M and their tile height; the word-wise kernels
    (codes as int32 words in args[0]) also take the words per row, KW."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    b = bias if bias is not None else y
    words = (args[0].shape[1],) if kernel in (_w8_gemv_kernel, _w4_gemv_kernel, _w4_mma_kernel) else ()  # KW
    if kernel in (_w8_gemv_kernel, _w4_gemv_kernel):
        kernel[grid](x2, *args, b, y, N, K, *words, **meta, HAS_BIAS=bias is not None)
    else:
        kernel[grid](x2, *args, b, y, M, N, K, *words, **meta, HAS_BIAS=bias is not None,
                     BLOCK_M=MAX_ROWS, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")
    return y.reshape(*x.shape[:-1], N)


def _need(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(msg)


def _check_x(x: torch.Tensor, K: int, op: str):
    _need(isinstance(x, torch.Tensor) and x.is_floating_point(),
          f"{op}: x must be a floating-point tensor (fp16, bf16 or fp32), got "
          f"{getattr(x, 'dtype', type(x).__name__)}; convert integer activations with x.float()", TypeError)
    _need(x.dim() >= 1 and x.shape[-1] == K,
          f"{op}: x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}), the weight {K}")


def _check_vec(t, name: str, length: int, op: str, what: str):
    if t is None:
        return
    _need(t.is_floating_point(), f"{op}: {name} must be floating point, got {t.dtype}", TypeError)
    _need(tuple(t.shape) == (length,), f"{op}: {name} must have shape ({length},) ({what}), got {tuple(t.shape)}")


def _fallback(x, W, in_scale, bias):
    if in_scale is not None:
        x = (x.float() * in_scale.float()).to(x.dtype)
    return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("labutils::w8a16_linear", mutates_args=())
def w8a16_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, q * scale[:, None], bias) for INT8 q (N, K): Triton for 1..16 rows, else F.linear."""
    op = "w8a16_linear"
    _need(q.dtype == torch.int8 and q.dim() == 2,
          f"{op}: q must be int8 codes (N, K), got {q.dtype} of shape {tuple(q.shape)}")
    N, K = q.shape
    _check_x(x, K, op)
    _check_vec(scale, "scale", N, op, "one per output row of q")
    _check_vec(bias, "bias", N, op, "one per output")
    if not 1 <= _rows(x) <= MAX_ROWS:
        return _fallback(x, Int8Weight(q, scale).dequantize(), None, bias)
    q = q.contiguous()
    if _rows(x) == 1 and q.shape[1] % 4 == 0:  # decode: the word-wise GEMV
        return _launch(_w8_gemv_kernel, x, q.shape[0], (q.view(torch.int32), scale.contiguous()), bias)
    return _launch(_w8a16_kernel, x, q.shape[0], (q, scale.contiguous()), bias)


@w8a16_linear.register_fake
def _(x, q, scale, bias=None):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("labutils::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 code: torch.Tensor | None, in_scale: torch.Tensor | None, bias: torch.Tensor | None,
                 group_size: int) -> torch.Tensor:
    """F.linear(x * in_scale, deq, bias) with 4-bit codes: INT4 when ``zero`` is given, uint8 zero
    points z (W ~ (q - z) s) or floating-point offsets m (W ~ q s + m); NF4 (``code`` the 16-entry
    table, ``scale`` the absmax) otherwise. Triton for 1..16 rows, else F.linear."""
    op = "w4a16_linear"
    _need(packed.dtype == torch.uint8 and packed.dim() == 2,
          f"{op}: packed must be uint8 (N, K/2), got {packed.dtype} of shape {tuple(packed.shape)}")
    N, K = packed.shape[0], 2 * packed.shape[1]
    _check_x(x, K, op)
    _need(isinstance(group_size, int) and group_size >= 8 and group_size % 2 == 0,
          f"{op}: group_size must be an even int >= 8 (the quantizer's group / block size), got {group_size!r}")
    NG = -(-K // group_size)
    _need(scale.is_floating_point(), f"{op}: scale must be floating point, got {scale.dtype}", TypeError)
    _need(tuple(scale.shape) == (N, NG), f"{op}: scale must have shape (N, ceil(K/group_size)) = ({N}, {NG}) "
          f"for K={K}, group_size={group_size}, got {tuple(scale.shape)}")
    if zero is not None:
        _need((zero.dtype == torch.uint8 or zero.is_floating_point()) and tuple(zero.shape) == (N, NG),
              f"{op}: zero must be uint8 (zero points) or floating point (offsets) of shape ({N}, {NG}) like "
              f"scale, got {zero.dtype} of shape {tuple(zero.shape)}")
    else:
        _need(code is not None and tuple(code.shape) == (16,) and code.is_floating_point(),
              f"{op}: NF4 (zero=None) needs code, the 16-entry float table NF4_CODE; got "
              f"{None if code is None else (code.dtype, tuple(code.shape))}")
    _check_vec(in_scale, "in_scale", K, op, "one per input feature")
    _check_vec(bias, "bias", N, op, "one per output")
    nf4 = zero is None
    foff = not nf4 and zero.is_floating_point()
    if not 1 <= _rows(x) <= MAX_ROWS:
        W = (NF4Weight(packed, scale, group_size) if nf4 else Int4Weight(packed, scale, None, group_size, offset=zero)
             if foff else Int4Weight(packed, scale, zero, group_size)).dequantize()
        return _fallback(x, W, in_scale, bias)
    dummy = scale
    packed = packed.contiguous()
    rest = (scale.contiguous(), dummy if nf4 else zero.contiguous(), code.float().contiguous() if nf4 else dummy,
            dummy if in_scale is None else in_scale.contiguous())
    meta = dict(NG=scale.shape[1], NF4=nf4, FOFF=foff, GROUP=group_size, HAS_XS=in_scale is not None)
    if K % 8 == 0 and group_size % 8 == 0:  # codes as int32 words: the GEMV for one row, else tensor cores
        kernel = _w4_gemv_kernel if _rows(x) == 1 else _w4_mma_kernel
        return _launch(kernel, x, N, (packed.view(torch.int32), *rest), bias, **meta)
    return _launch(_w4a16_kernel, x, N, (packed, *rest), bias, **meta)


@w4a16_linear.register_fake
def _(x, packed, scale, zero, code, in_scale, bias, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])

