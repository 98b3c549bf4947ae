"""One-off H100 probe: which flash-attention kernel/config is fastest (not part of the book)."""
import json, math, os, sys, time, traceback
import torch, triton
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
import labutils.flash_attention as fa
import labutils.kernels.decode_attention as fdec  # flash_decode looks _decode_split_tuned up here

OUT = os.environ.get("OUT", "/tmp")
res = {"fwd": [], "dec": [], "err": []}
def log(*a):
    print(*a, flush=True)
def bench(fn):
    return do_bench(fn, warmup=25, rep=100)

H, d = 32, 128
t_start = time.time()
# correctness quick check of tma path at N=1000 (ragged) fp16/bf16
for dtype in (torch.float16, torch.bfloat16):
    for causal in (False, True):
        q, k, v = (torch.randn(2, 32, 1000, 128, device="cuda", dtype=dtype) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        for kern, blk in (("tma", (128, 64, 3, 4, False)), ("tma", (128, 128, 2, 8, True)), ("pointer", None)):
            try:
                o = fa.flash_attention(q, k, v, causal=causal, kernel=kern, block=blk)
                e = ((o.float() - ref).norm() / ref.norm()).item()
            except Exception as ex:
                e = f"{type(ex).__name__}: {str(ex)[:300]}"
            res["err"].append([str(dtype), causal, kern, str(blk), e]); log("err", dtype, causal, kern, blk, e)

cfgs_ptr = [(128, 64, 3, 4), (128, 128, 3, 8), (128, 64, 3, 8), (128, 128, 2, 8), (128, 64, 4, 4)]
cfgs_tma = [(128, 64, 3, 4, False), (128, 128, 3, 8, False), (128, 128, 2, 8, False), (128, 64, 2, 4, False),
            (128, 64, 3, 8, False), (128, 64, 2, 4, True), (128, 64, 3, 4, True), (128, 128, 2, 8, True),
            (128, 128, 3, 8, True), (128, 64, 3, 8, True), (64, 64, 3, 4, False)]
for N in (4096, 16384):
    B = 16384 // N
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
    for causal in (False, True):
        flops = fa.attention_flops(B, H, N, N, d, causal)
        row = {"N": N, "causal": causal}
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def f(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            try:
                row[name] = flops / bench(f) / 1e9
            except Exception as ex:
                row[name] = str(ex)[:100]
        for c in cfgs_ptr:
            try:
                row[f"ptr{c}"] = flops / bench(lambda: fa.flash_attention(q, k, v, causal=causal, kernel="pointer", block=c)) / 1e9
            except Exception as ex:
                row[f"ptr{c}"] = f"{type(ex).__name__}: {str(ex)[:150]}"
        for c in cfgs_tma:
            try:
                row[f"tma{c}"] = flops / bench(lambda: fa.flash_attention(q, k, v, causal=causal, kernel="tma", block=c)) / 1e9
            except Exception as ex:
                row[f"tma{c}"] = f"{type(ex).__name__}: {str(ex)[:150]}"
        res["fwd"].append(row)
        log(json.dumps(row))
        json.dump(res, open(f"{OUT}/probe_attn.json", "w"), indent=1)
    del q, k, v
log("fwd done", time.time() - t_start)
# head_dim 64 quick, best few
for causal in (False, True):
    N, B, dd = 4096, 4, 64
    q, k, v = (torch.randn(B, H, N, dd, device="cuda", dtype=torch.float16) for _ in range(3))
    flops = fa.attention_flops(B, H, N, N, dd, causal)
    row = {"N": N, "causal": causal, "d": 64}
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def f(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        row[name] = flops / bench(f) / 1e9
    for c in [(128, 64, 3, 4, False), (128, 128, 3, 8, False), (128, 64, 2, 4, True), (128, 128, 2, 8, True), (128, 64, 4, 4, False), (128, 128, 4, 8, False)]:
        try:
            row[f"tma{c}"] = flops / bench(lambda: fa.flash_attention(q, k, v, causal=causal, kernel="tma", block=c)) / 1e9
        except Exception as ex:
            row[f"tma{c}"] = f"{type(ex).__name__}: {str(ex)[:150]}"
    res["fwd"].append(row); log(json.dumps(row))
json.dump(res, open(f"{OUT}/probe_attn.json", "w"), indent=1)

# decode variants
Bd, S, Hq, KV = 4, 32768, 28, 4
qd = torch.randn(Bd, Hq, 1, 128, device="cuda", dtype=torch.float16)
kd = torch.randn(Bd, KV, S, 128, device="cuda", dtype=torch.float16)
vd = torch.randn_like(kd)
full = torch.full((Bd, 1), S - 1, device="cuda")
nbytes = kd.nbytes + vd.nbytes
auto = fa.default_num_splits(Bd, KV, S, qd.device)
orig = fdec._decode_split_tuned
for bn, w, s in [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3), (64, 4, 4), (32, 4, 4)]:
    fdec._decode_split_tuned = triton.autotune(configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)],
                                               key=["S_BUCKET", "NUM_SPLITS", "HEAD_DIM", "BLOCK_G"])(fdec._decode_split)
    for ns in (auto, 2 * auto, 4 * auto, 8 * auto):
        try:
            ms = bench(lambda: fa.flash_decode(qd, kd, vd, full, num_splits=ns))
            r = {"BLOCK_N": bn, "warps": w, "stages": s, "splits": ns, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6}
        except Exception as ex:
            r = {"BLOCK_N": bn, "warps": w, "stages": s, "splits": ns, "error": str(ex)[:200]}
        res["dec"].append(r); log(json.dumps(r))
fdec._decode_split_tuned = orig
x = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda"); y = torch.empty_like(x)
ms = bench(lambda: y.copy_(x)); res["copy_gbps"] = 2 * x.nbytes / ms / 1e6
log("copy", res["copy_gbps"])
json.dump(res, open(f"{OUT}/probe_attn.json", "w"), indent=1)
log("total", time.time() - t_start)
