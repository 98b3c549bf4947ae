"""probe_round05 again after rounds_until_end became ceil(left / (k + 1)) (GPU probe, short): prompt
lookup at continuation k = 16, passage QA k = 8, code editing k = 8 against the plain graph engine over
the same layers (fused projections, SmallMLinear, Triton attention; layers NOT compiled, to fit the
probe's few minutes, so the absolute speeds are below the notebook's), 128 new tokens, greedy, bf16;
per call the rounds run, tokens emitted and host syncs. Each case is printed as it finishes."""
import json, os
import torch
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import DecodeEngine
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder, plain_speed, spec_speed

torch.set_grad_enabled(False)
hf, tok = load_model(dtype=torch.bfloat16, device="cuda")
tasks = speculative_tasks(tok, per_task=1, device="cuda")
model = Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)).set_attention("flash")
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compiled_layers": False, "cases": []}
plain = DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph", prefill_bucket=64)
for task, k in [("continuation", 16), ("passage QA", 8), ("code editing", 8)]:
    ids = tasks[task][0]
    p = plain_speed(plain, ids, 128)
    spec = SpeculativeDecoder(model, NGramDrafter(3, compile=True), k=k, graph=True, compile_glue=True, prefill_bucket=64)
    v = spec_speed(spec, ids, 128)
    ph = {}
    spec.generate_on_device(ids, 128, phases=ph)
    v.update(case=f"{task} k={k}", plain=p, speedup=v["tok_s"] / p["tok_s"], rounds=spec.stats.rounds,
             emitted=spec.stats.emitted, syncs=ph["syncs"], rounds_ms=ph["rounds"] * 1e3,
             ms_per_round=ph["rounds"] * 1e3 / max(spec.stats.rounds, 1))
    out["cases"].append(v)
    print(json.dumps(v, default=float), flush=True)
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_round05b.json"), "w"), indent=1, default=float)
