"""The baselines of notebook 06 on the same trace as the continuous engine: static batching with the
lab decoder (labutils.serving.StaticBatchEngine) and HF ``generate`` with left-padded batches
(labutils.trace.replay_hf_generate): greedy outputs equal each request alone, a batch holds its rows
until its longest output is done, late requests wait for the batch; serving_metrics with the KV
utilization of the continuous engine. Tiny random model, CPU."""
from __future__ import annotations

import pytest
import torch

from conftest import prompts_of, tiny_hf_model
from labutils.decoder import Decoder
from labutils.scheduler import ContinuousEngine
from labutils.serving import Engine, Request, SequentialEngine, StaticBatchEngine, run_to_completion
from labutils.trace import (Lengths, TraceSpec, make_trace, replay_all_at_once, replay_engine, replay_hf_generate,
                            serving_metrics)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("qwen2-gqa-tied", seed=2)


@pytest.fixture(scope="module")
def tiny(hf):
    return Decoder.from_hf(hf)


def alone(model, requests, ctx=64):
    return {r.id: run_to_completion(SequentialEngine(model, ctx), [r])[r.id] for r in requests}


def test_static_batches_equal_alone_and_run_to_the_longest(tiny):
    """Five requests, max_batch 3: two batches (the second with an empty row); prompts of 3..30 tokens
    padded to the batch's longest; a 30-token prompt beside a 30-token output, so finished rows run
    past max_seq_len=40 (their positions are clamped) -- outputs equal each request alone."""
    lens, outs = (30, 3, 17, 9, 12), (2, 30, 5, 7, 1)
    reqs = [Request(f"s{i}", p, n) for i, (p, n) in enumerate(zip(prompts_of(lens, tiny.cfg.vocab_size, 0), outs))]
    engine = StaticBatchEngine(tiny, max_batch=3, max_seq_len=40, prefill_rows=2)
    assert isinstance(engine, Engine)
    got = run_to_completion(engine, reqs)
    ref = alone(tiny, reqs, 40)
    for r in reqs:
        assert got[r.id] == ref[r.id], f"{r.id}: static {got[r.id]} vs alone {ref[r.id]}"
    s = engine.stats()
    assert s["batches"] == 2
    # decode steps: batch 1 runs to its longest output (30 tokens: 29 decode steps), batch 2 to 7 (6 steps)
    assert s["steps"] == 2 + 29 + 6 and s["row_steps"] == 3 * (29 + 6)
    assert s["useful_row_steps"] == sum(outs) - len(outs)
    assert s["padded_prefill_tokens"] == 3 * 30 + 3 * 12 and s["prompt_tokens"] == sum(lens)
    assert s["kv_reserved_positions"] == 3 * 40
    assert not engine.has_unfinished()


def test_a_late_request_waits_for_the_whole_batch(tiny):
    """A request added while a batch runs gets its first token only after the batch's longest output
    is done, though the batch has an empty row."""
    a, b, c = prompts_of((5, 6, 7), tiny.cfg.vocab_size, 1)
    engine = StaticBatchEngine(tiny, max_batch=3, max_seq_len=40)
    engine.add(Request("long", a, 12))
    engine.add(Request("short", b, 2))
    first_of_late, step, done_long = None, 0, None
    while engine.has_unfinished():
        if step == 1:
            engine.add(Request("late", c, 3))
        for o in engine.step():
            if o.request_id == "late" and first_of_late is None:
                first_of_late = step
            if o.request_id == "long" and o.finished:
                done_long = step
        step += 1
    assert done_long == 11 and first_of_late == 12
    with pytest.raises(ValueError, match="greedy only"):
        engine.add(Request("t", a, 2, temperature=0.5))
    with pytest.raises(RuntimeError, match="GPU"):
        StaticBatchEngine(tiny, max_batch=2, max_seq_len=40, graph="on")


