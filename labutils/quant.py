"""Weight-only quantization for batch-1 decoding (notebook 04).

At batch 1 a linear layer's time is the time to read its weights (see labutils.gemv), so storing
them in fewer bytes should buy speed in proportion, provided they are dequantized *inside* the
matrix-vector product (in registers, never written back to memory). Three formats of a weight
W (N, K) in nn.Linear layout (N outputs, K inputs); scales are fp16 unless ``scale_dtype`` says:

=====  =====================================================================  ====================
INT8   symmetric per output channel: s = max|W[n]| / 127, q = round(W / s)   1 + 2/K bytes/weight
       in [-127, 127]; W ~ q s.                                              (~1.0; bf16 is 2)
INT4   asymmetric per group of G (128) along K: s = (max - min) / 15, zero    0.5 + 3/G
       z = round(-min / s) in [0, 15], q = clamp(round(W / s) + z, 0, 15);    (0.523 at G = 128)
       W ~ (q - z) s. fp16 s and uint8 z per group. The range is widened to
       contain 0 (as GPTQ does): z always fits and 0 is exact.
NF4    QLoRA's NormalFloat: 16 levels at quantiles of N(0, 1) scaled to      0.5 + 2/B
       [-1, 1] (exact 0), one absmax per block of B (64) along K:            (0.531 at B = 64;
       W ~ NF4_CODE[q] * absmax, q the nearest level.                         bitsandbytes: 0.5625,
                                                                              fp32 absmax)
=====  =====================================================================  ====================

4-bit codes are packed two per uint8 along K: byte j of a row holds element 2j in its *low* nibble
and element 2j + 1 in its *high* nibble (bitsandbytes puts the first element in the high nibble).
A last group / block shorter than G / B is allowed (K = 576 with G = 128: 4 x 128 + 64); K must be
even. Scales are rounded *up* to their storage dtype, so |W / s| never leaves the code range and
the error bounds are exact: |W - deq| <= s / 2 elementwise for INT8 and INT4.

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

Activation-aware scaling (AWQ-style, simplified): a few input channels carry large activations, and
errors in the weights they multiply cost the most. Scaling column k of W up by s_k (and x_k down by
s_k, the per-channel ``in_scale`` multiply inside the W4A16 kernel) gives those weights a finer
grid after quantization. ``awq_scales`` picks s = act_mean ** alpha per linear, alpha on a grid in
[0, 1) that minimises the output error on calibration activations; alpha = 0 is round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime

MAX_ROWS = 16  # activation rows the kernels take; more (prefill) dequantize and call F.linear

# QLoRA's NF4 levels, exactly as bitsandbytes (functional.get_4bit_type("nf4")) lists them.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


# ---- packing and helpers ----------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) codes in [0, 15] -> (..., K/2) uint8: element 2j in the low nibble, 2j+1 in the high."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 packs pairs along the last dimension; K={q.shape[-1]} is odd")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"4-bit codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 codes in [0, 15] (inverse of pack_int4)."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def _store_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive fp32 scales in ``dtype``, rounded up (never below s, never zero).

    Raises ValueError where a scale is not representable in ``dtype``: above its largest finite
    value (the codes would be 0 and dequantize to NaN) or, for a group that is not all zero, below
    its smallest subnormal (every code would round to zero). fp32 scales (``scale_dtype=torch.float32``)
    cover any finite fp32 weight."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    fi = torch.finfo(dtype)
    s = s.float()
    if not torch.isfinite(s).all():
        raise ValueError("the weight has non-finite values (inf or NaN), or a range that overflows fp32: "
                         "it cannot be quantized")
    smallest = fi.tiny * fi.eps  # the smallest subnormal
    if (s > fi.max).any():
        raise ValueError(f"a scale of {s.max().item():.3g} (weights up to ~{s.max().item() * 127:.3g}) does not "
                         f"fit scale_dtype={dtype} (max {fi.max:.3g}): pass scale_dtype=torch.float32")
    if ((s > 0) & (s < smallest)).any():
        tiny = s[s > 0].min().item()
        raise ValueError(f"a scale of {tiny:.3g} underflows scale_dtype={dtype} (smallest {smallest:.3g}), so every "
                         f"code would round to zero: pass scale_dtype=torch.float32 or rescale the weight")
    s = s.clamp_min(smallest)  # an all-zero row still divides
    st = s.to(dtype)
    bits = {2: torch.int16, 4: torch.int32}[st.element_size()]
    st = (st.view(bits) + (st.float() < s).to(bits)).view(dtype)  # +1 ulp where rounding went down
    if not torch.isfinite(st).all():  # rounding up past the largest finite value
        raise ValueError(f"a scale of {s.max().item():.3g} rounds up past the largest {dtype}: "
                         f"pass scale_dtype=torch.float32")
    return st


def _groups(W: torch.Tensor, size: int) -> torch.Tensor:
    """W (N, K) -> (N, ceil(K / size), size) fp32, the last group padded with zeros."""
    N, K = W.shape
    return F.pad(W.float(), (0, -K % size)).view(N, -1, size)


def _check(W: torch.Tensor, group: int | None = None):
    """A weight (N, K); for the 4-bit formats (``group`` given) K even and a usable group size."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor (N, K), got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a floating-point weight (N, K), got dtype {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"need a weight matrix (N, K), got shape {tuple(W.shape)}")
    if group is not None and W.shape[1] % 2:
        raise ValueError(f"4-bit formats pack two values per byte along K; K={W.shape[1]} is odd")
    if group is not None and (group < 32 or group & (group - 1)):
        raise ValueError(f"group / block size must be a power of two >= 32 (the kernels step through K "
                         f"in chunks that divide it), got {group}")


