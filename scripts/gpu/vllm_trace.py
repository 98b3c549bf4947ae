"""Notebook 06's trace through vLLM's offline engine, for the comparison with the lab's engines.

The same requests as the notebook (labutils.trace: its TraceSpec and seed, random token-id prompts of
the shape twin's vocabulary, greedy, EOS ignored, each request exactly its output length) go to
``vllm.LLM.generate`` on a **shape twin**: a directory holding only the architecture's config.json,
loaded with ``load_format="dummy"`` (random weights, so only speed means anything) and
``skip_tokenizer_init=True`` (prompts are token ids). The engine stays in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before vllm is imported).

Written to --out (JSON): the spec, vLLM's version, engine start time, the wall time of the one
``generate`` call over all requests (all submitted at t = 0, the offline throughput case), output
tok/s, and, when vLLM reports per-request stats (``disable_log_stats=False``: RequestOutput.metrics),
TTFT and TPOT p50/p99. A failure (vLLM absent, out of memory, ...) is written there too, as
{"ok": false, "error": ...}, and the exit status is 1.

    python scripts/gpu/vllm_trace.py --twin Qwen2.5-7B --n 256 --out build/vllm_trace.json

vLLM is imported inside ``main`` only: this file imports nothing at module level that a CPU machine
without vLLM lacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def twin_dir(name: str, root: str) -> str:
    """A directory with the shape twin's config.json only (transformers' save_pretrained)."""
    from transformers import AutoConfig

    from labutils import configs

    fields = configs.arch(name)
    fields.pop("hub_id")
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)  # keeps ``architectures``
    path = Path(root) / f"twin-{name}"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return str(path)


def _pct(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if xs else None


def request_times(out) -> tuple[float | None, float | None]:
    """(TTFT s, TPOT s) of one RequestOutput from vLLM's per-request stats, if it has them
    (v1: RequestStateStats with first_token_latency, first_token_ts, last_token_ts)."""
    m = getattr(out, "metrics", None)
    if m is None:
        return None, None
    ttft = getattr(m, "first_token_latency", None) or None
    if ttft is None and getattr(m, "first_token_time", None) and getattr(m, "arrival_time", None):
        ttft = m.first_token_time - m.arrival_time  # older RequestMetrics
    n = len(out.outputs[0].token_ids)
    first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
    tpot = (last - first) / (n - 1) if n > 1 and first and last > first else None
    return ttft, tpot


def run(a) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from labutils import configs
    from labutils.trace import Lengths, TraceSpec, make_trace

    spec = TraceSpec(a.n, None, Lengths.parse(a.prompt_len), Lengths.parse(a.output_len), "random", a.seed)
    vocab = configs.arch(a.twin)["vocab_size"]
    trace = make_trace(spec, vocab_size=vocab)
    max_len = a.max_model_len or (spec.prompt_len.hi + spec.output_len.hi)
    record = {"ok": False, "twin": a.twin, "spec": spec.describe(), "n": len(trace), "max_model_len": max_len}

    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    record["vllm_version"] = vllm.__version__
    record["import_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        llm = LLM(model=twin_dir(a.twin, root), load_format="dummy", skip_tokenizer_init=True, dtype=a.dtype,
                  max_model_len=max_len, gpu_memory_utilization=a.gpu_memory_utilization, seed=0,
                  enable_prefix_caching=not a.no_prefix_caching, disable_log_stats=a.no_stats)
        record["engine_start_s"] = time.perf_counter() - t0
        prompts = [{"prompt_token_ids": r.prompt} for r in trace]
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, min_tokens=r.max_tokens, ignore_eos=True,
                                 detokenize=False) for r in trace]
        warm = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)] * min(8, len(trace))
        llm.generate(prompts[:len(warm)], warm, use_tqdm=False)  # warm-up, not timed
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    n_out = [len(o.outputs[0].token_ids) for o in outs]
    times = [request_times(o) for o in outs]
    ttft = [t * 1e3 for t, _ in times if t is not None]
    tpot = [t * 1e3 for _, t in times if t is not None]
    record.update(ok=True, duration_s=wall, output_tokens=sum(n_out), input_tokens=sum(len(r.prompt) for r in trace),
                  output_tok_s=sum(n_out) / wall, all_lengths_exact=n_out == [r.max_tokens for r in trace],
                  ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99), tpot_p50_ms=_pct(tpot, 50),
                  tpot_p99_ms=_pct(tpot, 99), per_request_ttft_ms=ttft if len(ttft) == len(outs) else None)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--twin", default="Qwen2.5-7B", help="an architecture of labutils.configs")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--prompt-len", default="64:1024")
    p.add_argument("--output-len", default="32:512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-stats", action="store_true", help="disable vLLM's per-request stats (no TTFT)")
    p.add_argument("--out", default="build/vllm_trace.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = run(a)
    except Exception as e:  # noqa: BLE001  (the notebook reads the reason from the file)
        record = {"ok": False, "twin": a.twin, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("per_request_ttft_ms", "traceback")}, indent=2))
    return 0 if record.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
