"""Weight-only quantization formats (notebook 04): INT8 per output channel, INT4 per group with an
integer zero point or a float offset, NF4 per block with an absmax; their quantizers, 4-bit packing (two codes per uint8 along
K, element 2j in the low nibble) and dequantization. The formats are described in labutils.quant;
the kernels that multiply by them are in labutils.kernels.quant.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

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
    """INT4 per group of ``group_size`` along K, in one of two grids: with an integer zero point z
    (``zero``), W ~ (q - z) s, where 0 is exact; or with a float offset m (``offset``, ``zero`` None),
    W ~ q s + m, the grid of llama.cpp's Q4_1 (m: the group's minimum), which need not hold 0."""
    packed: torch.Tensor  # (N, K/2) uint8, two codes per byte
    scale: torch.Tensor  # (N, ceil(K/G))
    zero: torch.Tensor | None  # (N, ceil(K/G)) uint8 in [0, 15], or None with an offset
    group_size: int
    offset: torch.Tensor | None = None  # (N, ceil(K/G)) float, the value of code 0

    def __post_init__(self):
        if (self.zero is None) == (self.offset is None):
            raise ValueError("Int4Weight needs exactly one of zero (integer zero points) and offset (float offsets)")

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        K, G = self.shape[1], self.group_size
        q = unpack_int4(self.packed).float()  # (N, K)
        if self.offset is not None:
            return (q * _expand(self.scale, G, K) + _expand(self.offset, G, K)).to(dtype)
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
def quantize_int4(W: torch.Tensor, group_size: int = 128, scale_dtype=torch.float16, offset: bool = False) -> Int4Weight:
    """Asymmetric INT4 per group of ``group_size`` along K: |W - deq| <= scale / 2 in each group.

    ``offset=False``: an integer zero point, the range widened to contain 0. ``offset=True``: a float
    offset m per group, stored in ``scale_dtype`` rounded *down* from the group's minimum, and
    s ~ (max - m) / 15 with m + 15 s >= max, so the 16 levels span the group's own range (Q4_1's grid)."""
    _check(W, group_size)
    N, K = W.shape
    if offset:
        return _quantize_int4_offset(W, group_size, scale_dtype)
    Wg = _groups(W.detach(), group_size)  # (N, n_groups, G); zero padding leaves [min, max] as it is
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)  # the range always contains 0
    s = _store_scale((hi - lo) / 15, scale_dtype)  # (N, n_groups)
    sf = s.float()
    z = torch.round(-lo / sf).clamp_(0, 15)  # (N, n_groups)
    q = (torch.round(Wg / sf[..., None]) + z[..., None]).clamp_(0, 15)
    return Int4Weight(pack_int4(q.view(N, -1)[:, :K]), s, z.to(torch.uint8), group_size)


def _round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values in ``dtype``, rounded towards -inf (never above v)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    vt = v.to(dtype)
    if not torch.isfinite(vt).all():
        raise ValueError(f"a group's minimum of {v.min().item():.3g} does not fit scale_dtype={dtype}: "
                         f"pass scale_dtype=torch.float32")
    return torch.where(vt.float() > v, torch.nextafter(vt, torch.full_like(vt, -float("inf"))), vt)


def _quantize_int4_offset(W: torch.Tensor, group_size: int, scale_dtype) -> Int4Weight:
    """Q4_1's grid: m the group's minimum rounded down to ``scale_dtype``; s the nearest value of
    (max - m) / 15, one step up where the top level m + 15 s (in fp32, as the kernels compute it)
    would fall short of the group's maximum. A weight stored in this grid comes back exactly."""
    N, K = W.shape
    n_groups = -(-K // group_size)
    Wf = W.detach().float()
    pad = n_groups * group_size - K  # a short last group: padded with its own last value, not 0
    Wg = (torch.cat([Wf, Wf[:, -1:].expand(N, pad)], 1) if pad else Wf).view(N, n_groups, group_size)
    lo, hi = Wg.amin(-1), Wg.amax(-1)
    m = _round_down(lo, scale_dtype)  # (N, n_groups) the value of code 0, <= every weight
    fi = torch.finfo(scale_dtype)
    # a range below the smallest step (an all-equal group among them): that step, so s > 0 and the error <= s / 2
    s_raw = ((hi - m.float()) / 15).clamp_min(fi.tiny * fi.eps)
    _store_scale(s_raw, scale_dtype)  # only its checks: a scale past the dtype's range raises
    s = s_raw.to(scale_dtype)  # nearest; raised below where the top level falls short
    for _ in range(4):  # m + 15 s must reach the maximum (fp32, as dequantized); one step up usually does
        short = m.float() + 15 * s.float() < hi
        if not short.any():
            break
        s = torch.where(short, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    else:
        raise ValueError("INT4 offset format: could not cover a group's range in scale_dtype; pass scale_dtype=torch.float32")
    q = torch.round((Wg - m.float()[..., None]) / s.float()[..., None]).clamp_(0, 15)
    return Int4Weight(pack_int4(q.view(N, -1)[:, :K]), s, None, group_size, offset=m)


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

