"""Speculative decoding on the GPU before notebook 05's run: what the rounds cost and gain on the
embedded model (real weights, bf16), against the plain lab engine and HF generate in the same run.

1. ``plain``: DecodeEngine graph / compile (regional) tok/s on one prompt per task (128 tokens,
   prefill included, as SpeculativeDecoder.decode_tok_s counts).
2. ``spec``: prompt lookup (on-device rounds, one CUDA graph a round) for k in 1..8 and an early-exit
   drafter (the first 8 of 30 layers), per task: tok/s, acceptance, tokens per round; greedy text
   compared with the plain engine's.
3. ``compiled``: the same prompt lookup with the target's layers compiled (regional, dynamic shapes).
4. ``hf``: HF generate greedy, plain vs prompt_lookup_num_tokens 3 / 10, 64 tokens (min_new_tokens).
5. ``fp32``: greedy identity in fp32 (plain graph engine vs on-device speculation, k = 1..8).

Usage on the device: PYTHONPATH=$PWD python3 scripts/probes/probe_spec.py [SECONDS] (JSON to $OUT).
"""
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("probe_spec needs a CUDA GPU")

from labutils.bench import env_record  # noqa: E402
from labutils.data import TASKS, speculative_tasks  # noqa: E402
from labutils.decoder import Decoder  # noqa: E402
from labutils.engine import DecodeEngine, compile_layers  # noqa: E402
from labutils.models import load_model  # noqa: E402
from labutils.speculative import ModelDrafter, NGramDrafter, SpeculativeDecoder, plain_tok_s  # noqa: E402

DEADLINE = time.time() + (float(sys.argv[1]) if len(sys.argv) > 1 else 240)
OUT = os.environ.get("OUT", ".")
res = {"env": env_record(torch.bfloat16)}


def save():
    with open(os.path.join(OUT, "probe_spec.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def left():
    return DEADLINE - time.time()


N = 128
hf, tok = load_model(dtype=torch.bfloat16, device="cuda")
model = Decoder.from_hf(hf)
tasks = speculative_tasks(tok, per_task=1, device="cuda")
prompts = {t: tasks[t][0] for t in TASKS}
print({t: p.shape[1] for t, p in prompts.items()}, flush=True)

# 1. plain
t0 = time.time()
res["plain"] = {}
ref_out = {}
eng = DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph")
for t, ids in prompts.items():
    res["plain"][f"graph/{t}"] = plain_tok_s(eng, ids, N)
    ref_out[t] = eng.generate(ids, N)[0].tolist()
del eng
print("plain graph", res["plain"], f"{time.time() - t0:.0f}s", flush=True)
save()

# 2. speculation, eager kernels in graphs
res["spec"] = []
for t, ids in prompts.items():
    for name, drafter, ks in [("ngram", NGramDrafter(3), [1, 2, 3, 4, 6, 8]),
                              ("early-exit-8", ModelDrafter(model.first_layers(8), "early exit"), [2, 4])]:
        for k in ks:
            if left() < 120:
                break
            spec = SpeculativeDecoder(model, drafter, k=k, graph=True)
            tok_s = spec.decode_tok_s(ids, N)
            out = spec.generate_on_device(ids, N)[0].tolist()
            s = spec.stats
            row = {"task": t, "drafter": name, "k": k, "tok_s": tok_s,
                   "speedup_vs_graph": tok_s / res["plain"][f"graph/{t}"], "acceptance": s.acceptance,
                   "tokens_per_round": (s.emitted) / max(s.rounds, 1), "same_as_plain": out == ref_out[t]}
            host = SpeculativeDecoder(model, drafter, k=k, graph=True)
            row["host_loop_tok_s"] = host.decode_tok_s(ids, N, repeats=1, on_device=False)
            res["spec"].append(row)
            print(row, flush=True)
            del spec, host
    save()

# 3. compiled target (regional, dynamic T)
if left() > 150:
    t0 = time.time()
    cmodel = Decoder.from_hf(hf)
    compile_layers(cmodel, dynamic=True)
    eng = DecodeEngine(cmodel, batch=1, max_seq_len=1024, mode="graph")
    res["compiled"] = {}
    for t, ids in prompts.items():
        res["compiled"][f"plain/{t}"] = plain_tok_s(eng, ids, N)
        for k in (3, 6):
            spec = SpeculativeDecoder(cmodel, NGramDrafter(3), k=k, graph=True)
            res["compiled"][f"ngram k={k}/{t}"] = spec.decode_tok_s(ids, N)
        print(res["compiled"], f"{time.time() - t0:.0f}s", flush=True)
        save()
    del eng

# 4. HF
if left() > 60:
    res["hf"] = {}
    for t, ids in prompts.items():
        for plk in (None, 3, 10):
            kw = {} if plk is None else {"prompt_lookup_num_tokens": plk}
            times = []
            for r in range(2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                            do_sample=False, pad_token_id=tok.eos_token_id, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            res["hf"][f"{plk}/{t}"] = 64 / min(times)
            print("hf", t, plk, 64 / min(times), flush=True)
        save()

# 5. fp32 identity
if left() > 30:
    hf32, _ = load_model(dtype=torch.float32, device="cuda")
    m32 = Decoder.from_hf(hf32)
    eng = DecodeEngine(m32, batch=1, max_seq_len=1024, mode="graph")
    res["fp32_same"] = {}
    for t, ids in prompts.items():
        ref = eng.generate(ids, N)[0].tolist()
        for k in range(1, 9):
            for name, d in [("ngram", NGramDrafter(3)), ("early-exit", ModelDrafter(m32.first_layers(8)))]:
                out = SpeculativeDecoder(m32, d, k=k, graph=True).generate_on_device(ids, N)[0].tolist()
                res["fp32_same"][f"{name} k={k}/{t}"] = out == ref
    print("fp32 identical:", all(res["fp32_same"].values()),
          [k for k, v in res["fp32_same"].items() if not v], flush=True)
save()
print("done", flush=True)