def _expand(t: torch.Tensor, size: int, K: int) -> torch.Tensor:
    """Per-group values (N, n_groups) -> per-element (N, K), fp32."""
    return t.float().repeat_interleave(size, dim=1)[:, :K]


# ---- formats ---------------------------------------------------------------------------------------
@dataclass
class _QWeight:
    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and zeros (the shared 64-byte NF4 table not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def meta(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not isinstance(getattr(self, f.name), torch.Tensor)}


@dataclass
class Int8Weight(_QWeight):
    q: torch.Tensor  # (N, K) int8 in [-127, 127]
    scale: torch.Tensor  # (N,) one per output row

    @property
    def shape(self):
        return tuple(self.q.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)  # (N, K)


class _Packed4(_QWeight):
    """Two 4-bit codes per byte along K: ``packed`` (N, K/2) uint8."""

    @property
    def shape(self):
        return (self.packed.shape[0], 2 * self.packed.shape[1])


@dataclass
class Int4Weight(_Packed4):
    packed: torch.Tensor  # (N, K/2) uint8, two codes per byte
    scale: torch.Tensor  # (N, ceil(K/G))
    zero: torch.Tensor  # (N, ceil(K/G)) uint8 in [0, 15]
    group_size: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        K, G = self.shape[1], self.group_size
        q = unpack_int4(self.packed).float()  # (N, K)
        return ((q - _expand(self.zero, G, K)) * _expand(self.scale, G, K)).to(dtype)


@dataclass
class NF4Weight(_Packed4):
    packed: torch.Tensor  # (N, K/2) uint8, two indices into NF4_CODE per byte
    absmax: torch.Tensor  # (N, ceil(K/B))
    block_size: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        K, B = self.shape[1], self.block_size
        code = NF4_CODE.to(self.packed.device)[unpack_int4(self.packed).long()]  # (N, K) in [-1, 1]
        return (code * _expand(self.absmax, B, K)).to(dtype)


@torch.no_grad()
def quantize_int8(W: torch.Tensor, scale_dtype=torch.float16) -> Int8Weight:
    """Symmetric per-output-channel INT8: |W - deq| <= scale[n] / 2 in row n."""
    _check(W)
    W = W.detach().float()
    s = _store_scale(W.abs().amax(dim=1) / 127, scale_dtype)  # (N,)
    q = torch.round(W / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, s)


@torch.no_grad()
def quantize_int4(W: torch.Tensor, group_size: int = 128, scale_dtype=torch.float16) -> Int4Weight:
    """Asymmetric INT4 per group of ``group_size`` along K: |W - deq| <= scale / 2 in each group."""
    _check(W, group_size)
    N, K = W.shape
    Wg = _groups(W.detach(), group_size)  # (N, n_groups, G); zero padding leaves [min, max] as it is
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)  # the range always contains 0
    s = _store_scale((hi - lo) / 15, scale_dtype)  # (N, n_groups)
    sf = s.float()
    z = torch.round(-lo / sf).clamp_(0, 15)  # (N, n_groups)
    q = (torch.round(Wg / sf[..., None]) + z[..., None]).clamp_(0, 15)
    return Int4Weight(pack_int4(q.view(N, -1)[:, :K]), s, z.to(torch.uint8), group_size)


