"""Notebook 05's end-to-end speed after the padded, graphed prefill (GPU probe): the plain engine
(graph mode, same target layers as speculation) with and without prefill_bucket=64, and prompt
lookup at k = 8 and 16 with it, on the first prompt of each task, 128 new tokens, greedy; phases of
the speculative calls (prefill, host round, rounds, syncs)."""
import json, os
import torch
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import DecodeEngine, compile_layers
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder, spec_speed, plain_speed

torch.set_grad_enabled(False)
hf, tok = load_model(dtype=torch.bfloat16, device="cuda")
tasks = speculative_tasks(tok, per_task=2, device="cuda")
model = Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)).set_attention("flash")
compile_layers(model, dynamic=True)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n_new": 128, "tasks": {}}
eng = {b: DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph", prefill_bucket=b) for b in (None, 64)}
for task, prompts in tasks.items():
    ids = prompts[0]
    r = {"prompt_tokens": ids.shape[1]}
    for b, e in eng.items():
        r[f"plain bucket={b}"] = plain_speed(e, ids, 128)
    for k in (8, 16):
        spec = SpeculativeDecoder(model, NGramDrafter(), k=k, graph=True, compile_glue=True, prefill_bucket=64)
        v = spec_speed(spec, ids, 128)
        ph = {}
        spec.generate_on_device(ids, 128, phases=ph)
        v["phases_ms"] = {n: (x * 1e3 if n != "syncs" else x) for n, x in ph.items()}
        v["acceptance"], v["tokens_per_round"] = spec.stats.acceptance, spec.stats.emitted / spec.stats.rounds
        ref = eng[64].generate(ids, 128)
        v["identical"] = bool(torch.equal(spec.generate_on_device(ids, 128), ref))
        v["speedup"] = v["tok_s"] / r["plain bucket=64"]["tok_s"]
        v["decode_speedup"] = v["decode_tok_s"] / r["plain bucket=64"]["decode_tok_s"]
        r[f"prompt lookup k={k}"] = v
    out["tasks"][task] = r
    print(task, json.dumps(r, default=float), flush=True)
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_speed05.json"), "w"), indent=1, default=float)
