"""Notebook 04 (weight-only quantization): INT4 quantization per group, packing two 4-bit codes per
byte and taking them apart again, and the bytes per weight of a format with its scales."""
from __future__ import annotations

import math

import torch

from . import case, exercise


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


def _weight(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    return 0.02 * torch.randn(N, K, generator=g)


# ---- INT4 per group, round to nearest --------------------------------------------------------------------------------
def ref_int4_group_quantize(W: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = W.shape
    Wg = torch.nn.functional.pad(W.float(), (0, -K % group_size)).view(N, -1, group_size)  # (N, groups, G)
    lo = Wg.amin(-1, keepdim=True).clamp(max=0)  # the range always contains 0
    hi = Wg.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any positive scale codes it exactly
    z = torch.round(-lo / s)  # (N, groups, 1) an integer in [0, 15]
    q = (torch.round(Wg / s) + z).clamp(0, 15)  # (N, groups, G) codes
    return ((q - z) * s).view(N, -1)[:, :K]


@exercise("int4_group_quantize", reference=ref_int4_group_quantize,
          hint="per row and per group of group_size along K (the last group may be shorter): lo = min(min, 0), "
               "hi = max(max, 0), scale = (hi - lo) / 15, zero = round(-lo / scale), code = clamp(round(W / scale) "
               "+ zero, 0, 15); return (code - zero) * scale as float32 (N, K); guard the all-zero group (scale 0)")
def _int4_group_quantize_cases(g):
    yield case("one row, one group of 8", _weight(1, 8, g), 8)
    W = _weight(4, 64, g)
    W[:, :32] = W[:, :32].abs()
    yield case("first group all positive: its range starts at 0", W, 32)
    W = _weight(3, 64, g)
    W[:, 32:] = -W[:, 32:].abs()
    yield case("second group all negative: its range ends at 0", W, 32)
    W = _weight(2, 64, g)
    W[1, :32] = 0
    yield case("an all-zero group (scale would be 0)", W, 32)
    W = _weight(4, 128, g)
    W[2, 70] = 1.0
    yield case("an outlier widens one group's scale only", W, 64)
    yield case("K = 576, group 128: a last group of 64", _weight(3, 576, g), 128)
    yield case("K = 96, group 64: a last group of 32", _weight(5, 96, g), 64)
    yield case("group larger than K: one short group per row", _weight(2, 48, g), 128)
    for _ in range(3):
        G = 2 ** _randint(3, 7, g)
        yield case(f"random weight, group {G}", _weight(_randint(1, 9, g), G * _randint(1, 5, g), g), G)


# ---- packing two codes per byte -------------------------------------------------------------------------------------
def ref_int4_pack(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def ref_int4_unpack(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def _codes(shape, g) -> torch.Tensor:
    return torch.randint(0, 16, shape, generator=g).to(torch.uint8)


@exercise("int4_pack", reference=ref_int4_pack,
          hint="byte j of a row holds element 2j in its low nibble and element 2j + 1 in its high nibble: "
               "q[..., 0::2] | (q[..., 1::2] << 4), as uint8 (N, K/2); pack along the last dimension only")
def _int4_pack_cases(g):
    yield case("one pair: low nibble 1, high nibble 2", torch.tensor([[1, 2]], dtype=torch.uint8))
    yield case("codes 15 everywhere (a byte of 255)", torch.full((2, 6), 15, dtype=torch.uint8))
    yield case("0..15 in order", torch.arange(16, dtype=torch.uint8)[None])
    yield case("a column of codes (N, 2)", _codes((7, 2), g))
    yield case("leading dimensions (2, 3, 8)", _codes((2, 3, 8), g))
    for _ in range(3):
        yield case("random codes", _codes((_randint(1, 6, g), 2 * _randint(1, 40, g)), g))


@exercise("int4_unpack", reference=ref_int4_unpack,
          hint="the inverse of int4_pack: element 2j = byte & 15 (low nibble), element 2j + 1 = byte >> 4, "
               "interleaved back into (..., 2 * K/2) uint8 (torch.stack on a new last dimension, then flatten)")
def _int4_unpack_cases(g):
    yield case("one byte 0x21: codes 1 then 2", torch.tensor([[0x21]], dtype=torch.uint8))
    yield case("bytes 0x21, 0x43: codes 1, 2, 3, 4", torch.tensor([[0x21, 0x43]], dtype=torch.uint8))
    yield case("bytes 0x0F and 0xF0", torch.tensor([[0x0F, 0xF0]], dtype=torch.uint8))
    yield case("all 255", torch.full((3, 4), 255, dtype=torch.uint8))
    yield case("leading dimensions (2, 3, 5)", torch.randint(0, 256, (2, 3, 5), generator=g).to(torch.uint8))
    for _ in range(3):
        yield case("random bytes", torch.randint(0, 256, (_randint(1, 6, g), _randint(1, 40, g)), generator=g)
                   .to(torch.uint8))


# ---- bytes per weight -----------------------------------------------------------------------------------------------
def ref_int4_bytes_per_weight(K: int, group_size: int, scale_bytes: int = 2, zero_bytes: int = 1) -> float:
    groups = math.ceil(K / group_size)
    return (K / 2 + groups * (scale_bytes + zero_bytes)) / K


@exercise("int4_bytes_per_weight", reference=ref_int4_bytes_per_weight,
          hint="a row of K weights stores K/2 bytes of codes plus, for each of its ceil(K / group_size) groups, "
               "one scale and one zero point; divide the row's bytes by K (a short last group still has both)")
def _int4_bytes_per_weight_cases(g):
    yield case("Qwen2.5-7B hidden size, group 128", 3584, 128)
    yield case("K = 576, group 128: a short last group", 576, 128)
    yield case("group larger than K", 48, 128)
    yield case("NF4-like: no zero point, absmax per 64", 4096, 64, 2, 0)
    yield case("fp32 scales, group 32", 4096, 32, 4, 1)
    for _ in range(3):
        yield case("random K and group", 2 * _randint(8, 3000, g), 2 ** _randint(5, 9, g))
