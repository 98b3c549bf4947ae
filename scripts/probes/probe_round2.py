"""The cost of verifying T tokens on the embedded model (bf16), by linear layer and attention kernel,
and speculative rounds on the fastest. On the H200 (probe_round.py): one forward over regionally
compiled layers costs 0.90 ms at T = 1 but 1.61 ms at T = 9 (cuBLAS, SDPA with a mask), and a
prompt-lookup round is that forward plus ~0.04 ms: the verification, not the glue, is the round's
cost. Here: cuBLAS or SmallMLinear (labutils/gemv.py), SDPA or the lab's Triton attention ("flash"),
layers compiled (dynamic=True); per variant verify_ms at T = 1, 9, 17, the plain graph engine's decode
ms per token, and prompt-lookup rounds (k = 8, 16; code editing and continuation): tokens per round,
tok/s over 128 new tokens with prefill, one round's replay (ms). Writes $OUT/probe_round2.json.

Usage on the device: PYTHONPATH=$PWD python3 scripts/probes/probe_round2.py
"""
import json
import os
import time

import torch

from labutils.bench import env_record, time_fn
from labutils.data import speculative_tasks
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine, compile_layers
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder, plain_tok_s, verify_ms

OUT = os.path.join(os.environ.get("OUT", "."), "probe_round2.json")
res = {"env": env_record(), "variants": []}
hf, tok = load_model(dtype=torch.bfloat16, device="cuda")
tasks = speculative_tasks(tok, per_task=1, device="cuda")
t00 = time.perf_counter()
for vname, small_m, attn in (("SmallMLinear + flash", True, "flash"), ("SmallMLinear + sdpa", True, "sdpa"),
                             ("cuBLAS + flash", False, "flash")):
    m = Decoder.from_hf(hf, attention=attn).fuse_projections()
    if small_m:
        m.swap_linears(lambda n, l: SmallMLinear(l))
    compile_layers(m, dynamic=True)
    row = {"variant": vname, "verify_ms": {T: verify_ms(m, T, rep_ms=100).median_ms for T in (1, 9, 17)}}
    eng = DecodeEngine(m, batch=1, max_seq_len=1024, mode="graph")
    row["plain_decode_ms"] = 1000 / eng.decode_tok_s(tasks["code editing"][0], 256)
    row["plain_tok_s_128"] = {t: plain_tok_s(eng, tasks[t][0], 128) for t in ("code editing", "continuation")}
    del eng
    print(row, f"{time.perf_counter() - t00:.0f} s", flush=True)
    row["rounds"] = []
    for k in (8, 16):
        for task in ("code editing", "continuation"):
            ids = tasks[task][0]
            spec = SpeculativeDecoder(m, NGramDrafter(3, compile=True), k=k, graph=True, compile_glue=True)
            spec.generate_on_device(ids, 128)
            r = {"k": k, "task": task, "tokens_per_round": spec.stats.emitted / max(spec.stats.rounds, 1),
                 "tok_s_128": spec.decode_tok_s(ids, 128)}
            g, L0 = spec._round_graphs[k], torch.tensor([ids.shape[1] + 1], device="cuda")
            r["round_ms"] = time_fn(lambda: (spec._L.copy_(L0), g.replay()), rep_ms=50).median_ms
            row["rounds"].append(r)
            print(r, f"{time.perf_counter() - t00:.0f} s", flush=True)
    res["variants"].append(row)
    json.dump(res, open(OUT, "w"), indent=1)
