"""Where the time of notebook 04's engine cell goes (H100, Qwen2.5-7B shape twin).

A first full run of notebook 04 spent over 7 minutes in its first engine (bf16, regional compile)
without finishing. This times each phase (build, prefill, warm-up/compile, capture, decode) for
regional and whole-step compilation, with TORCH_LOGS=recompiles to show any recompilation.
Usage: TORCH_LOGS=recompiles python3 scripts/probes/probe_e2e.py SECONDS
"""
import json
import os
import sys
import time

import torch

from labutils import quant
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.gemv import GemvLinear
from labutils.models import shape_twin

OUT = os.environ.get("OUT", "/tmp")
DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 200)
T0 = time.time()
res = []


def log(**kw):
    kw["t"] = round(time.time() - T0, 1)
    res.append(kw)
    print(kw, flush=True)
    json.dump(res, open(f"{OUT}/probe_e2e.json", "w"), indent=1)


twin = shape_twin("Qwen2.5-7B", dtype=torch.bfloat16)
ids = torch.randint(0, 152064, (1, 32), device="cuda")
log(phase="twin built")
for fmt, regional, path in [("bf16", True, "step first"), ("bf16", True, "decode_tok_s only")]:
    if time.time() > DEADLINE:
        break
    t = time.time()
    m = Decoder.from_hf(twin).fuse_projections()
    m = m.swap_linears(lambda n, l: GemvLinear(l)) if fmt == "bf16" else quant.quantize_model(m, fmt)
    eng = DecodeEngine(m, batch=1, max_seq_len=168, mode="compile", regional=regional)
    if path == "step first":
        eng.prefill(ids)
        torch.cuda.synchronize()
        log(fmt=fmt, path=path, phase="engine + prefill", s=time.time() - t)
        t = time.time()
        with torch.no_grad():  # as DecodeEngine.decode runs it (with grad, compile would trace a backward)
            eng.step_fn(eng.tok, eng.pos)  # the first compiled step: compile (and autotune) here
        torch.cuda.synchronize()
        log(fmt=fmt, path=path, phase="first step (compile, default stream)", s=time.time() - t)
        t = time.time()
    tok_s = eng.decode_tok_s(ids, 128, repeats=1)
    log(fmt=fmt, path=path, phase="decode_tok_s", s=time.time() - t, tok_s=tok_s)
    del eng, m
    torch._dynamo.reset()
    torch.cuda.empty_cache()
log(phase="done")
