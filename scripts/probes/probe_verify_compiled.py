"""Does `verify_ms` on the Qwen2.5-7B shape twin with compiled layers (notebook 05, section 6) finish,
and how long does each T take (compile included)? Prints one line per (variant, T) with the elapsed
wall time, so a stall shows where it is. Writes $OUT/probe_verify_compiled.json.

Usage on the device: PYTHONPATH=$PWD python3 scripts/probes/probe_verify_compiled.py
"""
import json
import os
import time

import torch

from labutils.decoder import Decoder
from labutils.engine import compile_layers
from labutils.gemv import SmallMLinear
from labutils.models import shape_twin
from labutils.speculative import verify_ms

twin = shape_twin("Qwen2.5-7B", dtype=torch.bfloat16)
rows = []
t00 = time.perf_counter()
for name, attn in (("compiled", "sdpa"), ("compiled + flash", "flash")):
    m = compile_layers(Decoder.from_hf(twin, attention=attn).fuse_projections()
                       .swap_linears(lambda n, l: SmallMLinear(l)), dynamic=True)
    for T in (1, 2, 5, 8, 16):
        t0 = time.perf_counter()
        t = verify_ms(m, T, rep_ms=100)
        rows.append({"variant": name, "T": T, "ms": t.median_ms, "wall_s": time.perf_counter() - t0})
        print(rows[-1], f"total {time.perf_counter() - t00:.0f} s", flush=True)
    del m
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe_verify_compiled.json"), "w"), indent=1)
