"""Where the embedded model's 1-to-2-row jump goes (GPU probe, ~2-3 min). Notebook 05's run of
2026-12-02 measured one forward of T tokens on the embedded model (bf16, fused projections,
SmallMLinear, notebook 03's attention, compiled layers, CUDA graph) at 0.862 / 0.976 / 0.987 /
1.010 ms for T = 1 / 2 / 5 / 9: most of a round's extra cost over a plain step is the jump from 1 to
2 rows. This times, for T = 1, 2, 5, 9: the whole forward in four variants (the notebook's; its
layers not compiled; SDPA instead of the Triton attention; cuBLAS instead of SmallMLinear), then
each distinct linear layer alone (SmallMLinear and nn.Linear) and the attention call alone
(flash_backend and SDPA, 256 cached positions), all replayed from CUDA graphs. Writes
$OUT/probe_rows135.json, printing as it goes."""
import json, os, time
import torch
import torch.nn.functional as F
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.engine import compile_layers
from labutils.flash_attention import flash_backend
from labutils.gemv import SmallMLinear
from labutils.models import load_model
from labutils.speculative import verify_ms

t0 = time.time()
torch.set_grad_enabled(False)
hf, tok = load_model(dtype=torch.bfloat16, device="cuda")
Ts = (1, 2, 5, 9)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "forward_ms": {},
       "linear_us": {}, "attention_us": {}}
OUT = os.environ.get("OUT", "build"); os.makedirs(OUT, exist_ok=True)


def save():
    json.dump(out, open(os.path.join(OUT, "probe_rows135.json"), "w"), indent=1)


def build(small=True, attn="flash", comp=True):
    m = Decoder.from_hf(hf, attention=attn).fuse_projections()
    if small:
        m.swap_linears(lambda n, l: SmallMLinear(l))
    return compile_layers(m, dynamic=True) if comp else m


# parts first (cheap), then whole forwards
m0 = build(small=False, comp=False)  # nn.Linear everywhere: its shapes (after swap_linears they are SmallMLinear)
shapes = sorted({(l.in_features, l.out_features) for l in m0.modules() if isinstance(l, torch.nn.Linear)})
for (i, o) in shapes:
    lin = torch.nn.Linear(i, o, bias=False, device="cuda", dtype=torch.bfloat16)
    sm = SmallMLinear(lin)
    for T in Ts:
        x = torch.randn(T, i, device="cuda", dtype=torch.bfloat16)
        out["linear_us"][f"{i}->{o} T={T}"] = {
            "SmallMLinear": time_fn(lambda: sm(x), rep_ms=50, cuda_graph=True).median_ms * 1e3,
            "nn.Linear": time_fn(lambda: lin(x), rep_ms=50, cuda_graph=True).median_ms * 1e3}
        print(f"{i}->{o} T={T}", {k: round(v, 2) for k, v in out["linear_us"][f"{i}->{o} T={T}"].items()}, flush=True)
save()
cfg = m0.cfg
S = 256
k = torch.randn(1, cfg.n_kv_head, S + 16, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
for T in Ts:
    q = torch.randn(1, cfg.n_head, T, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(S, S + T, device="cuda")
    kk, vv = k[:, :, : S + T], v[:, :, : S + T]
    rep = cfg.n_head // cfg.n_kv_head
    mask = (torch.arange(S + T, device="cuda")[None, :] <= pos[:, None])
    out["attention_us"][f"T={T}"] = {
        "flash_backend": time_fn(lambda: flash_backend(q, kk, vv, pos), rep_ms=50, cuda_graph=True).median_ms * 1e3,
        "sdpa": time_fn(lambda: F.scaled_dot_product_attention(q, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                                                attn_mask=mask), rep_ms=50, cuda_graph=True).median_ms * 1e3}
    print(f"attention T={T}", {k2: round(v2, 2) for k2, v2 in out["attention_us"][f"T={T}"].items()}, flush=True)
save()
variants = {"notebook: SmallMLinear + flash, compiled": dict(),
            "SmallMLinear + flash, not compiled": dict(comp=False),
            "SmallMLinear + SDPA, compiled": dict(attn="sdpa"),
            "cuBLAS + flash, compiled": dict(small=False)}
for name, kw in variants.items():
    if time.time() - t0 > 240:
        print("budget: stopping before", name); break
    m = build(**kw)
    out["forward_ms"][name] = {T: verify_ms(m, T, rep_ms=100).median_ms for T in Ts}
    print(name, {T: round(x, 3) for T, x in out["forward_ms"][name].items()}, flush=True)
    save()
    del m
print(f"done in {time.time() - t0:.0f} s")