@torch.no_grad()
def quantize_nf4(W: torch.Tensor, block_size: int = 64, scale_dtype=torch.float16) -> NF4Weight:
    """NF4 with an absmax per block of ``block_size`` along K: each value -> the nearest level."""
    _check(W, block_size)
    N, K = W.shape
    Wb = _groups(W.detach(), block_size)  # (N, n_blocks, B)
    absmax = _store_scale(Wb.abs().amax(-1), scale_dtype)  # (N, n_blocks)
    v = Wb / absmax.float()[..., None]  # in [-1, 1]
    code = NF4_CODE.to(W.device)
    q = torch.bucketize(v, (code[1:] + code[:-1]) / 2)  # index of the nearest level (midpoints split)
    return NF4Weight(pack_int4(q.view(N, -1)[:, :K]), absmax, block_size)


def quant_error(W: torch.Tensor, q: _QWeight) -> float:
    """||W - dequantize(q)||_F / ||W||_F, in float64."""
    W = W.detach().double()
    return ((W - q.dequantize(torch.float64)).norm() / W.norm().clamp_min(1e-300)).item()


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
             NF4: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr):
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
        w_even = (lo.to(tl.float32) - z) * s
        w_odd = (hi.to(tl.float32) - z) * s
    return w_even, w_odd, j, j_ok


