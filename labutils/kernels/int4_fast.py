"""Weight-only INT4 / INT8 kernels for 1 to 16 activation rows, in an offline re-layout built for them.

The formats are those of labutils.quant (INT4: asymmetric, group of G along K, fp16 scale s and
integer zero z per group, W ~ (q - z) s; INT8: symmetric, fp16 scale per output row, W ~ q s);
only the storage order changes, so a packed weight dequantizes to exactly the same numbers.

Layout (``pack_int4`` / ``pack_int8``)
  codes as int32 words, (N, K / 8) for INT4 and (N, K / 4) for INT8, *interleaved* in blocks of
  IW words: position i of word j of a block holds element  block * (P * IW) + i * IW + j
  (P = 8 nibbles or 4 bytes per word). One 16-byte load brings 4 words of a row, and the P
  shift-and-mask steps over them each meet IW-long *contiguous* runs of x, so x arrives in vector
  loads instead of one scalar load per code (labutils.quant's GEMV reads x[8c + i], strided).
  INT4 blocks are min(G, 128) codes (IW = 16 words at G >= 128), inside one group; the group's
  scale and zero share one int32 (low half: the fp16 scale's bits, high half: z), group-major
  (NG, N), so a tile of rows reads its scales contiguously. K % G == 0 is required.

Dequantization (``deq`` = DEQ constexpr), all exact:
  "int"    (q >> 4i) & 15 converted by the int-to-float unit (the plain way, for comparison);
  "magic"  the code OR'd into the mantissa of 2^23 (0x4B000000), bitcast, minus 2^23 + z: one FADD;
  "one"    the code placed in the *top* mantissa bits of 1.0 (bits 19-22 in fp32): w' = 1 + q/16
           exactly, with no subtraction at all: the FMA uses w' directly, and since
           sum q x = 16 (sum w' x - sum x), the group's result is 16 s sum(w' x) - (16 + z) s sum(x),
           where sum(x) per group is shared by every row (computed once per program and chunk).
           Per code this is a shift, one LOP3 (mask | exponent) and the FMA: 3 instructions,
           against 4 for "magic" and more for "int". INT8 uses bits 15-22 and the byte XOR 0x80.
  "after"  (tile kernel) the same 1 + q/16 built directly in the activation dtype (fp16: bits 6-9
           of 0x3C00, bf16: bits 3-6 of 0x3F80, exact in both), multiplied on the tensor cores
           *unscaled*; each chunk's partial product is scaled once per output (the chunk lies in
           one group) and corrected with the chunk's sum of x: no per-code float arithmetic.
  (fp16's 0x6400 magic number of FasterTransformer / Marlin works on *pairs* of codes packed in one
  register with half2 arithmetic; Triton gives no handle on half2 registers, so it is not here.)

Kernels
  ``_i4_gemv_kernel`` / ``_i8_gemv_kernel``: one row, CUDA-core FMAs in fp32, a program owns
  BLOCK_N output rows and streams BLOCK_K codes per row per step; partial products stay
  elementwise in registers across the K loop and are reduced once at the end.
  ``_i4_mma_kernel`` / ``_i8_mma_kernel``: 1-16 rows padded to 16, the dequantized (BLOCK_N,
  BLOCK_K) weight tile is tl.dot's left operand (y^T = W x^T). JOIN=True builds one tile from the
  P position tiles with tl.join (in-thread, no shuffles) and permutes x to match (a dot does not
  care about the order of K); JOIN=False runs P dots of depth BLOCK_K / P, one per position.
  SPLIT_K > 1 (grid axis 1): each program takes a run of whole chunks and writes an fp32 partial
  to a workspace, summed in a fixed order by ``_sum_splits_kernel`` (deterministic, graph-safe);
  for skinny shapes such as 18944 -> 3584 where N / BLOCK_N programs cannot fill 132 SMs.

Tuning: a small in-process tuner (``_pick_config``) times the candidate configurations of
``CONFIGS`` once per (kernel, variant, N, K, rows, dtype) with a short do_bench (warm L2) and
caches the winner; the lists are module-level so a benchmark can trim them. In Triton's CPU
interpreter every kernel runs one small configuration (exact, slow; fp16 and fp32 are reliable there,
bf16 conversions are not).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import runtime

MAX_ROWS = 16
INT4_DEQ = {"int": 0, "magic": 1, "one": 2, "after": 3}
INT8_DEQ = {"int": 0, "magic": 1, "one": 2}
_XKIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _need(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(msg)


# ---- packing --------------------------------------------------------------------------------------------
def _to_i32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _interleave(codes: torch.Tensor, per_word: int, iw: int) -> torch.Tensor:
    """codes (N, K) ints in [0, 2^(32/per_word)) -> words (N, K / per_word) int32, position i of word j
    of each block of iw words = element block * per_word * iw + i * iw + j."""
    N, K = codes.shape
    bits = 32 // per_word
    c = codes.to(torch.int64).view(N, K // (per_word * iw), per_word, iw).transpose(2, 3)  # (N, blocks, iw, P)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    return _to_i32((c << shifts).sum(-1).reshape(N, K // per_word))


def _deinterleave(words: torch.Tensor, per_word: int, iw: int) -> torch.Tensor:
    """Inverse of _interleave: (N, K / per_word) int32 -> (N, K) int64 codes (unsigned fields)."""
    N, KW = words.shape
    bits = 32 // per_word
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    c = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (N, KW, P)
    return c.view(N, KW // iw, iw, per_word).transpose(2, 3).reshape(N, KW * per_word)


def int4_block_words(group_size: int) -> int:
    """Words per interleave block of the INT4 layout: the block is min(G, 128) codes."""
    return min(group_size, 128) // 8


def int8_block_words(K: int) -> int:
    """Words per interleave block of the INT8 layout: 16 (64 codes) where K allows, else smaller."""
    for iw in (16, 8, 4, 2, 1):
        if K % (4 * iw) == 0:
            return iw
    raise ValueError(f"INT8 layout needs K % 4 == 0, got K={K}")


@dataclass
class PackedInt4:
    qweight: torch.Tensor  # (N, K / 8) int32, interleaved in blocks of iw words
    sz: torch.Tensor  # (K / G, N) int32: fp16 scale bits | zero << 16
    group_size: int
    iw: int

    @property
    def shape(self):
        return (self.qweight.shape[0], self.qweight.shape[1] * 8)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.sz.nbytes

    def scale(self) -> torch.Tensor:
        """(N, NG) fp16 scales."""
        return (self.sz & 0xFFFF).to(torch.int16).view(torch.float16).T.contiguous()

    def zero(self) -> torch.Tensor:
        """(N, NG) uint8 zero points."""
        return (self.sz >> 16).to(torch.uint8).T.contiguous()

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes in [0, 15], natural order."""
        return _deinterleave(self.qweight, 8, self.iw).to(torch.uint8)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        G = self.group_size
        q = self.codes().float()
        z = self.zero().float().repeat_interleave(G, 1)
        s = self.scale().float().repeat_interleave(G, 1)
        return ((q - z) * s).to(dtype)


