"""Lab prompt lookup against HF's, both in fp32 on the GPU, on the same text (GPU probe, ~4 min).
In bf16 the greedy text of the embedded model depends on the kernels (HF, the lab's eager engine and
its graph engine part within 7-15 tokens on two of notebook 05's three prompts, probe_hf_text05), so
each speedup over its own plain decoding is measured on a different text. In fp32 the texts should
agree: this checks that, and times plain and prompt-lookup decoding of both (128 new tokens, first
prompt of each task; lab: graph engine and graphed on-device rounds, layers not compiled; HF:
generate, median of 3 calls after a warm-up call). Writes $OUT/probe_fp32_compare05.json."""
import json, os
import torch
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import DecodeEngine
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder, plain_speed, spec_speed

N = int(os.environ.get("N_NEW", 128))
torch.set_grad_enabled(False)
hf, tok = load_model(dtype=torch.float32, device="cuda")
tasks = speculative_tasks(tok, per_task=1, device="cuda")
model = Decoder.from_hf(hf).fuse_projections()
plain = DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph", prefill_bucket=64)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "float32", "tasks": {}}
for task, ps in tasks.items():
    ids = ps[0]; P = ids.shape[1]
    r = {}
    ref = plain.generate(ids, N)[0].tolist()
    r["lab_plain_tok_s"] = plain_speed(plain, ids, N)["tok_s"]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, do_sample=False,
              pad_token_id=tok.eos_token_id)
    for plk in (None, 10):
        extra = {} if plk is None else {"prompt_lookup_num_tokens": plk}
        o = hf.generate(ids, **kw, **extra)[0].tolist()
        t = time_fn(lambda: hf.generate(ids, **kw, **extra), warmup_ms=0, rep_ms=0, min_reps=3)
        r[f"hf_{'plain' if plk is None else 'pl10'}_tok_s"] = N / t.median_ms * 1e3
        r[f"hf_{'plain' if plk is None else 'pl10'}_same_text_as_lab"] = o == ref
    r["hf_pl10_speedup"] = r["hf_pl10_tok_s"] / r["hf_plain_tok_s"]
    for k in (4, 8, 16):
        spec = SpeculativeDecoder(model, NGramDrafter(3, compile=True), k=k, graph=True, compile_glue=True,
                                  prefill_bucket=64)
        s = spec_speed(spec, ids, N)
        o = spec.generate_on_device(ids, N)[0].tolist()
        r[f"lab_pl_k{k}"] = {"tok_s": s["tok_s"], "speedup": s["tok_s"] / r["lab_plain_tok_s"],
                             "same_text": o == ref, "tokens_per_round": spec.stats.emitted / max(spec.stats.rounds, 1)}
    out["tasks"][task] = r
    print(task, json.dumps(r, indent=1), flush=True)
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_fp32_compare05.json"), "w"), indent=1)
