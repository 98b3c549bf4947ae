"""Where do the ~25-45 ms outside the rounds go in notebook 05's end-to-end timing? (GPU probe)
Builds the notebook's target (bf16, fused projections, SmallMLinear, flash attention, layers compiled
with dynamic=True), then times: the phases of spec.generate_on_device (prompt lookup, k=16, code
editing prompt), the plain engine's prefill, the prefill forward alone under three compile settings,
and profiles one prefill (top CPU ops)."""
import json, os, time
import torch
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import DecodeEngine, compile_layers
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder, spec_speed, plain_speed

torch._dynamo.config.recompile_limit = 64
torch.set_grad_enabled(False)  # inference only (custom ops have no backward)
dev = "cuda"
hf, tok = load_model(dtype=torch.bfloat16, device=dev)
tasks = speculative_tasks(tok, per_task=2, device=dev)
ids = tasks["code editing"][0]
model = Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)).set_attention("flash")
compile_layers(model, dynamic=True)
out = {}

def sync_t(fn, n=5):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)

spec = SpeculativeDecoder(model, NGramDrafter(), k=16, graph=True, compile_glue=True)
for i in range(2):
    ph = {}
    spec.generate_on_device(ids, 128, phases=ph)
    print("spec phases ms", {k: round(v * 1e3, 2) if k != "syncs" else v for k, v in ph.items()}, flush=True)
out["spec_phases_ms"] = {k: v * 1e3 if k != "syncs" else v for k, v in ph.items()}
eng = DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph")
eng.generate(ids, 8)
out["engine_prefill_ms"] = sync_t(lambda: eng.prefill(ids))
print("engine.prefill ms", out["engine_prefill_ms"], flush=True)
out["plain_speed"] = plain_speed(eng, ids, 128)
print(out["plain_speed"], flush=True)

from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.prefill(ids); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.prefill(ids); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
from labutils.speculative import static_caches
caches = static_caches(model, 1, 1024)
pos = torch.arange(ids.shape[1], device=dev)
with model.kv_caches_attached(caches):
    out["fwd_compiled_ms"] = sync_t(lambda: model(ids, pos, last_only=True))
    out["fwd_compiled_full_logits_ms"] = sync_t(lambda: model(ids, pos, return_hidden=True))
    with torch.compiler.set_stance("force_eager"):
        out["fwd_eager_ms"] = sync_t(lambda: model(ids, pos, last_only=True))
    print({k: v for k, v in out.items() if k.startswith("fwd")}, flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(ids, pos, return_hidden=True); torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table)
    out["profile"] = table
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    ph = {}; spec.generate_on_device(ids, 128, phases=ph); torch.cuda.synchronize()
t2 = prof.key_averages().table(sort_by="cpu_time_total", row_limit=20)
print(t2); out["profile_spec_call"] = t2
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_prefill05.json"), "w"), indent=1, default=str)