@dataclass
class PackedInt8:
    qweight: torch.Tensor  # (N, K / 4) int32, interleaved in blocks of iw words
    scale: torch.Tensor  # (N,) fp32 (exact copy of the quantizer's scale)
    iw: int

    @property
    def shape(self):
        return (self.qweight.shape[0], self.qweight.shape[1] * 4)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes

    def codes(self) -> torch.Tensor:
        """(N, K) int8 codes, natural order."""
        return _deinterleave(self.qweight, 4, self.iw).to(torch.uint8).view(torch.int8)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.codes().float() * self.scale[:, None]).to(dtype)


def pack_int4(weight, group_size: int | None = None, *, scale=None, zero=None) -> PackedInt4:
    """The INT4 layout of this module from

    - a ``labutils.quant.Int4Weight`` (or an ``Int4Linear`` module): its codes, scales and zeros;
    - integer codes (N, K) in [0, 15] with ``scale`` (N, K/G) and ``zero`` (N, K/G) and ``group_size``;
    - a float weight (N, K) and ``group_size``: quantized by labutils.quant.quantize_int4 first.

    Requires K % 8 == 0, K % G == 0, G a power of two >= 32, scales exactly representable in fp16."""
    from .. import quant as Q

    if isinstance(weight, nn.Module) and hasattr(weight, "qweight"):
        _need(getattr(weight, "in_scale", None) is None, "pack_int4: activation-aware (AWQ) modules are not "
              "supported by the fast kernels (no in_scale input)")
        weight = weight.qweight
    if isinstance(weight, Q.Int4Weight):
        _need(weight.offset is None, "pack_int4: the fast kernels take INT4 with integer zero points; this "
              "weight has float offsets (quantize_int4(..., offset=True)): use its Int4Linear (labutils.quant), "
              "whose kernels take both", NotImplementedError)
        _need(group_size in (None, weight.group_size), f"pack_int4: group_size={group_size} contradicts the "
              f"weight's {weight.group_size}")
        codes, scale, zero, group_size = Q.unpack_int4(weight.packed), weight.scale, weight.zero, weight.group_size
    elif isinstance(weight, torch.Tensor) and weight.is_floating_point():
        _need(isinstance(group_size, int) and group_size >= 32 and group_size & (group_size - 1) == 0,
              f"pack_int4: a float weight needs group_size, a power of two >= 32, got {group_size!r}")
        _need(weight.dim() == 2, f"pack_int4: need a weight (N, K), got shape {tuple(weight.shape)}")
        _need(weight.shape[1] % group_size == 0, f"pack_int4: group_size={group_size} must divide K={weight.shape[1]}")
        q = Q.quantize_int4(weight, group_size)
        codes, scale, zero = Q.unpack_int4(q.packed), q.scale, q.zero
    elif isinstance(weight, torch.Tensor):
        _need(scale is not None and zero is not None and group_size is not None,
              "pack_int4: integer codes need scale, zero and group_size")
        codes = weight
    else:
        raise TypeError(f"pack_int4: expected an Int4Weight, an Int4Linear, integer codes or a float weight, "
                        f"got {type(weight).__name__}")
    _need(codes.dim() == 2, f"pack_int4: codes must be (N, K), got shape {tuple(codes.shape)}")
    N, K = codes.shape
    _need(isinstance(group_size, int) and group_size >= 32 and group_size & (group_size - 1) == 0,
          f"pack_int4: group_size must be a power of two >= 32, got {group_size!r}")
    _need(K % group_size == 0, f"pack_int4: group_size={group_size} must divide K={K} (no short last group)")
    _need(not codes.is_floating_point() and codes.dtype != torch.bool,
          f"pack_int4: codes must be integers, got {codes.dtype}", TypeError)
    _need(codes.numel() == 0 or (int(codes.min()) >= 0 and int(codes.max()) <= 15),
          "pack_int4: 4-bit codes must lie in [0, 15]")
    NG = K // group_size
    _need(tuple(scale.shape) == (N, NG) and tuple(zero.shape) == (N, NG),
          f"pack_int4: scale and zero must be (N, K/G) = ({N}, {NG}), got {tuple(scale.shape)}, {tuple(zero.shape)}")
    _need(scale.is_floating_point(), f"pack_int4: scale must be floating point, got {scale.dtype}", TypeError)
    s16 = scale.to(torch.float16)
    _need(torch.equal(s16.float(), scale.float()), "pack_int4: scales must be exactly representable in fp16 "
          "(quantize with scale_dtype=torch.float16)")
    z = zero.to(torch.int64)
    _need(z.numel() == 0 or (int(z.min()) >= 0 and int(z.max()) <= 15), "pack_int4: zero points must lie in [0, 15]")
    iw = int4_block_words(group_size)
    sz = (s16.view(torch.int16).to(torch.int64) & 0xFFFF) | (z << 16)
    return PackedInt4(_interleave(codes, 8, iw), sz.T.contiguous().to(torch.int32), group_size, iw)


