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


HOST_TIMED_MS = 50.0  # on a GPU, calls at least this long are timed by the host's clock, one by one


def time_fn(fn, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3, cuda_graph: bool = False) -> Timing:
    """Median and 20th/80th percentile wall time of ``fn()`` in milliseconds, after warm-up, over at
    least ``min_reps`` timed calls (more as ``rep_ms`` allows). The first call is never timed (with
    ``warmup_ms=0`` it is the only warm-up). On a GPU a call under ``HOST_TIMED_MS`` is timed by
    ``triton.testing.do_bench``, a longer one (a whole ``generate``) call by call, synchronized.

    ``cuda_graph`` (GPU): time ``fn`` replayed from a CUDA graph, as a decode engine runs it, so that
    Python and launch overhead (tens of microseconds for a custom op behind an autotuner) do not hide
    a kernel of a few microseconds. L2 is flushed before every call inside the graph and the flush
    timed alone is subtracted, so weights smaller than L2 do not look faster than they would in a
    model. ``fn`` must be capturable (no host syncs, no allocation that changes between calls)."""
    if runtime.has_cuda() and cuda_graph:
        return _time_graph(fn, rep_ms)
    cuda = runtime.has_cuda()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()  # first call: estimate the cost (and warm up)
    sync()
    once = max(time.perf_counter() - t0, 1e-6) * 1e3
    if cuda and once < HOST_TIMED_MS:
        import triton.testing
        # do_bench runs rep // (its estimate of one call) times, at least once: stretch rep so it
        # runs min_reps times (a 0.35 s call with rep_ms=200 ran once: a median without a spread)
        rep = max(rep_ms, 1.1 * min_reps * once)
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    # a CPU, or a call long enough that the host's clock is exact for it (do_bench would spend five
    # more calls estimating it): timed one by one, the device synchronized around each
    for _ in range(int(warmup_ms // once)):
        fn()
    times = []
    for _ in range(max(min_reps, int(rep_ms // once))):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7])


def _time_graph(fn, rep_ms: float) -> Timing:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > any GPU's L2

    def capture(body):
        body()  # the first call on the default stream: a first compile on a side stream has stalled for minutes
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (autotuning, lazy init) outside the graph
            body()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        return g

    def replay_ms(g, n):
        times = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    g_flush = capture(flush.zero_)
    g_both = capture(lambda: (flush.zero_(), fn()))
    once = max(replay_ms(g_both, 3)[-1], 1e-3)
    n = max(10, int(rep_ms // once))
    base = statistics.median(replay_ms(g_flush, n))
    times = [t - base for t in replay_ms(g_both, n)]
    q = statistics.quantiles(times, n=10)
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
