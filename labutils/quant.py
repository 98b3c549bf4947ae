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
       ``offset=True``: a float offset m per group instead of z (llama.cpp's   0.5 + 4/G
       Q4_1): m = the group's min (rounded down), s = (max - m) / 15,
       q = round((W - m) / s), W ~ q s + m. 0 need not be exact; the 16
       levels span the group's own range.
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

Kernels: labutils.kernels.quant (Triton GEMV kernels for one activation row, tensor-core tiles for
2 to 16 rows, custom ops ``labutils::w8a16_linear`` / ``labutils::w4a16_linear`` that wrap them for
torch.compile and CUDA graphs; more than 16 rows dequantize and call F.linear).

Activation-aware scaling (AWQ-style, simplified): a few input channels carry large activations, and
errors in the weights they multiply cost the most. Scaling column k of W up by s_k (and x_k down by
s_k, the per-channel ``in_scale`` multiply inside the W4A16 kernel) gives those weights a finer
grid after quantization. ``awq_scales`` picks s = act_mean ** alpha per linear, alpha on a grid in
[0, 1) that minimises the output error on calibration activations; alpha = 0 is round-to-nearest.

Where the code lives: the formats and quantizers in labutils.quant_formats, the kernels in
labutils.kernels.quant, activation-aware scaling in labutils.awq. This module holds the quantized
nn.Linear modules and ``quantize_model``, and re-exports the rest under their old names.
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn as nn

from .awq import _act_scaled, _quantizer, _swappable, awq_scales, awq_search  # noqa: F401  (re-exported)
from .kernels.quant import (  # noqa: F401  (re-exported: notebooks, tests and probes read them from here)
    MAX_ROWS, _check_vec, _check_x, _configs, _fallback, _gemv_configs, _launch, _mma_configs, _need, _prune,
    _prune_gemv, _rows, _w4_gemv_kernel, _w4_mma_kernel, _w4_tile, _w4a16_kernel, _w8_gemv_kernel, _w8a16_kernel,
    w4a16_linear, w8a16_linear)
from .quant_formats import (  # noqa: F401
    NF4_CODE, Int4Weight, Int8Weight, NF4Weight, _check, _expand, _groups, _Packed4, _QWeight, _store_scale,
    pack_int4, quant_error, quantize_int4, quantize_int8, quantize_nf4, unpack_int4)


# ---- modules for the linear-layer seam ------------------------------------------------------------------
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
        meta = "".join(f", {k}={v}" for k, v in self._meta.items() if v is not None)
        if "offset" in self._buffers:
            meta += ", float offsets"
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
        zero = self._buffers["offset"] if "offset" in self._buffers else self.zero  # float offsets or zero points
        return torch.ops.labutils.w4a16_linear(x, self.packed, self.scale, zero, None, self.in_scale,
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

