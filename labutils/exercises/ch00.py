"""Notebook 00 (the roofline): the bound over a kernel, the intensity of a matmul at batch B, and
the batch at which decoding turns compute-bound."""
from __future__ import annotations

import torch

from .. import configs, hardware, roofline
from . import case, exercise


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


def ref_roofline_bound(intensity: float, peak_tflops: float, bw_gbps: float) -> float:
    return roofline.attainable_tflops(intensity, peak_tflops, bw_gbps)


@exercise("roofline_bound", reference=ref_roofline_bound,
          hint="the lower of the two roofs: the compute peak, and bandwidth x intensity; mind the units "
               "(GB/s x FLOP/B is GFLOP/s, and the answer is in TFLOP/s)")
def _roofline_bound_cases(g):
    h100 = hardware.SPECS["H100 80GB HBM3"]
    yield case("decode at batch 1 on an H100 sheet: ~1 FLOP/B", 1.0, h100[1], h100[0])
    yield case("exactly at the ridge point", roofline.ridge_point(h100[1], h100[0]), h100[1], h100[0])
    yield case("far above the ridge: the compute roof", 5000.0, h100[1], h100[0])
    yield case("zero intensity: nothing to compute", 0.0, h100[1], h100[0])
    yield case("a laptop CPU: 0.5 TFLOP/s, 20 GB/s", 10.0, 0.5, 20.0)
    for name in ("T4", "L4", "H200"):
        bw, peak = hardware.SPECS[name]
        yield case(f"random intensity on a {name} sheet", round(10 ** _uniform(-1, 4, g), 3), float(peak), float(bw))


def ref_matmul_intensity(B: int, d_in: int, d_out: int, dtype_bytes: int = 2) -> float:
    flops = 2 * B * d_in * d_out                                   # a multiply and an add per weight per row
    nbytes = (B * d_in + d_in * d_out + B * d_out) * dtype_bytes  # read x and W once, write y once
    return flops / nbytes


@exercise("matmul_intensity", reference=ref_matmul_intensity,
          hint="x (B, d_in) @ W (d_in, d_out): 2 * B * d_in * d_out FLOPs; bytes: read x, read W, write y "
               "(B * d_out), each element dtype_bytes long")
def _matmul_intensity_cases(g):
    yield case("decode, batch 1, a 4096 x 4096 projection, bf16", 1, 4096, 4096, 2)
    yield case("batch 64, bf16", 64, 4096, 4096, 2)
    yield case("int8 weights and activations (1 byte)", 8, 4096, 14336, 1)
    yield case("fp32, a tall matmul (d_out >> d_in)", 16, 576, 49152, 4)
    yield case("square n = 8192: the big matmul of section 2", 8192, 8192, 8192, 2)
    yield case("a 1 x 1 matmul", 1, 1, 1, 2)
    for _ in range(4):
        yield case("random shape", _randint(1, 2048, g), _randint(1, 8192, g), _randint(1, 8192, g), [1, 2, 4][_randint(0, 3, g)])


def ref_decode_knee(model: str, context: int, peak_tflops: float, bw_gbps: float, dtype_bytes: int = 2,
                    max_batch: int = 4096):
    cfg = configs.ARCHITECTURES[model]

    def compute_bound(b):
        step = roofline.decode_step(cfg, b, context, dtype_bytes)
        return step["flops"] / (peak_tflops * 1e12) >= step["bytes"] / (bw_gbps * 1e9)

    if not compute_bound(max_batch):  # compute time / memory time grows with the batch: check the largest
        return None
    lo, hi = 1, max_batch  # compute_bound(hi) holds; find the first batch where it does
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if compute_bound(mid) else (mid + 1, hi)
    return lo


@exercise("decode_knee", reference=ref_decode_knee,
          hint="try batch = 1, 2, ..., max_batch: roofline.decode_step(cfg, batch, context, dtype_bytes) gives the "
               "step's flops and bytes; the first batch whose compute time flops / (peak * 1e12) is at least its "
               "memory time bytes / (bw * 1e9) is the knee; None if even max_batch stays memory-bound")
def _decode_knee_cases(g):
    bw, peak = hardware.SPECS["H100 80GB HBM3"]
    yield case("Qwen2.5-7B, no context: the knee near the ridge point", "Qwen2.5-7B", 0, float(peak), float(bw))
    yield case("Qwen2.5-7B, context 256", "Qwen2.5-7B", 256, float(peak), float(bw))
    yield case("Qwen2.5-7B, context 1024: memory-bound at any batch", "Qwen2.5-7B", 1024, float(peak), float(bw))
    yield case("Llama-2-7B (no GQA), context 4096: memory-bound at any batch", "Llama-2-7B", 4096, float(peak), float(bw))
    yield case("a device whose ridge is below 1 FLOP/B: compute-bound at batch 1", "SmolLM2-135M", 0, 0.005, 100.0)
    yield case("max_batch too small to reach the knee", "Llama-3-8B", 128, float(peak), float(bw), 2, 64)
    yield case("fp32 weights and cache (4 bytes)", "Mistral-7B", 64, float(peak), float(bw), 4)
    for name in ("T4", "H200", "A100-SXM4-80GB"):
        bw, peak = hardware.SPECS[name]
        model = list(configs.TWINS)[_randint(0, len(configs.TWINS), g)]
        yield case(f"random model and context, {name} sheet", model, _randint(0, 512, g), float(peak), float(bw))
