"""Timing that a reader can trust: warm-up, many repetitions, median and spread, and the machine.

On a GPU, ``time_fn`` uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs);
on the CPU, ``time.perf_counter``. ``sweep`` runs a function over a grid and returns a DataFrame,
ready for a table and a plotly chart. ``env_record`` describes the machine for every result.
"""
from __future__ import annotations

import itertools
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from . import runtime


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    def __str__(self):
        return f"{self.median_ms:.3f} ms (p20-p80 {self.p20_ms:.3f}-{self.p80_ms:.3f})"


def time_fn(fn, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3) -> Timing:
    """Median and 20th/80th percentile wall time of ``fn()`` in milliseconds, after warm-up."""
    if runtime.has_cuda():
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    t0 = time.perf_counter()
    fn()  # first call: estimate the cost, then warm up for warmup_ms
    once = max(time.perf_counter() - t0, 1e-6) * 1e3
    for _ in range(int(warmup_ms // once)):
        fn()
    times = []
    for _ in range(max(min_reps, int(rep_ms // once))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7])


def sync():
    if runtime.has_cuda():
        torch.cuda.synchronize()


def sweep(fn, grid: dict, progress: bool = True, desc: str = "sweep"):
    """Call ``fn(**point)`` for every point of the grid; one DataFrame row per point.

    ``fn`` returns a dict of measured columns (or a single number, stored as ``value``).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    keys = list(grid)
    points = list(itertools.product(*(grid[k] for k in keys)))
    rows = []
    for values in tqdm(points, desc=desc, disable=not progress):
        point = dict(zip(keys, values))
        out = fn(**point)
        rows.append({**point, **(out if isinstance(out, dict) else {"value": out})})
    return pd.DataFrame(rows)


def versions() -> dict:
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if runtime.has_cuda():
        out["cuda"] = torch.version.cuda
    return out


def env_record(dtype: torch.dtype | None = None) -> dict:
    """Device, run mode, dtype and library versions, attached to every result."""
    return {"device": runtime.device_name(), "smoke": runtime.smoke(),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "triton_interpreter": runtime.triton_interpreted(), "versions": versions(),
            "platform": f"{platform.system()} {platform.machine()}"}
