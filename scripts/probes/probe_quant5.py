"""GEMV kernels whose weight tiles arrive by TMA, several chunks ahead (H100; for the next session).

Why: the library's GEMV loops load a chunk of words, wait, compute, and only then load the next; the
loop holds no `tl.dot`, so Triton's pipeliner leaves `num_stages` without effect (the PTX has no
cp.async at any num_stages: checked on the CPU). Registers then cap the bytes each SM keeps in
flight: at most ~20 KiB for the INT4 tilings (~36-64 KiB for INT8), against the ~15-20 KiB that
Little's law asks for *continuously* at 3 TB/s and ~700 ns of latency. That fits INT4 moving half
the bytes per second INT8 does, and fewer instructions per code not helping (probe_quant4).
Here the word tile (BLOCK_N rows x BLOCK_K/8 words) comes through a tensor descriptor inside
`tl.range(..., num_stages=STAGES)`, which Triton pipelines into shared memory with TMA; the arithmetic
is the library's.

Usage on the device: python3 scripts/probes/probe_quant5.py SECONDS (writes $OUT/probe_quant5.json).
On a CPU: TRITON_INTERPRET=1 python3 scripts/probes/probe_quant5.py --check; --ptx compiles for sm_90.
"""
import json
import os
import sys
import time

if "--ptx" in sys.argv:  # compile for the GPU, not the interpreter (before triton and labutils load)
    os.environ["TRITON_INTERPRET"] = "0"
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from labutils import quant  # noqa: E402


