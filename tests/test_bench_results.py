"""Timing helpers and the results files."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import labutils
from labutils import bench, results

REPO = Path(__file__).resolve().parent.parent


# ---- bench ------------------------------------------------------------------------------------------------
def test_time_fn_small_function():
    calls = []
    x = torch.randn(64, 64)

    def fn():
        calls.append(1)
        return x @ x

    t = bench.time_fn(fn, warmup_ms=5, rep_ms=20)
    assert isinstance(t, bench.Timing)
    assert t.median_ms > 0, t
    assert t.p20_ms <= t.median_ms <= t.p80_ms, f"median outside p20-p80: {t}"
    assert len(calls) >= 1 + 3, f"fn ran {len(calls)} times: no warm-up / repetitions"
    assert "ms" in str(t)


def test_time_fn_measures_time():
    t = bench.time_fn(lambda: time.sleep(0.004), warmup_ms=5, rep_ms=30)
    assert 3.9 <= t.median_ms <= 50, f"a 4 ms sleep measured as {t}"
    assert t.p20_ms <= t.median_ms <= t.p80_ms, str(t)


def test_time_fn_slow_call_warms_up_once_then_times_min_reps():
    """A slow call (a whole generate) with no warm-up time and no rep budget: the first call is the
    warm-up and is not timed, then exactly min_reps timed calls; the slow first call is left out."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.06 if len(calls) == 1 else 0.01)

    t = bench.time_fn(fn, warmup_ms=0, rep_ms=0, min_reps=3)
    assert len(calls) == 4, f"{len(calls)} calls"
    assert 9 <= t.median_ms < 40, t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_time_fn_cuda_graph_matches_bandwidth():
    """A 1 GiB copy timed from a CUDA graph (flush subtracted) agrees with do_bench within 20%."""
    x = torch.empty(2**29, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    graph = bench.time_fn(lambda: y.copy_(x), rep_ms=50, cuda_graph=True)
    plain = bench.time_fn(lambda: y.copy_(x), rep_ms=50)
    assert 0.8 <= graph.median_ms / plain.median_ms <= 1.2, f"graph {graph} vs launches {plain}"


def test_time_fn_cuda_graph_is_ignored_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    t = bench.time_fn(lambda: time.sleep(0.002), warmup_ms=2, rep_ms=10, cuda_graph=True)
    assert 1.9 <= t.median_ms <= 50, str(t)


def test_sweep():
    grid = {"n": [1, 2, 3], "mode": ["a", "b"]}
    seen = []

    def fn(n, mode):
        seen.append((n, mode))
        return {"double": 2 * n, "tag": f"{mode}{n}"}

    df = bench.sweep(fn, grid, progress=False)
    assert len(df) == 6 and sorted(seen) == sorted((n, m) for n in grid["n"] for m in grid["mode"]), seen
    assert list(df.columns[:2]) == ["n", "mode"] and {"double", "tag"} <= set(df.columns), list(df.columns)
    assert (df["double"] == 2 * df["n"]).all()
    assert (df["tag"] == df["mode"] + df["n"].astype(str)).all()
    scalar = bench.sweep(lambda x: x * 10, {"x": [1, 5]}, progress=False)
    assert list(scalar.columns) == ["x", "value"] and scalar["value"].tolist() == [10, 50]


def test_env_record():
    rec = bench.env_record(torch.bfloat16)
    assert rec["dtype"] == "bfloat16"
    assert bench.env_record()["dtype"] is None
    assert rec["device"] == labutils.runtime.device_name() and rec["device"]
    assert rec["versions"]["torch"] == torch.__version__
    import transformers
    assert rec["versions"]["transformers"] == transformers.__version__
    assert rec["smoke"] is True  # conftest sets LAB_SMOKE=1
    assert rec["triton_interpreter"] == labutils.runtime.triton_interpreted()


# ---- results ------------------------------------------------------------------------------------------------
KEYS = {"notebook", "device", "smoke", "created", "versions", "dtype", "metrics"}


def test_save_results(monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path))
    metrics = {"np_f32": np.float32(1.5), "np_i64": np.int64(7), "np_bool": np.bool_(True),
               "torch_scalar": torch.tensor(2.25), "torch_int": torch.tensor(3), "plain": [1, "x"],
               "nested": {"tok_s": np.float64(123.5)}}
    path = results.save_results("00_test", metrics, dtype=torch.float16, note="extra field")
    assert path == tmp_path / "00_test.json" and path.is_file(), path
    record = json.loads(path.read_text())
    assert KEYS <= set(record), f"missing {KEYS - set(record)}"
    assert record["notebook"] == "00_test" and record["smoke"] is True and record["dtype"] == "float16"
    assert record["note"] == "extra field"
    assert record["metrics"] == {"np_f32": 1.5, "np_i64": 7, "np_bool": True, "torch_scalar": 2.25,
                                 "torch_int": 3, "plain": [1, "x"], "nested": {"tok_s": 123.5}}
    assert isinstance(record["metrics"]["np_i64"], int) and isinstance(record["metrics"]["np_bool"], bool)
    import datetime as dt
    created = dt.datetime.fromisoformat(record["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600, record["created"]
    assert record["versions"]["torch"] == torch.__version__
    assert results.load_results("00_test") == record
    assert results.load_results("99_absent") is None


def test_save_results_arrays(monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path))
    path = results.save_results("00_arrays", {"np": np.arange(3), "torch": torch.tensor([0.5, 1.5])})
    assert json.loads(path.read_text())["metrics"] == {"np": [0, 1, 2], "torch": [0.5, 1.5]}


def test_save_results_rejects_unknown_objects(monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path))
    with pytest.raises(TypeError, match="object"):
        results.save_results("00_bad", {"x": object()})


def test_results_dir_smoke_and_full(monkeypatch):
    monkeypatch.delenv("LAB_RESULTS_DIR", raising=False)
    monkeypatch.setenv("LAB_SMOKE", "1")
    assert results.results_dir() == REPO / "build" / "results", results.results_dir()
    monkeypatch.setenv("LAB_SMOKE", "0")
    assert results.results_dir() == REPO / "results", results.results_dir()
    assert results.results_dir(smoke=True) == REPO / "build" / "results"
    monkeypatch.setenv("LAB_RESULTS_DIR", "/somewhere/else")
    assert results.results_dir() == Path("/somewhere/else")