def unpack_int4(p: PackedInt4):
    """(codes (N, K) uint8, scale (N, K/G) fp16, zero (N, K/G) uint8): the inverse of pack_int4."""
    return p.codes(), p.scale(), p.zero()


def pack_int8(weight, *, scale=None) -> PackedInt8:
    """The INT8 layout from a ``labutils.quant.Int8Weight`` (or ``Int8Linear``), int8 codes (N, K) with
    ``scale`` (N,), or a float weight (quantized by labutils.quant.quantize_int8). K % 4 == 0."""
    from .. import quant as Q

    if isinstance(weight, nn.Module) and hasattr(weight, "qweight"):
        weight = weight.qweight
    if isinstance(weight, Q.Int8Weight):
        q, scale = weight.q, weight.scale
    elif isinstance(weight, torch.Tensor) and weight.is_floating_point():
        _need(weight.dim() == 2, f"pack_int8: need a weight (N, K), got shape {tuple(weight.shape)}")
        w8 = Q.quantize_int8(weight)
        q, scale = w8.q, w8.scale
    elif isinstance(weight, torch.Tensor):
        _need(weight.dtype == torch.int8, f"pack_int8: codes must be int8, got {weight.dtype}", TypeError)
        _need(scale is not None, "pack_int8: int8 codes need scale (N,)")
        q = weight
    else:
        raise TypeError(f"pack_int8: expected an Int8Weight, an Int8Linear, int8 codes or a float weight, "
                        f"got {type(weight).__name__}")
    _need(q.dim() == 2, f"pack_int8: codes must be (N, K), got shape {tuple(q.shape)}")
    N, K = q.shape
    _need(K % 4 == 0, f"pack_int8: K must be a multiple of 4 (four codes per int32 word), got K={K}")
    _need(tuple(scale.shape) == (N,) and scale.is_floating_point(),
          f"pack_int8: scale must be floating (N,) = ({N},), got {scale.dtype} {tuple(scale.shape)}")
    iw = int8_block_words(K)
    return PackedInt8(_interleave(q.view(torch.uint8), 4, iw), scale.float().contiguous(), iw)


def unpack_int8(p: PackedInt8):
    return p.codes(), p.scale


