"""Next probe for notebook 04 (H100): GEMV tilings timed in CUDA graphs, regional vs whole compile.
Usage on the device: python3 scripts/probes/probe_quant2.py SECONDS  (writes $OUT/probe_quant2.json as it goes)."""
import json, os, sys, time
import torch, triton
import torch.nn.functional as F
from labutils import quant
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.gemv import GemvLinear
from labutils.models import shape_twin

OUT = os.environ.get("OUT", "/tmp"); DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 400)
res = {"layer": [], "configs": [], "e2e": []}
def save(): json.dump(res, open(f"{OUT}/probe_quant2.json", "w"), indent=1)
def log(*a): print(*a, flush=True)
def us(fn): return time_fn(fn, rep_ms=50, cuda_graph=True).median_ms * 1e3
dev, t0 = "cuda", time.time()
SHAPES = {"up 3584->18944": (18944, 3584), "down 18944->3584": (3584, 18944), "qkv 3584->4608": (4608, 3584),
          "gate_up 3584->37888": (37888, 3584), "lm_head 3584->152064": (152064, 3584)}
for name, (N, K) in SHAPES.items():
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    row = {"shape": name, "cuBLAS": us(lambda: F.linear(x, lin.weight)), "gemv_bf16": us(lambda: GemvLinear(lin)(x))}
    for fmt in ("int8", "int4", "nf4"):
        q = quant.FORMATS[fmt].from_linear(lin)
        row[fmt] = us(lambda: q(x)); row[fmt + "_GBps"] = q.nbytes / row[fmt] / 1e3
        row[fmt + "_best"] = str([str(v) for v in (quant._w8_gemv_kernel if fmt == "int8" else quant._w4_gemv_kernel).cache.values()][-1:])
    res["layer"].append(row); log(row); save()
# every GEMV tiling alone on the headline shape (plus a few wider ones than the autotuned list)
N, K = 18944, 3584
lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
extra = {"int8": [(2, 2048, 4), (4, 4096, 8), (8, 4096, 8), (16, 2048, 8), (32, 1024, 8), (4, 1024, 2), (8, 512, 4)],
         "int4": [(4, 1024, 4), (4, 2048, 8), (16, 1024, 8), (32, 512, 8), (2, 1024, 4), (8, 2048, 8), (4, 256, 2)]}
for fmt, kern in (("int8", quant._w8_gemv_kernel), ("int4", quant._w4_gemv_kernel), ("nf4", quant._w4_gemv_kernel)):
    q = quant.FORMATS[fmt].from_linear(lin)
    saved = kern.configs
    cands = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in saved] + extra["int8" if fmt == "int8" else "int4"]
    for bn, bk, w in cands:
        for st in (2, 3, 4):
            kern.configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)]; kern.cache = {}
            try:
                t = us(lambda: q(x)); r = {"fmt": fmt, "BN": bn, "BK": bk, "warps": w, "stages": st, "us": t, "GB/s": q.nbytes / t / 1e3}
            except Exception as e:
                r = {"fmt": fmt, "BN": bn, "BK": bk, "warps": w, "stages": st, "error": str(e)[:150]}
            res["configs"].append(r); log(r)
    kern.configs = saved; kern.cache = {}
    save()
log("layers done", time.time() - t0)
twin = shape_twin("Qwen2.5-7B", dtype=torch.bfloat16)
ids = torch.randint(0, 152064, (1, 32), device=dev)
def e2e(fmt, regional, est):
    if DEADLINE - time.time() < est:
        res["e2e"].append({"fmt": fmt, "regional": regional, "skipped": True}); save(); return
    ta = time.time()
    try:
        m = Decoder.from_hf(twin).fuse_projections()
        m = m.swap_linears(lambda n, l: GemvLinear(l)) if fmt == "bf16" else quant.quantize_model(m, fmt)
        eng = DecodeEngine(m, batch=1, max_seq_len=180, mode="compile", regional=regional)
        tok_s = eng.decode_tok_s(ids, 128)
        res["e2e"].append({"fmt": fmt, "regional": regional, "tok_s": tok_s, "total_s": time.time() - ta})
    except Exception as e:
        res["e2e"].append({"fmt": fmt, "regional": regional, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    torch._dynamo.reset(); torch.cuda.empty_cache(); log(res["e2e"][-1]); save()
e2e("bf16", True, 60); e2e("int4", True, 60); e2e("int8", True, 60); e2e("bf16", False, 120); e2e("int4", False, 120)
log("total", time.time() - t0)
