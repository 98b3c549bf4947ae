"""Notebook 04's exercises: plausible wrong answers fail, naming the case that shows the mistake;
the references agree with labutils.quant."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labutils import quant
from labutils.exercises import EXERCISES, check
from labutils.exercises import ch04
from conftest import assert_fails_naming_the_case

NAMES = {"int4_group_quantize", "int4_pack", "int4_unpack", "int4_bytes_per_weight"}


def test_notebook_04_exercises_are_registered():
    assert NAMES <= set(EXERCISES)


# ---- wrong answers ------------------------------------------------------------------------------------------------
def _groups(W, G):
    N, K = W.shape
    return F.pad(W.float(), (0, -K % G)).view(N, -1, G)


def _finish(Wg, q, z, s, K):
    return ((q - z) * s).view(Wg.shape[0], -1)[:, :K]


def _symmetric(W, G):
    """No zero point: scale = max|W| / 7, codes in [-8, 7]."""
    Wg = _groups(W, G)
    s = (Wg.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-12)
    return (torch.round(Wg / s).clamp(-8, 7) * s).view(W.shape[0], -1)[:, : W.shape[1]]


def _range_not_widened(W, G):
    """min and max of the group as they are: an all-positive group's range does not start at 0."""
    Wg = _groups(W, G)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-12)
    z = torch.round(-lo / s)
    return _finish(Wg, (torch.round(Wg / s) + z).clamp(0, 15), z, s, W.shape[1])


def _no_guard(W, G):
    """Right, except the all-zero group: 0 / 0."""
    Wg = _groups(W, G)
    lo, hi = Wg.amin(-1, keepdim=True).clamp(max=0), Wg.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    return _finish(Wg, (torch.round(Wg / s) + z).clamp(0, 15), z, s, W.shape[1])


def _whole_groups_only(W, G):
    """Assumes K is a multiple of the group size."""
    N, K = W.shape
    Wg = W.float().reshape(N, K // G, G)
    lo, hi = Wg.amin(-1, keepdim=True).clamp(max=0), Wg.amax(-1, keepdim=True).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    z = torch.round(-lo / s)
    return ((torch.round(Wg / s) + z).clamp(0, 15) - z).mul(s).reshape(N, K)


def _truncates(W, G):
    """Codes truncated (floor) instead of rounded to nearest."""
    Wg = _groups(W, G)
    lo, hi = Wg.amin(-1, keepdim=True).clamp(max=0), Wg.amax(-1, keepdim=True).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    z = torch.round(-lo / s)
    return _finish(Wg, (torch.floor(Wg / s) + z).clamp(0, 15), z, s, W.shape[1])


def _high_nibble_first(q):
    """bitsandbytes' order."""
    q = q.to(torch.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def _halves(q):
    """First half of the row in the low nibbles, second half in the high."""
    q = q.to(torch.uint8)
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4)


def _unpack_halves(p):
    """All low nibbles, then all high nibbles: not interleaved."""
    return torch.cat((p & 15, p >> 4), dim=-1)


def _unpack_2d_only(p):
    return torch.stack((p & 15, p >> 4), dim=2).reshape(p.shape[0], -1)


def _no_short_group(K, G, scale_bytes=2, zero_bytes=1):
    return 0.5 + (scale_bytes + zero_bytes) / G


def _floor_groups(K, G, scale_bytes=2, zero_bytes=1):
    return (K / 2 + (K // G) * (scale_bytes + zero_bytes)) / K


WRONG = [("int4_group_quantize", _symmetric, "one row, one group of 8", "elements differ"),
         ("int4_group_quantize", _range_not_widened, "first group all positive", "elements differ"),
         ("int4_group_quantize", _no_guard, "an all-zero group", "got nan"),
         ("int4_group_quantize", _whole_groups_only, "a last group of 64", "raised RuntimeError"),
         ("int4_group_quantize", _truncates, "one row, one group of 8", "elements differ"),
         ("int4_pack", _high_nibble_first, "low nibble 1, high nibble 2", "got 18, expected 33"),
         ("int4_pack", _halves, "0..15 in order", "first at [0, 0]: got 128, expected 16"),
         ("int4_unpack", _unpack_halves, "codes 1, 2, 3, 4", "first at [0, 1]: got 3, expected 2"),
         ("int4_unpack", _unpack_2d_only, "leading dimensions", "shape mismatch"),
         ("int4_bytes_per_weight", _no_short_group, "a short last group", "expected 0.52604167"),
         ("int4_bytes_per_weight", _floor_groups, "a short last group", "got 0.52083333")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


def test_pack_and_unpack_of_the_reader_are_checked_as_a_pair(capsys):
    """A pack and an unpack that agree with each other but not with the layout still fail."""
    assert not check("int4_pack", _high_nibble_first)
    q = torch.randint(0, 16, (3, 10), dtype=torch.uint8)

    def unpack_high_first(p):
        return torch.stack((p >> 4, p & 15), dim=-1).flatten(-2)

    assert torch.equal(unpack_high_first(_high_nibble_first(q)), q)  # a consistent pair ...
    assert not check("int4_unpack", unpack_high_first)  # ... of the wrong layout


# ---- the references against the package ---------------------------------------------------------------------------
@pytest.mark.parametrize("N, K, G", [(8, 256, 32), (5, 576, 128), (3, 96, 64), (4, 64, 128)])
def test_group_quantize_reference_is_the_package_with_fp32_scales(N, K, G):
    W = 0.02 * torch.randn(N, K, generator=torch.Generator().manual_seed(N * K))
    W[0, :G] = 0  # an all-zero group
    got = ch04.ref_int4_group_quantize(W, G)
    want = quant.quantize_int4(W, G, scale_dtype=torch.float32).dequantize()
    assert torch.equal(got, want)


def test_pack_references_are_the_packages():
    q = torch.randint(0, 16, (4, 3, 18), dtype=torch.uint8)
    assert torch.equal(ch04.ref_int4_pack(q), quant.pack_int4(q))
    assert torch.equal(ch04.ref_int4_unpack(quant.pack_int4(q)), quant.unpack_int4(quant.pack_int4(q)))
    assert torch.equal(ch04.ref_int4_unpack(ch04.ref_int4_pack(q)), q)


@pytest.mark.parametrize("K, G", [(3584, 128), (576, 128), (48, 128), (1000, 32)])
def test_bytes_per_weight_reference_is_the_packages_nbytes(K, G):
    W = torch.randn(3, K)
    assert math.isclose(ch04.ref_int4_bytes_per_weight(K, G), quant.quantize_int4(W, G).nbytes / W.numel())
