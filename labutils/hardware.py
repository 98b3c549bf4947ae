"""This device's two ceilings, measured (notebook 00): memory bandwidth and matmul rate.

Every later speed in the book is shown as a fraction of these, measured in the same run.
"""
from __future__ import annotations

import torch

from . import runtime
from .bench import time_fn


def copy_bandwidth_gbps(nbytes: int | None = None, rep_ms: float = 200) -> dict:
    """Device-to-device copy of ``nbytes``: GB/s counting bytes read plus bytes written."""
    dev = runtime.device()
    nbytes = nbytes or runtime.pick(2 * 2**30, 64 * 2**20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)  # never time all-zero data
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), rep_ms=rep_ms)
    return {"nbytes": nbytes, "ms": t.median_ms, "gbps": 2 * nbytes / (t.median_ms * 1e-3) / 1e9,
            "gbps_p20_p80": [2 * nbytes / (t.p80_ms * 1e-3) / 1e9, 2 * nbytes / (t.p20_ms * 1e-3) / 1e9]}


def matmul_tflops(n: int, dtype: torch.dtype, rep_ms: float = 200) -> dict:
    """(n x n) @ (n x n) in ``dtype``: 2 n^3 FLOPs over the median time."""
    dev = runtime.device()
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_fn(lambda: a @ b, rep_ms=rep_ms)
    rate = lambda ms: 2 * n**3 / (ms * 1e-3) / 1e12  # noqa: E731
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": t.median_ms, "ms_p20_p80": [t.p20_ms, t.p80_ms],
            "tflops": rate(t.median_ms), "tflops_p20_p80": [rate(t.p80_ms), rate(t.p20_ms)]}


def matmul_peak_tflops(dtype: torch.dtype | None = None, sizes=None) -> tuple[float, list[dict]]:
    """The best rate over a few square sizes (large ones keep the tensor cores busy), and every row."""
    dtype = dtype or runtime.default_dtype()
    sizes = sizes or runtime.pick([4096, 8192, 16384], [256, 512])
    rows = [matmul_tflops(n, dtype) for n in sizes]
    return max(r["tflops"] for r in rows), rows


# Data-sheet ceilings (dense, no sparsity): memory GB/s and bf16 TFLOP/s, matched by device name.
# The notebooks print measured / spec so the reader sees how close a GPU gets to its sheet.
SPECS = {
    "H100 80GB HBM3": (3350, 989), "H100 NVL": (3900, 835), "H100 PCIe": (2000, 756),
    "H200": (4800, 989), "A100-SXM4-80GB": (2039, 312), "A100-SXM4-40GB": (1555, 312),
    "A100 80GB PCIe": (1935, 312), "L4": (300, 121), "L40S": (864, 362), "RTX 4090": (1008, 165),
    "A10G": (600, 125), "T4": (320, 65),
}


def spec_sheet(name: str | None = None) -> tuple[float, float] | None:
    """(GB/s, bf16 TFLOP/s) from the data sheet for this device, or None if unknown (or a CPU)."""
    name = name or runtime.device_name()
    for key, spec in SPECS.items():
        if key in name:
            return spec
    return None


def ceilings() -> dict:
    """This device's two ceilings for a later notebook: ``copy_gbps`` and ``matmul_bf16_tflops``,
    read from notebook 00's results when those were measured on this device (in the same mode, smoke
    or full), so that every notebook of a book run divides by the same measurement; measured here
    otherwise. ``source`` says which ("notebook 00 (<date>)" or "measured now")."""
    from .results import load_results

    rec = load_results("00_roofline")
    if rec is not None and rec.get("device") == runtime.device_name():
        m = rec["metrics"]
        return {"copy_gbps": float(m["copy_gbps"]), "matmul_bf16_tflops": float(m["matmul_bf16_tflops"]),
                "source": f"notebook 00 ({rec.get('created', '?')[:10]})"}
    return {"copy_gbps": copy_bandwidth_gbps()["gbps"], "matmul_bf16_tflops": matmul_peak_tflops(torch.bfloat16)[0],
            "source": "measured now"}