def test_hf_generate_left_padded_equals_alone(hf, tiny):
    """HF generate, batches of 3 with left padding and an attention mask: each request's tokens equal
    it alone on the lab decoder; records count its own tokens only."""
    spec = TraceSpec(n=5, rate=None, prompt_len=Lengths("uniform", 3, 20), output_len=Lengths("uniform", 2, 9),
                     prompts="random", seed=4)
    trace = make_trace(spec, vocab_size=tiny.cfg.vocab_size)
    toks = {}
    records, duration = replay_hf_generate(hf, trace, batch_size=3, tokens_out=toks)
    ref = alone(tiny, [Request(str(r.index), r.prompt, r.max_tokens) for r in trace])
    for r, rec in zip(trace, records):
        assert toks[r.index] == ref[str(r.index)], f"request {r.index}: HF {toks[r.index]} vs alone {ref[str(r.index)]}"
        assert rec.output_len == r.max_tokens and len(rec.itl) == r.max_tokens - 1
        assert 0 < rec.ttft <= rec.latency <= duration
    # the second batch starts after the first ends: its first token comes after the first batch's last
    assert min(rec.ttft for rec in records[3:]) > max(rec.latency for rec in records[:3])


def test_serving_metrics_of_the_three_engines(tiny):
    """The same offline trace through continuous, static and sequential engines: all complete every
    token; the continuous engine adds its KV utilization (paged above the contiguous reservation)."""
    spec = TraceSpec(n=6, rate=None, prompt_len=Lengths("uniform", 4, 24), output_len=Lengths("uniform", 3, 10),
                     prompts="random", seed=5)
    trace = make_trace(spec, vocab_size=tiny.cfg.vocab_size)
    want = sum(r.max_tokens for r in trace)
    engines = {"continuous": ContinuousEngine(tiny, num_blocks=32, block_size=8, max_seq_len=64, kv_sample_every=1),
               "static": StaticBatchEngine(tiny, max_batch=4, max_seq_len=64),
               "sequential": SequentialEngine(tiny, 64)}
    for name, e in engines.items():
        m = serving_metrics(*replay_all_at_once(e, trace), engine=e)
        assert m["completed"] == 6 and m["output_tokens"] == want, (name, m)
        assert m["ttft_p50_ms"] <= m["latency_p99_ms"]
        if name == "continuous":
            assert 0.5 < m["kv_utilization"] <= 1 and m["kv_utilization_contiguous"] < m["kv_utilization"]
            assert m["kv_samples"] > 0 and m["engine_stats"]["steps"] > 0
        else:
            assert "kv_utilization" not in m
    later = make_trace(TraceSpec(n=2, rate=50.0, prompt_len=Lengths("fixed", 5, 5), output_len=Lengths("fixed", 3, 3),
                                 prompts="random", seed=1), vocab_size=tiny.cfg.vocab_size)
    recs, _ = replay_engine(StaticBatchEngine(tiny, max_batch=2, max_seq_len=64), later)
    assert all(r.output_len == 3 for r in recs)


# ---- the GPU scripts run (or fail cleanly) on the CPU ---------------------------------------------------
def _script(name):
    import importlib.util

    from labutils.results import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "gpu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serving_bench_script_runs_every_engine(tmp_path):
    """scripts/gpu/serving_bench.py on a 2-layer model of the embedded model's shape, fp32: every
    engine completes the trace and the JSON holds its metrics."""
    import json

    out = tmp_path / "bench.json"
    rc = _script("serving_bench").main(["--twin", "SmolLM2-135M", "--layers", "2", "--dtype", "float32", "--n", "3",
                                        "--prompt-len", "8:16", "--output-len", "2:4", "--kv-gib", "0.01",
                                        "--max-batch", "4", "--static-batch", "2", "--hf-n", "2", "--hf-batch", "2",
                                        "--engines", "continuous,continuous-eager,static,hf", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0, {k: v.get("error") for k, v in record["results"].items()}
    for name in ("continuous", "continuous-eager", "static"):
        assert record["results"][name]["output_tokens"] == sum(r.max_tokens for r in make_trace(
            TraceSpec(3, None, Lengths("uniform", 8, 16), Lengths("uniform", 2, 4), "random", 0), vocab_size=49152))
    assert record["results"]["continuous"]["kv"]["samples"] > 0 and record["results"]["hf"]["completed"] == 2


def test_vllm_script_imports_without_vllm_and_reports_why(tmp_path):
    import importlib.util
    import json

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: this test is about a machine without it")
    out = tmp_path / "v.json"
    assert _script("vllm_trace").main(["--n", "2", "--out", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["ok"] is False and "vllm" in record["error"]
