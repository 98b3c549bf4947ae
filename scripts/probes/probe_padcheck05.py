"""Does the padded prefill change a greedy answer on the GPU? The plain engine (graph mode) with
and without prefill_bucket=64, the embedded model in fp32 and bf16 with notebook 03's Triton
attention (flash) and SmallMLinear, 128 new tokens on the first prompt of each task; for fp32 also
speculative decoding (prompt lookup, k = 8) against the plain engine."""
import json, os
import torch
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import DecodeEngine
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import NGramDrafter, SpeculativeDecoder

torch.set_grad_enabled(False)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    hf, tok = load_model(dtype=dtype, device="cuda")
    tasks = speculative_tasks(tok, per_task=2, device="cuda")
    model = Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)).set_attention("flash")
    e0 = DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph")
    e64 = DecodeEngine(model, batch=1, max_seq_len=1024, mode="graph", prefill_bucket=64)
    for task, prompts in tasks.items():
        ids = prompts[0]
        a, b = e0.generate(ids, 128), e64.generate(ids, 128)
        r = {"padded_equals_unpadded": bool(torch.equal(a, b)),
             "first_difference": int((a != b).nonzero()[0, 1]) - ids.shape[1] if not torch.equal(a, b) else None}
        spec = SpeculativeDecoder(model, NGramDrafter(), k=8, graph=True, prefill_bucket=64)
        s = spec.generate_on_device(ids, 128)
        r["spec_equals_plain"] = bool(torch.equal(s, b))
        out[f"{dtype} {task}"] = r
        print(dtype, task, r, flush=True)
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_padcheck05.json"), "w"), indent=1)
