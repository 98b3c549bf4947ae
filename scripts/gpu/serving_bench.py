"""Notebook 06's throughput comparison outside the notebook: one trace through the lab's engines on a
shape twin, each engine's metrics to one JSON (and a table on stdout). A probe for the GPU machine:
quicker to run and read than the whole notebook, the same package code.

    python scripts/gpu/serving_bench.py [--twin Qwen2.5-7B] [--n 256] [--engines continuous,static,hf]
                                        [--block-size 16] [--kv-gib 40] [--max-batch 256] [--static-batch 64]
                                        [--hf-n 64] [--graphs auto] [--out build/serving_bench.json]

Engines: ``continuous`` (labutils.scheduler.ContinuousEngine), ``continuous-eager`` (the same, CUDA
graphs off), ``static`` (labutils.serving.StaticBatchEngine), ``hf`` (labutils.trace.replay_hf_generate
on the first --hf-n requests). Each engine gets a short warm-up trace first (Triton compilation,
graph capture), not timed. Every request is greedy, EOS ignored, all arriving at t = 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--twin", default="Qwen2.5-7B")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--prompt-len", default="64:1024")
    p.add_argument("--output-len", default="32:512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="continuous,static,hf")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-gib", type=float, default=40.0, help="the continuous engine's KV pool")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--static-batch", type=int, default=64)
    p.add_argument("--hf-n", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 on a GPU; float32 in Triton's interpreter")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (a smoke run: no longer a twin)")
    p.add_argument("--out", default="build/serving_bench.json")
    a = p.parse_args(argv)

    import torch

    from labutils.decoder import Decoder
    from labutils.models import shape_twin
    from labutils.paged_cache import BlockPool
    from labutils.scheduler import ContinuousEngine
    from labutils.serving import StaticBatchEngine
    from labutils.trace import (Lengths, TraceSpec, format_metrics, make_trace, replay_all_at_once,
                                replay_hf_generate, serving_metrics)

    from labutils import runtime

    hf = shape_twin(a.twin, dtype=getattr(torch, a.dtype),
                    **({"num_hidden_layers": a.layers} if a.layers else {}))
    model = Decoder.from_hf(hf)
    spec = TraceSpec(a.n, None, Lengths.parse(a.prompt_len), Lengths.parse(a.output_len), "random", a.seed)
    trace = make_trace(spec, vocab_size=model.cfg.vocab_size)
    warm = make_trace(TraceSpec(8, None, Lengths("uniform", 8, min(64, spec.prompt_len.hi)),
                                Lengths("uniform", 2, min(8, spec.output_len.hi)), "random", 99),
                      vocab_size=model.cfg.vocab_size)
    max_len = spec.prompt_len.hi + spec.output_len.hi
    per_block = BlockPool.for_model(model, 1, a.block_size).bytes_per_block()
    num_blocks = int(a.kv_gib * 2**30 // per_block)
    record = {"twin": a.twin, "layers": a.layers, "spec": spec.describe(), "device": runtime.device_name(),
              "num_blocks": num_blocks,
              "block_size": a.block_size, "results": {}}
    print(f"{a.twin} shape twin; {spec.describe()}", flush=True)
    for name in a.engines.split(","):
        t0 = time.perf_counter()
        try:
            if name.startswith("continuous"):
                e = ContinuousEngine(model, num_blocks, a.block_size, max_batch=a.max_batch,
                                     max_num_batched_tokens=a.max_num_batched_tokens, max_seq_len=max_len,
                                     graphs="off" if name == "continuous-eager" else "auto")
                e.capture()
                replay_all_at_once(e, warm)
                e.reset_kv_samples()
                m = serving_metrics(*replay_all_at_once(e, trace), engine=e)
                m["kv"] = e.kv_summary()
            elif name == "static":
                e = StaticBatchEngine(model, max_batch=a.static_batch, max_seq_len=max_len)
                replay_all_at_once(e, warm)
                m = serving_metrics(*replay_all_at_once(e, trace), engine=e)
            elif name == "hf":
                e = None
                replay_hf_generate(hf, warm[:2], batch_size=2)
                m = serving_metrics(*replay_hf_generate(hf, trace[:a.hf_n], batch_size=a.hf_batch))
            else:
                raise ValueError(f"unknown engine {name!r}")
            del e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            m["wall_s"] = time.perf_counter() - t0
            record["results"][name] = m
            print(f"--- {name} ({m['wall_s']:.0f} s with warm-up)\n{format_metrics(m)}", flush=True)
        except Exception as ex:  # noqa: BLE001  (the next engine still runs; the error is in the file)
            record["results"][name] = {"error": f"{type(ex).__name__}: {ex}", "traceback": traceback.format_exc()[-2000:]}
            print(f"--- {name} failed: {type(ex).__name__}: {ex}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print("\nengine               output tok/s   TTFT p50 ms   TPOT p50 ms")
    for name, m in record["results"].items():
        if "error" not in m:
            print(f"{name:20s} {m['output_tok_s']:12,.0f} {m['ttft_p50_ms']:13,.0f} {m['tpot_p50_ms']:13,.1f}")
    return 0 if all("error" not in m for m in record["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
