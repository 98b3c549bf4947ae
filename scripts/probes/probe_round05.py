"""Why some speculative rounds cost twice others (GPU probe). In notebook 05's run of 2026-12-02,
prompt-lookup rounds on the embedded model cost ~1.0-1.1 ms, except continuation at k = 16 (2.29 ms)
and passage QA at k = 8 and 16 (2.16, 2.36 ms), while one verification forward of 9 or 17 tokens
after 256 cached positions cost ~1.0 ms. For each case: the phases of the timed calls (best of 3),
then one call with eager rounds under the profiler, CUDA time per kernel name, and the attention
kernel's shapes (cache length S, splits)."""
import json, os
import torch
from torch.profiler import ProfilerActivity, profile
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import compile_layers
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder, spec_speed

torch.set_grad_enabled(False)
hf, tok = load_model(dtype=torch.bfloat16, device="cuda")
tasks = speculative_tasks(tok, per_task=1, device="cuda")
model = Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)).set_attention("flash")
compile_layers(model, dynamic=True)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
for task, k in [("continuation", 8), ("continuation", 16), ("passage QA", 4), ("passage QA", 8),
                ("code editing", 16)]:
    ids = tasks[task][0]
    spec = SpeculativeDecoder(model, NGramDrafter(3, compile=True), k=k, graph=True, compile_glue=True,
                              prefill_bucket=64)
    v = spec_speed(spec, ids, 128)
    ph, r_before = {}, spec.stats.rounds
    spec.generate_on_device(ids, 128, phases=ph)
    rounds = spec.stats.rounds - r_before
    v.update(case=f"{task} k={k}", prompt=ids.shape[1], cache_len=spec.caches[0].max_seq_len,
             phases_ms={n: (x * 1e3 if n != "syncs" else x) for n, x in ph.items()}, rounds=rounds,
             ms_per_round=ph["rounds"] * 1e3 / max(rounds, 1), tokens_per_round=spec.stats.emitted / max(rounds, 1))
    # the same rounds eagerly, profiled: which kernels take the time
    spec.graph = False
    spec.generate_on_device(ids, 128)
    r0 = spec.stats.rounds
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        spec.generate_on_device(ids, 128)
        torch.cuda.synchronize()
    n_r = spec.stats.rounds - r0
    kern = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            kern[e.key[:70]] = (getattr(e, "self_device_time_total", 0) or e.self_cuda_time_total) / 1e3 / max(n_r, 1)
    top = sorted(kern.items(), key=lambda x: -x[1])[:12]
    v["eager_rounds"] = n_r
    v["kernel_ms_per_round"] = {a: round(b, 4) for a, b in top}
    v["kernel_ms_per_round_total"] = round(sum(kern.values()), 4)
    out["cases"].append(v)
    print(json.dumps(v, default=float), flush=True)
# HF generate, plain and prompt lookup 10, five timed calls each after a warm-up (the notebook's one
# timed call gave 14, 15 and 34 tok/s plain on the three tasks)
import time
out["hf"] = {}
for task, prompts in tasks.items():
    ids = prompts[0]
    for plk in (None, 10):
        kw = {} if plk is None else {"prompt_lookup_num_tokens": plk}
        ts = []
        for i in range(6):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                        do_sample=False, pad_token_id=tok.eos_token_id, **kw)
            torch.cuda.synchronize(); ts.append(128 / (time.perf_counter() - t0))
        out["hf"][f"{task} {'plain' if plk is None else 'prompt lookup 10'}"] = ts[1:]
        print(task, plk, [round(x, 1) for x in ts], flush=True)
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_round05.json"), "w"), indent=1, default=float)