@triton.autotune(configs=_configs(), key=["N", "K", "GROUP", "NF4"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, code_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, NG,
                  NF4: tl.constexpr, GROUP: tl.constexpr, HAS_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
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
        w_even, w_odd, j, j_ok = _w4_tile(p_rows, s_ptr, z_ptr, code_ptr, sz_rows, n_ok, k0, KH, NF4, GROUP, HALF)
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


@triton.autotune(configs=_gemv_configs(8), key=["N", "K", "GROUP", "NF4"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _w4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, xs_ptr, b_ptr, y_ptr, N, K, KW, NG,
                    NF4: tl.constexpr, GROUP: tl.constexpr, HAS_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) = deq(codes) (x * xs) + b for one row x (K,); the packed codes read as int32 words of 8
    (K % 8 == 0, KW = K / 8 words per row): INT4 (q - z) * s per group, or NF4 code[q] * absmax."""
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
        if not NF4:  # 2^23 + z: the magic constant and the zero point in one subtraction
            off = 8388608.0 + tl.load(z_ptr + sz, mask=sz_ok, other=0).to(tl.float32)
        part = tl.zeros((BLOCK_N, NGB, GW), dtype=tl.float32)
        for i in tl.static_range(8):  # code i of each word is element 8c + i (low nibble first)
            u = (words >> (4 * i)) & 0xF
            if NF4:
                w = tl.load(code_ptr + u)  # the 16-entry table, L1-resident
            else:
                w = (u | 0x4B000000).to(tl.float32, bitcast=True) - off[:, :, None]  # q - z, exactly
            x = tl.load(x_ptr + 8 * c + i, mask=c_ok, other=0.0).to(tl.float32)  # (NGB, GW)
            if HAS_XS:  # AWQ: x / s per input channel
                x *= tl.load(xs_ptr + 8 * c + i, mask=c_ok, other=0.0).to(tl.float32)
            part += w * x[None, :, :]
        acc += tl.sum(part, axis=2) * s  # one scale multiply per group
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


@triton.autotune(configs=_mma_configs(), key=["N", "K", "GROUP", "NF4"])
@triton.jit
def _w4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, KW, NG,
                   NF4: tl.constexpr, GROUP: tl.constexpr, HAS_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
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
        if not NF4:
            off = 8388608.0 + tl.load(z_ptr + sz, mask=wmask, other=0).to(tl.float32)  # 2^23 + z
        for i in tl.static_range(8):  # nibble i of word c is element 8c + i
            u = (words >> (4 * i)) & 0xF
            if NF4:
                w = tl.load(code_ptr + u) * s
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
    """F.linear(x * in_scale, deq, bias) with 4-bit codes: INT4 when ``zero`` is given, NF4 (``code``
    the 16-entry table, ``scale`` the absmax) otherwise. Triton for 1..16 rows, else F.linear."""
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
        _need(zero.dtype == torch.uint8 and tuple(zero.shape) == (N, NG), f"{op}: zero must be uint8 of shape "
              f"({N}, {NG}) like scale, got {zero.dtype} of shape {tuple(zero.shape)}")
    else:
        _need(code is not None and tuple(code.shape) == (16,) and code.is_floating_point(),
              f"{op}: NF4 (zero=None) needs code, the 16-entry float table NF4_CODE; got "
              f"{None if code is None else (code.dtype, tuple(code.shape))}")
    _check_vec(in_scale, "in_scale", K, op, "one per input feature")
    _check_vec(bias, "bias", N, op, "one per output")
    nf4 = zero is None
    if not 1 <= _rows(x) <= MAX_ROWS:
        W = (NF4Weight(packed, scale, group_size) if nf4 else Int4Weight(packed, scale, zero, group_size)).dequantize()
        return _fallback(x, W, in_scale, bias)
    dummy = scale
    packed = packed.contiguous()
    rest = (scale.contiguous(), dummy if nf4 else zero.contiguous(), code.float().contiguous() if nf4 else dummy,
            dummy if in_scale is None else in_scale.contiguous())
    meta = dict(NG=scale.shape[1], NF4=nf4, GROUP=group_size, HAS_XS=in_scale is not None)
    if K % 8 == 0 and group_size % 8 == 0:  # codes as int32 words: the GEMV for one row, else tensor cores
        kernel = _w4_gemv_kernel if _rows(x) == 1 else _w4_mma_kernel
        return _launch(kernel, x, N, (packed.view(torch.int32), *rest), bias, **meta)
    return _launch(_w4a16_kernel, x, N, (packed, *rest), bias, **meta)


@w4a16_linear.register_fake
def _(x, packed, scale, zero, code, in_scale, bias, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


# ---- modules for the linear-layer seam ------------------------------------------------------------------
def _act_scaled(W: torch.Tensor, act_scale: torch.Tensor | None, dtype):
    """AWQ: (W diag(s), in_scale) with in_scale = 1/s stored in ``dtype`` and s taken back from it, so
    that (W diag(s)) (x * in_scale) == W x up to rounding of the product only."""
    if act_scale is None:
        return W, None
    in_scale = (1.0 / act_scale.float()).to(dtype)  # (K,)
    return W.float() / in_scale.float()[None, :], in_scale


class _QuantLinear(nn.Module):
    """The packed tensors of a _QWeight as buffers (they follow .to(device) and state_dict), bias kept.

    Cast the model's dtype *before* quantizing: ``.to(dtype)`` would also cast the fp16 scales."""

    FORMAT: type = _QWeight

    def __init__(self, qw: _QWeight, bias: torch.Tensor | None = None, in_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self._meta = qw.meta()
        for name, t in qw.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("in_scale", in_scale)  # (K,) or None: the input's per-channel multiply (AWQ)
        self.bias = bias  # the nn.Linear's own Parameter (or None), shared

    @staticmethod
    def quantize(W, **kw) -> _QWeight:
        raise NotImplementedError

    @property
    def qweight(self) -> _QWeight:
        return self.FORMAT(**{f.name: getattr(self, f.name) if f.name not in self._meta else self._meta[f.name]
                              for f in fields(self.FORMAT)})

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_scale: torch.Tensor | None = None, scale_dtype=torch.float16, **kw):
        """Quantize ``linear`` (bias kept); ``act_scale`` (K,): AWQ scales from awq_scales."""
        W, in_scale = _act_scaled(linear.weight.detach(), act_scale, scale_dtype)
        return cls(cls.quantize(W, scale_dtype=scale_dtype, **kw), linear.bias, in_scale)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The effective weight (N, K): forward(x) == F.linear(x, this, bias) up to rounding."""
        W = self.qweight.dequantize()
        if self.in_scale is not None:
            W = W * self.in_scale.float()[None, :]
        return W.to(dtype)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + (0 if self.in_scale is None else self.in_scale.numel() * self.in_scale.element_size())

    def extra_repr(self):
        meta = "".join(f", {k}={v}" for k, v in self._meta.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}{meta}, "
                f"bias={self.bias is not None}, awq={self.in_scale is not None}")


class Int8Linear(_QuantLinear):
    FORMAT = Int8Weight
    quantize = staticmethod(quantize_int8)

    @classmethod
    def from_linear(cls, linear, act_scale=None, **kw):
        if act_scale is not None:
            raise ValueError("activation-aware scaling is implemented for the 4-bit formats only")
        return super().from_linear(linear, **kw)

    def forward(self, x):
        return torch.ops.labutils.w8a16_linear(x, self.q, self.scale, self.bias)


class Int4Linear(_QuantLinear):
    FORMAT = Int4Weight
    quantize = staticmethod(quantize_int4)

    def forward(self, x):
        return torch.ops.labutils.w4a16_linear(x, self.packed, self.scale, self.zero, None, self.in_scale,
                                                self.bias, self._meta["group_size"])


class NF4Linear(_QuantLinear):
    FORMAT = NF4Weight
    quantize = staticmethod(quantize_nf4)

    def __init__(self, qw, bias=None, in_scale=None):
        super().__init__(qw, bias, in_scale)
        self.register_buffer("code", NF4_CODE.to(qw.packed.device), persistent=False)

    def forward(self, x):
        return torch.ops.labutils.w4a16_linear(x, self.packed, self.absmax, None, self.code, self.in_scale,
                                                self.bias, self._meta["block_size"])


FORMATS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


def _swappable(model: nn.Module) -> dict:
    """name -> nn.Linear that the seam would hand over: all but one tied to an embedding table."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in tied}


def quantize_model(model, fmt: str, *, awq: dict | None = None, simulate: bool = False, **kw):
    """Replace the model's linear layers (through ``model.swap_linears``) by quantized ones.

    fmt: 'int8', 'int4' or 'nf4'; kw go to the quantizer (``group_size`` for int4, ``block_size`` for
    nf4, ``scale_dtype``). ``awq``: name -> scales from awq_scales (4-bit formats). ``simulate``: put
    plain nn.Linear layers holding the dequantized weights instead (same arithmetic, no kernels:
    for quality measurements where the kernels would be slow, e.g. the CPU interpreter).
    A tied lm_head is left alone by the seam. Returns the model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    cls = FORMATS[fmt]

    def make(name, linear):
        q = cls.from_linear(linear, act_scale=None if awq is None else awq.get(name), **kw)
        if not simulate:
            return q
        sim = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
        sim.weight = nn.Parameter(q.dequantize(linear.weight.dtype), requires_grad=False)
        sim.bias = linear.bias
        return sim

    return model.swap_linears(make)


# ---- activation-aware scaling (AWQ-style) ------------------------------------------------------------------
def _quantizer(fmt: str, kw: dict):
    if fmt == "int4":
        return lambda W: quantize_int4(W, **kw)
    if fmt == "nf4":
        return lambda W: quantize_nf4(W, **kw)
    raise ValueError(f"activation-aware scaling covers the 4-bit formats 'int4' and 'nf4', not {fmt!r}")


@torch.no_grad()
def awq_search(W: torch.Tensor, X: torch.Tensor, act_mean: torch.Tensor, fmt: str = "int4", n_grid: int = 20,
               scale_dtype=torch.float16, **kw):
    """Best per-input-channel scale for one linear W (N, K) on calibration inputs X (rows, K).

    Tries s = act_mean ** alpha for alpha in 0, 1/n_grid, .., (n_grid - 1)/n_grid (normalised so that
    max(s) min(s) = 1), quantizes W diag(s), and keeps the s with the smallest mean squared output
    error ||X W_eff^T - X W^T||^2 / numel, W_eff = deq(Q(W diag(s))) diag(1/s) as the module applies
    it. alpha = 0 is plain round-to-nearest, so the result is never worse than it on X.
    Returns (s (K,), info) with info = {'alpha', 'err_rtn', 'err'}.
    """
    quantize = _quantizer(fmt, dict(kw, scale_dtype=scale_dtype))
    _check(W)
    K = W.shape[1]
    if X.dim() != 2 or X.shape[1] != K or not X.is_floating_point():
        raise ValueError(f"awq_search: X must be floating calibration inputs (rows, {K}), got {X.dtype} of "
                         f"shape {tuple(X.shape)}")
    if tuple(act_mean.shape) != (K,):
        raise ValueError(f"awq_search: act_mean must have shape ({K},) (mean |x| per input channel), got "
                         f"{tuple(act_mean.shape)}")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"awq_search: n_grid must be a positive int, got {n_grid!r}")
    W, X = W.detach().float(), X.float()
    Y = X @ W.T  # (rows, N)
    a = act_mean.float().clamp_min(1e-4)
    best = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Ws, in_scale = _act_scaled(W, s, scale_dtype)
        W_eff = quantize(Ws).dequantize() * in_scale.float()[None, :]
        err = (X @ W_eff.T - Y).pow(2).mean().item()
        if i == 0:
            err_rtn = err
        if best is None or err < best[0]:
            best = (err, alpha, 1.0 / in_scale.float())
    return best[2], {"alpha": best[1], "err_rtn": err_rtn, "err": best[0]}


@torch.no_grad()
def awq_scales(model, calib_ids: torch.Tensor, fmt: str = "int4", *, n_grid: int = 20, max_rows: int = 512,
               return_info: bool = False, progress: bool = True, seed: int = 0, **kw):
    """AWQ-style scales for every linear the seam would quantize, from calibration token ids.

    calib_ids (B, T): calibration text (never the evaluation text), run one sequence at a time.
    Hooks record each linear's inputs: the mean |x| per input channel over all tokens, and up to
    ``max_rows`` token rows (a seeded random subset) on which awq_search measures the output error.
    kw: ``group_size`` / ``block_size``, ``scale_dtype``, as for quantize_model. Returns name -> s (K,)
    for ``quantize_model(model, fmt, awq=...)``, and with ``return_info`` also name -> awq_search info.
    Simplifications against AWQ: each linear gets its own s (applied inside the kernel, nothing is
    folded into the previous layer), no weight-clipping search, activations from the unquantized model.
    """
    from tqdm.auto import tqdm

    calib_ids = calib_ids.reshape(-1, calib_ids.shape[-1]) if calib_ids.dim() > 1 else calib_ids[None]
    B, T = calib_ids.shape
    per_seq = -(-max_rows // B)
    gen = torch.Generator().manual_seed(seed)
    linears = _swappable(model)
    stats = {name: {"sum": 0.0, "n": 0, "rows": []} for name in linears}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            st = stats[name]
            st["sum"] = st["sum"] + x.abs().sum(0)
            st["n"] += x.shape[0]
            st["rows"].append(x[torch.randperm(x.shape[0], generator=gen)[:per_seq].to(x.device)])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        dev = next(model.parameters()).device
        for b in range(B):
            model(calib_ids[b : b + 1].to(dev))
    finally:
        for h in handles:
            h.remove()
    scales, info = {}, {}
    for name in tqdm(linears, desc="AWQ search", disable=not progress):
        st = stats[name]
        X = torch.cat(st["rows"])[:max_rows]
        scales[name], info[name] = awq_search(linears[name].weight, X, st["sum"] / st["n"], fmt, n_grid, **kw)
    return (scales, info) if return_info else scales