@triton.jit
def _w4_gemv_tma(x_ptr, w_desc, s_ptr, z_ptr, y_ptr, N, K, NG, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """INT4 (q - z) * s per group; element 8c + i in nibble i of word c; words (N, K / 8) via TMA."""
    GW: tl.constexpr = GROUP // 8
    NGB: tl.constexpr = BLOCK_K // GROUP
    BW: tl.constexpr = BLOCK_K // 8
    n0 = tl.program_id(0) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N, NGB), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        words = tl.reshape(w_desc.load([n0, k0 // 8]), (BLOCK_N, NGB, GW))  # out of bounds: zeros
        g = k0 // GROUP + tl.arange(0, NGB)
        c = g[:, None] * GW + tl.arange(0, GW)[None, :]
        c_ok = c < K // 8
        sz = rn[:, None] * NG + g[None, :]
        sz_ok = n_ok[:, None] & (g < NG)[None, :]
        s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)
        off = 8388608.0 + tl.load(z_ptr + sz, mask=sz_ok, other=0).to(tl.float32)
        part = tl.zeros((BLOCK_N, NGB, GW), dtype=tl.float32)
        for i in tl.static_range(8):
            u = (words >> (4 * i)) & 0xF
            w = (u | 0x4B000000).to(tl.float32, bitcast=True) - off[:, :, None]
            x = tl.load(x_ptr + 8 * c + i, mask=c_ok, other=0.0).to(tl.float32)
            part += w * x[None, :, :]
        acc += tl.sum(part, axis=2) * s
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _w8_gemv_tma(x_ptr, w_desc, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr):
    """INT8 q * s per row; element 4c + i in byte i of word c; words (N, K / 4) via TMA."""
    BW: tl.constexpr = BLOCK_K // 4
    n0 = tl.program_id(0) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        words = w_desc.load([n0, k0 // 4])
        c = k0 // 4 + tl.arange(0, BW)
        c_ok = c < K // 4
        for i in tl.static_range(4):
            u = (words >> (8 * i)) & 0xFF
            w = ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            x = tl.load(x_ptr + 4 * c + i, mask=c_ok, other=0.0).to(tl.float32)
            acc += w * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def run(fmt, qlin, x, y, BN, BK, warps, stages):
    N, K = qlin.out_features, qlin.in_features
    if fmt == "int8":
        words = qlin.q.view(torch.int32)
        desc = TensorDescriptor(words, list(words.shape), list(words.stride()), [BN, BK // 4])
        _w8_gemv_tma[(triton.cdiv(N, BN),)](x, desc, qlin.scale, y, N, K, BLOCK_N=BN, BLOCK_K=BK, STAGES=stages,
                                            num_warps=warps)
    else:
        words = qlin.packed.view(torch.int32)
        desc = TensorDescriptor(words, list(words.shape), list(words.stride()), [BN, BK // 8])
        G = qlin._meta["group_size"]
        _w4_gemv_tma[(triton.cdiv(N, BN),)](x, desc, qlin.scale, qlin.zero, y, N, K, qlin.scale.shape[1], GROUP=G,
                                            BLOCK_N=BN, BLOCK_K=BK, STAGES=stages, num_warps=warps)
    return y


TILES = {"int8": [(8, 1024, 4), (16, 1024, 4), (8, 512, 4), (4, 1024, 4), (16, 512, 4), (32, 512, 8)],
         "int4": [(8, 512, 4), (16, 512, 4), (16, 1024, 4), (8, 1024, 4), (32, 512, 8), (32, 1024, 8)]}
STAGES = (2, 3, 4, 6)


def check(dev, dtype, N, K, tiles, stages):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
    x = torch.randn(1, K, device=dev, dtype=dtype)
    out = []
    for fmt in ("int8", "int4"):
        q = quant.FORMATS[fmt].from_linear(lin)
        ref = torch.nn.functional.linear(x.double(), q.dequantize(torch.float32).double())
        for bn, bk, w in tiles[fmt]:
            for st in stages:
                y = run(fmt, q, x, torch.empty(1, N, device=dev, dtype=dtype), bn, bk, w, st)
                out.append((fmt, bn, bk, w, st, ((y.double() - ref).norm() / ref.norm()).item()))
    return out


def ptx():
    """Compile for sm_90 on the CPU: does the loop become TMA copies into a multi-buffered ring?"""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    for st in (1, 3, 4):
        sig = {"x_ptr": "*bf16", "w_desc": "tensordesc<i32[16, 64]>", "s_ptr": "*fp16", "z_ptr": "*u8", "y_ptr": "*bf16",
               "N": "i32", "K": "i32", "NG": "i32", "GROUP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
               "STAGES": "constexpr"}
        src = ASTSource(fn=_w4_gemv_tma, signature=sig,
                        constexprs={"GROUP": 128, "BLOCK_N": 16, "BLOCK_K": 512, "STAGES": st}, attrs={})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        p = k.asm["ptx"]
        print(f"stages {st}: cp.async.bulk.tensor {p.count('cp.async.bulk.tensor')}, mbarrier {p.count('mbarrier')}, "
              f"shared bytes {k.metadata.shared}")


if __name__ == "__main__":
    if "--ptx" in sys.argv:
        ptx()
        sys.exit()
    if "--check" in sys.argv:
        for r in check("cpu", torch.float32, 48, 1024, {"int8": [(16, 512, 1)], "int4": [(16, 256, 1)]}, (1, 3)):
            print(r)
        sys.exit()
    from labutils.bench import time_fn
    import torch.nn.functional as F
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    OUT = os.environ.get("OUT", "/tmp")
    DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 150)
    res = {"check": [], "layer": [], "tma": []}
    save = lambda: json.dump(res, open(f"{OUT}/probe_quant5.json", "w"), indent=1)  # noqa: E731
    def us(fn): return time_fn(fn, rep_ms=30, cuda_graph=True).median_ms * 1e3
    dev, dt = "cuda", torch.bfloat16
    res["check"] = check(dev, dt, 4096, 3584, {f: t[:2] for f, t in TILES.items()}, (2, 4))
    print("check", res["check"], flush=True); save()
    SHAPES = {"up 3584->18944": (18944, 3584), "down 18944->3584": (3584, 18944), "qkv 3584->4608": (4608, 3584)}
    for name, (N, K) in SHAPES.items():
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)
        x = torch.randn(1, K, device=dev, dtype=dt)
        y = torch.empty(1, N, device=dev, dtype=dt)
        row = {"shape": name, "cuBLAS": us(lambda: F.linear(x, lin.weight))}
        for fmt in ("int8", "int4"):
            q = quant.FORMATS[fmt].from_linear(lin)
            q(x)
            row[fmt + "_lib"] = us(lambda: q(x))
            best = None
            for bn, bk, w in TILES[fmt]:
                for st in STAGES:
                    if time.time() > DEADLINE:
                        break
                    try:
                        run(fmt, q, x, y, bn, bk, w, st)
                        t = us(lambda: run(fmt, q, x, y, bn, bk, w, st))
                        r = {"shape": name, "fmt": fmt, "BN": bn, "BK": bk, "warps": w, "stages": st, "us": t,
                             "GB/s": q.nbytes / t / 1e3}
                        best = r if best is None or t < best["us"] else best
                    except Exception as e:  # noqa: BLE001
                        r = {"shape": name, "fmt": fmt, "BN": bn, "BK": bk, "warps": w, "stages": st, "error": str(e)[:200]}
                    res["tma"].append(r)
            row[fmt + "_tma"] = best
        res["layer"].append(row); print(row, flush=True); save()
    print("done", flush=True)
