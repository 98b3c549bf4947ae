"""One-off H100 probe for notebook 04's budget: per-config GEMV times, bitsandbytes, e2e compile cost."""
import json, os, sys, time
import torch, triton
import torch.nn.functional as F
from triton.testing import do_bench
from labutils import quant, configs
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.models import shape_twin

OUT = os.environ.get("OUT", "/tmp"); DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 280)
res = {"layer": [], "configs": [], "e2e": []}
def save(): json.dump(res, open(f"{OUT}/probe_quant.json", "w"), indent=1)
def log(*a): print(*a, flush=True)
t0 = time.time()
N, K = 18944, 3584
dev = "cuda"
lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
res["layer"].append({"kernel": "cuBLAS bf16", "us": do_bench(lambda: F.linear(x, lin.weight)) * 1e3})
w16, x16 = lin.weight.half(), x.half()
res["layer"].append({"kernel": "cuBLAS fp16", "us": do_bench(lambda: F.linear(x16, w16)) * 1e3})
log(res["layer"])
qs = {fmt: quant.FORMATS[fmt].from_linear(lin) for fmt in ("int8", "int4", "nf4")}
kern = {"int8": quant._w8a16_kernel, "int4": quant._w4a16_kernel, "nf4": quant._w4a16_kernel}
all_cfgs = list(quant._w8a16_kernel.configs)
for fmt, q in qs.items():
    ta = time.time(); q(x); torch.cuda.synchronize(); tune_s = time.time() - ta
    us = do_bench(lambda: q(x)) * 1e3
    res["layer"].append({"kernel": f"lab {fmt} (autotuned)", "us": us, "tune_s": tune_s, "bytes": q.nbytes,
                         "GB/s": q.nbytes / us / 1e3, "best": str(kern[fmt].cache)})
    log(res["layer"][-1]); save()
for fmt, q in qs.items():  # every configuration alone
    k = kern[fmt]
    saved = k.configs
    for c in all_cfgs:
        if fmt != "int8" and 128 % c.kwargs["BLOCK_K"]:
            continue
        k.configs = [c]; k.cache = {}
        try:
            us = do_bench(lambda: q(x)) * 1e3
            res["configs"].append({"fmt": fmt, "cfg": str(c), "us": us, "GB/s": q.nbytes / us / 1e3})
        except Exception as e:
            res["configs"].append({"fmt": fmt, "cfg": str(c), "error": str(e)[:150]})
        log(res["configs"][-1])
    k.configs = saved; k.cache = {}
save()
try:
    import bitsandbytes as bnb
    W = lin.weight.detach().to("cpu", torch.float16)
    m8 = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=0.0)
    m8.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False); m8 = m8.to(dev)
    m4 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    m4.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4"); m4 = m4.to(dev)
    for name, m in (("bnb int8", m8), ("bnb nf4", m4)):
        m(x); res["layer"].append({"kernel": name, "us": do_bench(lambda: m(x)) * 1e3}); log(res["layer"][-1])
except Exception as e:
    res["layer"].append({"kernel": "bnb", "error": f"{type(e).__name__}: {str(e)[:200]}"})
save(); log("layer part", time.time() - t0)
# ---- end to end (Qwen2.5-7B shape twin), each step only if time is left
twin = shape_twin("Qwen2.5-7B", dtype=torch.bfloat16)
ids = torch.randint(0, 152064, (1, 32), device=dev)
def e2e(fmt, mode, est):
    left = DEADLINE - time.time()
    if left < est:
        res["e2e"].append({"fmt": fmt, "mode": mode, "skipped": f"{left:.0f} s left < {est}"}); save(); return
    ta = time.time()
    try:
        m = Decoder.from_hf(twin).fuse_projections()
        if fmt.startswith("bnb"):
            def mk(n, l):
                W = l.weight.detach().to("cpu", torch.float16)
                b = bnb.nn.Linear4bit(l.in_features, l.out_features, bias=l.bias is not None, compute_dtype=torch.bfloat16, quant_type="nf4")
                b.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4")
                if l.bias is not None:
                    b.bias = torch.nn.Parameter(l.bias.detach().cpu(), requires_grad=False)
                return b.to(dev)
            m.swap_linears(mk)
        else:
            quant.quantize_model(m, fmt)
        tq = time.time() - ta
        eng = DecodeEngine(m, batch=1, max_seq_len=180, mode=mode)
        eng.prefill(ids); tb = time.time(); eng._capture(); tcap = time.time() - tb
        tok_s = eng.decode_tok_s(ids, 128)
        res["e2e"].append({"fmt": fmt, "mode": mode, "tok_s": tok_s, "quantize_s": tq, "capture_s": tcap, "total_s": time.time() - ta})
    except Exception as e:
        res["e2e"].append({"fmt": fmt, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}", "total_s": time.time() - ta})
    torch._dynamo.reset(); torch.cuda.empty_cache()
    log(res["e2e"][-1]); save()
e2e("int4", "graph", 40)
e2e("int4", "compile", 110)
e2e("bnb_nf4", "graph", 40)
e2e("int8", "compile", 110)
log("total", time.time() - t0)
