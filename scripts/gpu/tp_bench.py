#!/usr/bin/env python3
"""Notebook 07's GPU measurements: tensor-parallel batch-1 decoding of shape twins on 1, 2 (4, 8) GPUs.

Run from the repository root on the multi-GPU machine (no model files needed: shape twins and the
embedded model's canary; the embedded GGUF is only needed for the canary, see README's GPU section):

    PYTHONPATH=$PWD python3 scripts/gpu/tp_bench.py              # ~5-6 min on 2 H200s, budget 480 s
    PYTHONPATH=$PWD python3 scripts/gpu/tp_bench.py --smoke      # CPU: gloo, eager, tiny stand-ins (~2 min)

Each measurement is its own torchrun launch (labutils.tp.benchmark): the canary (the embedded model
sharded, NCCL, decode step in a CUDA graph, against the whole model), the all-reduce / all-gather
latency alone, then the Qwen2.5-7B twin on 1 and 2 GPUs (CUDA graphs, then compiled layers) and the
Llama-3-70B twin on 2 GPUs (CUDA graphs; one GPU cannot hold it: predicted only). Progress is
printed as it comes; results go to results/07_tensor_parallel.json (build/results/ in a smoke run)
and to $OUT when that is set. NVLink multicast stays off (labutils.tp.NCCL_ENV).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from labutils.tp import MODELS, NCCL_ENV, benchmark  # noqa: E402

os.environ.update(NCCL_ENV)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=480, help="seconds for all launches together")
    p.add_argument("--worlds", default=None, help="e.g. 1,2 (default: 1, 2, 4, 8 up to the GPUs visible)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--compile", default="Qwen2.5-7B", help="models also measured with compiled layers ('' for none)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="CPU: gloo, eager, tiny stand-ins of the models")
    a = p.parse_args()
    if a.smoke:
        os.environ["LAB_SMOKE"] = "1"
    import torch

    from labutils.results import save_results

    t0 = time.perf_counter()
    worlds = [int(w) for w in a.worlds.split(",")] if a.worlds else None
    rec = benchmark(worlds=worlds, models=tuple(a.models.split(",")), budget_s=a.budget, smoke=a.smoke,
                    compile_models=tuple(filter(None, a.compile.split(","))), new_tokens=a.new_tokens)
    print(json.dumps(rec["summary"], indent=1))
    for s in rec["skipped"]:
        print("skipped:", s)
    try:  # how the GPUs are linked (NVLink or PCIe), for the record
        topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        topology = None
    path = save_results("07_tensor_parallel", rec["summary"], dtype=torch.bfloat16 if not a.smoke else torch.float32,
                        device_count=rec["device_count"], worlds=rec["worlds"], runs=rec["runs"],
                        skipped=rec["skipped"], seconds=time.perf_counter() - t0, topology=topology)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)


if __name__ == "__main__":
    main()