# ---- kernels: one row ---------------------------------------------------------------------------------------
@triton.jit
def _i4_code(words, i: tl.constexpr, DEQ: tl.constexpr):
    """Nibble i of each word as fp32: q (DEQ 0, 1) or 1 + q/16 (DEQ 2)."""
    if DEQ == 0:
        return ((words >> (4 * i)) & 0xF).to(tl.float32)
    elif DEQ == 1:
        return (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:  # bits 4i..4i+3 -> 19..22, under the exponent of 1.0
        if 4 * i <= 19:
            u = words << (19 - 4 * i)
        else:
            u = words >> (4 * i - 19)
        return ((u & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _scale_zero(sz_ptr, g, rn, N, mask):
    """(scale fp32, zero fp32) from the packed int32 (fp16 scale bits | zero << 16), g-major (NG, N)."""
    sz = tl.load(sz_ptr + g * N + rn, mask=mask, other=0)
    s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    z = (sz >> 16).to(tl.float32)
    return s, z


@triton.jit
def _i4_gemv_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, N, K, KW,
                    GROUP: tl.constexpr, IW: tl.constexpr, DEQ: tl.constexpr, SPLIT_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) = deq(W) x (+ b), one row x (K,). BLOCK_K a multiple of the block IB = 8 IW codes."""
    IB: tl.constexpr = 8 * IW
    NB: tl.constexpr = BLOCK_K // IB  # interleave blocks per chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * KW  # (BLOCK_N, 1, 1)
    jj = tl.arange(0, IW)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
    acc = tl.zeros((BLOCK_N, NB, IW), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        blk = k0 // IB + tl.arange(0, NB)  # (NB,) global block index
        b_ok = blk * IB < K
        wmask = n_ok[:, None, None] & b_ok[None, :, None]
        words = tl.load(w_rows + (blk * IW)[None, :, None] + jj[None, None, :], mask=wmask, other=0)
        g = (blk * IB) // GROUP
        smask = n_ok[:, None] & b_ok[None, :]
        s, z = _scale_zero(sz_ptr, g[None, :], rn[:, None], N, smask)  # (BLOCK_N, NB)
        x_base = x_ptr + (blk * IB)[:, None] + jj[None, :]  # (NB, IW)
        xmask = b_ok[:, None]
        part = tl.zeros((BLOCK_N, NB, IW), dtype=tl.float32)
        xs = tl.zeros((NB, IW), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_base + i * IW, mask=xmask, other=0.0).to(tl.float32)  # contiguous run of IW
            part += _i4_code(words, i, DEQ) * xi[None, :, :]
            xs += xi
        if DEQ == 2:  # sum q x = 16 (sum w' x - sum x)
            acc += (16.0 * s)[:, :, None] * part - (s * (16.0 + z))[:, :, None] * xs[None, :, :]
        else:
            acc += s[:, :, None] * part - (s * z)[:, :, None] * xs[None, :, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(y_ptr + tl.program_id(1) * N + rn, y, mask=n_ok)


@triton.jit
def _i8_code(words, i: tl.constexpr, DEQ: tl.constexpr):
    """Byte i of each word as fp32: c (DEQ 0, 1) or 1 + (c + 128)/256 (DEQ 2)."""
    if DEQ == 0:
        return ((words << (24 - 8 * i)) >> 24).to(tl.float32)  # arithmetic shift: the signed byte
    elif DEQ == 1:
        return ((((words >> (8 * i)) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:  # bits 8i..8i+7 -> 15..22, top bit flipped (c + 128), under the exponent of 1.0
        if 8 * i <= 15:
            u = words << (15 - 8 * i)
        else:
            u = words >> (8 * i - 15)
        return (((u & 0x007F8000) ^ 0x00400000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _i8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, KW,
                    IW: tl.constexpr, DEQ: tl.constexpr, SPLIT_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (N,) = (q * s[:, None]) x (+ b), one row; BLOCK_K a multiple of IB = 4 IW codes."""
    IB: tl.constexpr = 4 * IW
    NB: tl.constexpr = BLOCK_K // IB
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * KW
    jj = tl.arange(0, IW)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
    part = tl.zeros((BLOCK_N, NB, IW), dtype=tl.float32)
    xs = tl.zeros((NB, IW), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        blk = k0 // IB + tl.arange(0, NB)
        b_ok = blk * IB < K
        words = tl.load(w_rows + (blk * IW)[None, :, None] + jj[None, None, :],
                        mask=n_ok[:, None, None] & b_ok[None, :, None], other=0)
        x_base = x_ptr + (blk * IB)[:, None] + jj[None, :]
        for i in tl.static_range(4):
            xi = tl.load(x_base + i * IW, mask=b_ok[:, None], other=0.0).to(tl.float32)
            part += _i8_code(words, i, DEQ) * xi[None, :, :]
            if DEQ == 2:
                xs += xi
    if DEQ == 2:  # sum c x = 256 sum w' x - 384 sum x
        y = 256.0 * tl.sum(tl.sum(part, axis=2), axis=1) - 384.0 * tl.sum(tl.sum(xs, axis=1), axis=0)
    else:
        y = tl.sum(tl.sum(part, axis=2), axis=1)
    y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(y_ptr + tl.program_id(1) * N + rn, y, mask=n_ok)


# ---- kernels: 1 to 16 rows on the tensor cores ------------------------------------------------------------------
@triton.jit
def _join8(t0, t1, t2, t3, t4, t5, t6, t7):
    """Eight (A, B) tiles -> (A, B * 8), element [a, 8 b + i] = t_i[a, b] (in-thread joins). tl.join
    appends its new axis last (fastest), so the innermost join pairs positions 4 apart."""
    u = tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))
    return tl.reshape(u, (u.shape[0], u.shape[1] * 8))


@triton.jit
def _join4(t0, t1, t2, t3):
    u = tl.join(tl.join(t0, t2), tl.join(t1, t3))  # element [a, 4 b + i] = t_i[a, b]
    return tl.reshape(u, (u.shape[0], u.shape[1] * 4))


@triton.jit
def _i4_wtile(words, i: tl.constexpr, s, z, DEQ: tl.constexpr, XKIND: tl.constexpr, DT: tl.constexpr):
    """Position-i tile of dequantized weights in the dot's dtype DT: (q - z) s (DEQ 0-2) or 1 + q/16 (DEQ 3)."""
    if DEQ == 3:
        if XKIND == 0:
            return _i4_code(words, i, 2)
        elif XKIND == 1:  # fp16 1.0 = 0x3C00, code in bits 6..9
            if 4 * i <= 6:
                u = words << (6 - 4 * i)
            else:
                u = words >> (4 * i - 6)
            return ((u & 0x03C0) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)
        else:  # bf16 1.0 = 0x3F80, code in bits 3..6
            if 4 * i <= 3:
                u = words << (3 - 4 * i)
            else:
                u = words >> (4 * i - 3)
            return ((u & 0x0078) | 0x3F80).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif DEQ == 2:  # (q - z) s = 16 s w' - (16 + z) s, one exact FMA
        return (_i4_code(words, i, 2) * (16.0 * s) - (16.0 + z) * s).to(DT)
    else:
        return ((_i4_code(words, i, DEQ) - z) * s).to(DT)


@triton.jit
def _i4_mma_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, M, N, K, KW,
                   GROUP: tl.constexpr, IW: tl.constexpr, DEQ: tl.constexpr, JOIN: tl.constexpr,
                   XKIND: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (M, N) = x (M, K) @ deq(W)^T (+ b), M <= BLOCK_M. Chunks of BLOCK_K codes (a multiple of the
    block IB = 8 IW); DEQ 3 needs each chunk inside one group (GROUP % BLOCK_K == 0)."""
    DT = x_ptr.dtype.element_ty
    IB: tl.constexpr = 8 * IW
    BW: tl.constexpr = BLOCK_K // 8  # words per row and chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW  # (BLOCK_N, 1)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * K  # (BLOCK_M, 1)
    cc = tl.arange(0, BW)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
    out = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c = k0 // 8 + cc  # (BW,) word index along the row
        c_ok = c < KW
        wmask = n_ok[:, None] & c_ok[None, :]
        words = tl.load(w_rows + c[None, :], mask=wmask, other=0)  # (BLOCK_N, BW) int32
        e0 = (c // IW) * IB + c % IW  # element of position 0 of word c; position i adds i * IW
        xmask = m_ok[:, None] & c_ok[None, :]
        if DEQ == 3:
            s, z = _scale_zero(sz_ptr, k0 // GROUP, rn, N, n_ok)  # (BLOCK_N,): the chunk's one group
            sw = s[:, None]
            zw = z[:, None]
        else:
            s2, z2 = _scale_zero(sz_ptr, ((c * 8) // GROUP)[None, :], rn[:, None], N, wmask)  # (BLOCK_N, BW)
            sw = s2
            zw = z2
        if JOIN:
            w = _join8(_i4_wtile(words, 0, sw, zw, DEQ, XKIND, DT), _i4_wtile(words, 1, sw, zw, DEQ, XKIND, DT),
                       _i4_wtile(words, 2, sw, zw, DEQ, XKIND, DT), _i4_wtile(words, 3, sw, zw, DEQ, XKIND, DT),
                       _i4_wtile(words, 4, sw, zw, DEQ, XKIND, DT), _i4_wtile(words, 5, sw, zw, DEQ, XKIND, DT),
                       _i4_wtile(words, 6, sw, zw, DEQ, XKIND, DT), _i4_wtile(words, 7, sw, zw, DEQ, XKIND, DT))
            xo = e0[:, None] + (tl.arange(0, 8) * IW)[None, :]  # (BW, 8): x permuted like the joined tile
            xp = x_rows[:, :, None] + xo[None, :, :]  # (BLOCK_M, BW, 8)
            xt = tl.load(xp, mask=xmask[:, :, None], other=0.0)
            xt = tl.reshape(xt, (BLOCK_M, BLOCK_K))
            part = tl.dot(w, tl.trans(xt), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            if DEQ == 3:
                xsum = tl.sum(xt.to(tl.float32), axis=1)  # (BLOCK_M,)
        else:
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_rows + (e0 + i * IW)[None, :], mask=xmask, other=0.0)  # (BLOCK_M, BW)
                part = tl.dot(_i4_wtile(words, i, sw, zw, DEQ, XKIND, DT), tl.trans(xi), part,
                              input_precision=DOT_PREC)
                if DEQ == 3:
                    xsum += tl.sum(xi.to(tl.float32), axis=1)
        if DEQ == 3:  # part = sum w' x with w' = 1 + q/16
            out += (16.0 * s)[:, None] * part - (s * (16.0 + z))[:, None] * xsum[None, :]
        else:
            out += part
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + tl.program_id(1) * M * N + rm[None, :] * N + rn[:, None], out, mask=mask)


@triton.jit
def _i8_wtile(words, i: tl.constexpr, DEQ: tl.constexpr, DT: tl.constexpr):
    if DEQ == 0:
        return ((words << (24 - 8 * i)) >> 24).to(DT)
    else:  # exact small integers in fp32, then to DT (|c| <= 127 is exact in fp16 and bf16)
        return _i8_code(words, i, 1).to(DT)


@triton.jit
def _i8_mma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KW,
                   IW: tl.constexpr, DEQ: tl.constexpr, JOIN: tl.constexpr, SPLIT_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (M, N) = x (M, K) @ (q s)^T (+ b), M <= BLOCK_M; the scale applied once after the K loop."""
    DT = x_ptr.dtype.element_ty
    IB: tl.constexpr = 4 * IW
    BW: tl.constexpr = BLOCK_K // 4
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * K
    cc = tl.arange(0, BW)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
    out = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c = k0 // 4 + cc
        c_ok = c < KW
        words = tl.load(w_rows + c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0)
        e0 = (c // IW) * IB + c % IW
        xmask = m_ok[:, None] & c_ok[None, :]
        if JOIN:
            w = _join4(_i8_wtile(words, 0, DEQ, DT), _i8_wtile(words, 1, DEQ, DT),
                       _i8_wtile(words, 2, DEQ, DT), _i8_wtile(words, 3, DEQ, DT))
            xo = e0[:, None] + (tl.arange(0, 4) * IW)[None, :]
            xt = tl.load(x_rows[:, :, None] + xo[None, :, :], mask=xmask[:, :, None], other=0.0)
            out = tl.dot(w, tl.trans(tl.reshape(xt, (BLOCK_M, BLOCK_K))), out, input_precision=DOT_PREC)
        else:
            for i in tl.static_range(4):
                xi = tl.load(x_rows + (e0 + i * IW)[None, :], mask=xmask, other=0.0)
                out = tl.dot(_i8_wtile(words, i, DEQ, DT), tl.trans(xi), out, input_precision=DOT_PREC)
    out = out * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + tl.program_id(1) * M * N + rm[None, :] * N + rn[:, None], out, mask=mask)


@triton.jit
def _sum_splits_kernel(ws_ptr, b_ptr, y_ptr, MN, N,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y (M, N) = sum_s ws[s] (+ b), ws (SPLIT_K, M, N) fp32, added in order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ---- configurations and the tuner ---------------------------------------------------------------------------
# (BLOCK_N, BLOCK_K, num_warps, num_stages). Untimed guesses, to be narrowed on the GPU: the GEMV
# wants 4-16 KiB of codes in flight per program (as the bf16 GEMV needed ~2.5-3 TB/s); the tile
# kernels BLOCK_N 16-128 (64+ can use wgmma on sm_90), stages bounded by shared memory.
CONFIGS = {
    "i4_gemv": [(4, 1024, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (16, 512, 4, 2), (16, 1024, 8, 2),
                (32, 256, 4, 2), (4, 2048, 8, 2)],
    "i8_gemv": [(4, 512, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (16, 256, 4, 2), (16, 512, 8, 2),
                (4, 1024, 4, 2)],
    "i4_mma": [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3), (64, 256, 8, 3),
               (128, 128, 8, 3)],
    "i8_mma": [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (32, 256, 4, 3), (64, 256, 8, 3)],
}
INTERPRET_CONFIGS = {"i4_gemv": (8, 256, 1, 1), "i8_gemv": (8, 128, 1, 1),
                     "i4_mma": (16, 128, 1, 1), "i8_mma": (16, 64, 1, 1)}
TUNE_WARMUP_MS, TUNE_REP_MS = 3, 12
_TUNED: dict = {}


def _valid(kind: str, cfg, meta: dict) -> bool:
    bn, bk = cfg[0], cfg[1]
    block = {"i4": 8, "i8": 4}[kind[:2]] * meta["IW"]
    if bk % block:
        return False
    if kind == "i4_mma" and meta["DEQ"] == 3 and meta["GROUP"] % bk:
        return False
    if kind.endswith("mma") and not meta["JOIN"] and bk // {"i4": 8, "i8": 4}[kind[:2]] < 16:
        return False  # a position dot needs depth >= 16
    return True


def _fit_interpreted(kind: str, meta: dict):
    """The interpreter's one configuration, BLOCK_K moved onto the block / group constraints."""
    bn, bk, w, st = INTERPRET_CONFIGS[kind]
    per = {"i4": 8, "i8": 4}[kind[:2]]
    block = per * meta["IW"]
    bk = max(block, bk // block * block)
    if kind == "i4_mma" and meta["DEQ"] == 3:
        bk = min(bk, meta["GROUP"])
    if kind.endswith("mma") and not meta["JOIN"]:
        bk = max(bk, 16 * per)
    return bn, bk, w, st


def _pick_config(kind: str, key: tuple, meta: dict, launch, config=None):
    """The configuration to run: ``config`` if given, the interpreter's one, else the fastest valid
    entry of CONFIGS[kind] for this key (timed once, cached)."""
    if config is not None:
        cfg = tuple(config)
        _need(_valid(kind, cfg, meta), f"{kind}: configuration {cfg} violates the layout's constraints {meta}")
        return cfg
    if runtime.triton_interpreted():
        return _fit_interpreted(kind, meta)
    full = (kind, key, tuple(sorted(meta.items())))
    if full in _TUNED:
        return _TUNED[full]
    cands = [c for c in CONFIGS[kind] if _valid(kind, tuple(c), meta)]
    if not cands:
        cands = [_fit_interpreted(kind, meta)]
    if len(cands) == 1:
        _TUNED[full] = tuple(cands[0])
        return _TUNED[full]
    import triton.testing

    best = None
    for c in cands:
        try:
            launch(tuple(c))  # compile
            t = triton.testing.do_bench(lambda c=c: launch(tuple(c)), warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS)
        except Exception:  # noqa: BLE001  (e.g. out of shared memory: skip the configuration)
            continue
        if best is None or t < best[0]:
            best = (t, tuple(c))
    _need(best is not None, f"{kind}: no configuration of {cands} ran for {key}", RuntimeError)
    _TUNED[full] = best[1]
    return best[1]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter behaves as an H100 / H200 would


def default_split_k(N: int, K: int, block_n: int, n_sm: int) -> int:
    """Split K only where the output tiles leave fewer than ~2 programs per SM and each split still
    streams >= 2048 codes per row (down_proj at BLOCK_N 32: 112 tiles, K = 18944 -> 4)."""
    split = 1
    while triton.cdiv(N, block_n) * split < 2 * n_sm and K // (2 * split) >= 2048 and split < 8:
        split *= 2
    return split


# ---- launchers --------------------------------------------------------------------------------------------------
def _check_x(x, K: int, op: str):
    _need(isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype in _XKIND,
          f"{op}: x must be an fp16, bf16 or fp32 tensor, got {getattr(x, 'dtype', type(x).__name__)}", TypeError)
    _need(x.dim() >= 1 and x.shape[-1] == K, f"{op}: x has {x.shape[-1] if x.dim() else 0} features "
          f"(shape {tuple(x.shape)}), the weight {K}")


def _check_bias(bias, N: int, op: str):
    if bias is not None:
        _need(bias.is_floating_point() and tuple(bias.shape) == (N,),
              f"{op}: bias must be floating (N,) = ({N},), got {bias.dtype} {tuple(bias.shape)}")


def _rows(x):
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _run(kind, kernel, x2, args, N, K, KW, bias, meta, kernel_mode, split_k, config):
    """Launch ``kernel`` (GEMV or tile) on x2 (M, K) -> (M, N) in x2's dtype, with split-K if asked."""
    M = x2.shape[0]
    gemv = kind.endswith("gemv")
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    has_bias = bias is not None
    b_arg = bias if has_bias else y

    def launch(cfg, split=None):
        bn, bk, w, st = cfg
        sp = split if split is not None else (
            default_split_k(N, K, bn, _sm_count(x2.device)) if split_k is None else int(split_k))
        out = y if sp == 1 else torch.empty(sp, M, N, device=x2.device, dtype=torch.float32)
        grid = (triton.cdiv(N, bn), sp)
        if gemv:
            kernel[grid](x2, *args, b_arg, out, N, K, KW, **meta, SPLIT_K=sp, HAS_BIAS=has_bias,
                         BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        else:
            kernel[grid](x2, *args, b_arg, out, M, N, K, KW, **meta, SPLIT_K=sp, HAS_BIAS=has_bias,
                         BLOCK_M=MAX_ROWS, DOT_PREC="ieee" if x2.dtype == torch.float32 else "tf32",
                         BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        if sp > 1:
            block = 1024
            _sum_splits_kernel[(triton.cdiv(M * N, block),)](out, b_arg, y, M * N, N, SPLIT_K=sp,
                                                             HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
        return y

    _need(split_k is None or int(split_k) >= 1, f"split_k must be >= 1, got {split_k}")
    key = (N, K, M, x2.dtype, split_k, bias is not None)
    cfg = _pick_config(kind, key, meta, launch, config)
    return launch(cfg)


def int4_linear(x: torch.Tensor, packed: PackedInt4, bias: torch.Tensor | None = None, *,
                kernel: str | None = None, deq: str | None = None, join: bool = True,
                split_k: int | None = None, config=None) -> torch.Tensor:
    """F.linear(x, packed.dequantize(), bias) for x (..., K): the fast kernels for 1-16 rows, more rows
    (prefill) dequantize and call F.linear.

    kernel: "gemv" (1 row only) or "mma" (1-16 rows); None: gemv for 1 row, mma otherwise.
    deq: "int", "magic", "one" (both kernels) or "after" (mma only); None: "one" (gemv), "after" (mma).
    join: mma kernel, one dot on the joined tile (True) or one dot per nibble position (False).
    split_k: programs per output tile along K (None: default_split_k). config: (BLOCK_N, BLOCK_K,
    num_warps, num_stages) instead of the tuner's choice."""
    op = "int4_linear"
    _need(isinstance(packed, PackedInt4), f"{op}: packed must be a PackedInt4 (pack_int4), got "
          f"{type(packed).__name__}", TypeError)
    return _int4(x, packed.qweight, packed.sz, bias, packed.group_size, packed.iw, kernel, deq, join, split_k, config)


def _int4(x, qweight, sz, bias, group_size, iw, kernel, deq, join, split_k, config):
    op = "int4_linear"
    _need(qweight.dtype == torch.int32 and qweight.dim() == 2,
          f"{op}: qweight must be int32 (N, K/8), got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 8
    _check_x(x, K, op)
    _check_bias(bias, N, op)
    _need(K % group_size == 0, f"{op}: group_size={group_size} must divide K={K}")
    _need(sz.dtype == torch.int32 and tuple(sz.shape) == (K // group_size, N),
          f"{op}: sz must be int32 (K/G, N) = ({K // group_size}, {N}), got {sz.dtype} {tuple(sz.shape)}")
    rows = _rows(x)
    if not 1 <= rows <= MAX_ROWS:
        W = PackedInt4(qweight, sz, group_size, iw).dequantize(x.dtype)
        return F.linear(x, W, None if bias is None else bias.to(x.dtype))
    kernel = kernel or ("gemv" if rows == 1 else "mma")
    _need(kernel in ("gemv", "mma"), f"{op}: kernel must be 'gemv' or 'mma', got {kernel!r}")
    _need(kernel == "mma" or rows == 1, f"{op}: the gemv kernel takes one row, got {rows}")
    deq = deq or ("one" if kernel == "gemv" else "after")
    _need(deq in INT4_DEQ and (kernel == "mma" or deq != "after"),
          f"{op}: deq must be one of {list(INT4_DEQ) if kernel == 'mma' else list(INT4_DEQ)[:3]} for {kernel}, got {deq!r}")
    _need(not (kernel == "mma" and deq == "after" and not join and group_size < 128),
          f"{op}: deq='after' with join=False needs group_size >= 128 (a chunk inside one group, 16 words deep)")
    x2 = x.reshape(rows, K).contiguous()
    meta = dict(GROUP=group_size, IW=iw, DEQ=INT4_DEQ[deq])
    if kernel == "gemv":
        y = _run("i4_gemv", _i4_gemv_kernel, x2, (qweight, sz), N, K, K // 8, bias, meta, kernel, split_k, config)
    else:
        meta.update(JOIN=bool(join), XKIND=_XKIND[x.dtype])
        y = _run("i4_mma", _i4_mma_kernel, x2, (qweight, sz), N, K, K // 8, bias, meta, kernel, split_k, config)
    return y.reshape(*x.shape[:-1], N)


def int8_linear(x: torch.Tensor, packed: PackedInt8, bias: torch.Tensor | None = None, *,
                kernel: str | None = None, deq: str | None = None, join: bool = True,
                split_k: int | None = None, config=None) -> torch.Tensor:
    """F.linear(x, packed.dequantize(), bias): INT8 per-channel, as int4_linear (deq "int", "magic",
    "one"; "one" for the GEMV only; None: "one" for the GEMV, "int" for the tile kernel)."""
    _need(isinstance(packed, PackedInt8), f"int8_linear: packed must be a PackedInt8 (pack_int8), got "
          f"{type(packed).__name__}", TypeError)
    return _int8(x, packed.qweight, packed.scale, bias, packed.iw, kernel, deq, join, split_k, config)


def _int8(x, qweight, scale, bias, iw, kernel, deq, join, split_k, config):
    op = "int8_linear"
    _need(qweight.dtype == torch.int32 and qweight.dim() == 2,
          f"{op}: qweight must be int32 (N, K/4), got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 4
    _check_x(x, K, op)
    _check_bias(bias, N, op)
    _need(scale.dtype == torch.float32 and tuple(scale.shape) == (N,),
          f"{op}: scale must be fp32 (N,) = ({N},), got {scale.dtype} {tuple(scale.shape)}")
    rows = _rows(x)
    if not 1 <= rows <= MAX_ROWS:
        W = PackedInt8(qweight, scale, iw).dequantize(x.dtype)
        return F.linear(x, W, None if bias is None else bias.to(x.dtype))
    kernel = kernel or ("gemv" if rows == 1 else "mma")
    _need(kernel in ("gemv", "mma"), f"{op}: kernel must be 'gemv' or 'mma', got {kernel!r}")
    _need(kernel == "mma" or rows == 1, f"{op}: the gemv kernel takes one row, got {rows}")
    deq = deq or ("one" if kernel == "gemv" else "int")
    _need(deq in INT8_DEQ and (kernel == "gemv" or deq != "one"),
          f"{op}: deq must be one of {list(INT8_DEQ) if kernel == 'gemv' else ['int', 'magic']} for {kernel}, got {deq!r}")
    x2 = x.reshape(rows, K).contiguous()
    meta = dict(IW=iw, DEQ=INT8_DEQ[deq])
    if kernel == "gemv":
        y = _run("i8_gemv", _i8_gemv_kernel, x2, (qweight, scale), N, K, K // 4, bias, meta, kernel, split_k, config)
    else:
        meta.update(JOIN=bool(join))
        y = _run("i8_mma", _i8_mma_kernel, x2, (qweight, scale), N, K, K // 4, bias, meta, kernel, split_k, config)
    return y.reshape(*x.shape[:-1], N)


# ---- custom ops (one opaque call for torch.compile and CUDA graphs) and modules ----------------------------------
def _variant(v: str):
    """'' (defaults) or 'kernel=mma,deq=after,join=0,split_k=2' -> keyword arguments."""
    out = {}
    for item in filter(None, v.split(",")):
        k, _, val = item.partition("=")
        out[k] = None if val in ("", "none") else (bool(int(val)) if k == "join" else
                                                   int(val) if k == "split_k" else val)
    return out


@torch.library.custom_op("labutils::int4_fast_linear", mutates_args=())
def int4_fast_linear(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, iw: int, variant: str = "") -> torch.Tensor:
    kw = {"kernel": None, "deq": None, "join": True, "split_k": None, **_variant(variant)}
    return _int4(x, qweight, sz, bias, group_size, iw, kw["kernel"], kw["deq"], kw["join"], kw["split_k"], None)


@int4_fast_linear.register_fake
def _(x, qweight, sz, bias, group_size, iw, variant=""):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("labutils::int8_fast_linear", mutates_args=())
def int8_fast_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     iw: int, variant: str = "") -> torch.Tensor:
    kw = {"kernel": None, "deq": None, "join": True, "split_k": None, **_variant(variant)}
    return _int8(x, qweight, scale, bias, iw, kw["kernel"], kw["deq"], kw["join"], kw["split_k"], None)


@int8_fast_linear.register_fake
def _(x, qweight, scale, bias, iw, variant=""):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


class Int4FastLinear(nn.Module):
    """A linear layer holding a PackedInt4 (buffers ``qweight``, ``sz``) and the nn.Linear's own bias.
    ``variant``: kernel choices for every call, e.g. 'deq=magic' or 'kernel=mma,split_k=2' ('' = defaults)."""

    def __init__(self, packed: PackedInt4, bias: torch.Tensor | None = None, variant: str = ""):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.group_size, self.iw, self.variant = packed.group_size, packed.iw, variant
        _variant(variant)  # fail early on a malformed string
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("sz", packed.sz)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, variant: str = ""):
        return cls(pack_int4(linear.weight.detach(), group_size), linear.bias, variant)

    @classmethod
    def from_quant(cls, module, variant: str = ""):
        """From a labutils.quant.Int4Linear (same codes, scales and zeros: same outputs)."""
        return cls(pack_int4(module), module.bias, variant)

    @property
    def packed(self) -> PackedInt4:
        return PackedInt4(self.qweight, self.sz, self.group_size, self.iw)

    def dequantize(self, dtype=torch.float32):
        return self.packed.dequantize(dtype)

    def forward(self, x):
        return torch.ops.labutils.int4_fast_linear(x, self.qweight, self.sz, self.bias, self.group_size,
                                                   self.iw, self.variant)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, variant={self.variant!r}")


class Int8FastLinear(nn.Module):
    """A linear layer holding a PackedInt8 (buffers ``qweight``, ``scale``) and the nn.Linear's bias."""

    def __init__(self, packed: PackedInt8, bias: torch.Tensor | None = None, variant: str = ""):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.iw, self.variant = packed.iw, variant
        _variant(variant)
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scale", packed.scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, variant: str = ""):
        return cls(pack_int8(linear.weight.detach()), linear.bias, variant)

    @classmethod
    def from_quant(cls, module, variant: str = ""):
        return cls(pack_int8(module), module.bias, variant)

    @property
    def packed(self) -> PackedInt8:
        return PackedInt8(self.qweight, self.scale, self.iw)

    def dequantize(self, dtype=torch.float32):
        return self.packed.dequantize(dtype)

    def forward(self, x):
        return torch.ops.labutils.int8_fast_linear(x, self.qweight, self.scale, self.bias, self.iw, self.variant)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, variant={self.variant!r}")


def quantize_model_fast(model, fmt: str, *, group_size: int = 128, variant: str = ""):
    """Swap every linear (through ``model.swap_linears``) for Int4FastLinear / Int8FastLinear, quantized
    exactly as labutils.quant.quantize_model(model, fmt) would (same codes and scales)."""
    _need(fmt in ("int4", "int8"), f"quantize_model_fast: fmt must be 'int4' or 'int8', got {fmt!r}")
    if fmt == "int4":
        return model.swap_linears(lambda name, lin: Int4FastLinear.from_linear(lin, group_size, variant))
    return model.swap_linears(lambda name, lin: Int8FastLinear.from_linear(lin, variant))
