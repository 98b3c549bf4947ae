"""GEMV variants for notebook 04 (H100), timed in CUDA graphs against the library kernels.

The library's word-wise GEMV (labutils.quant._w8_gemv_kernel / _w4_gemv_kernel) meets each code's
activation with a strided scalar load (x[8c + i]), one load per code. Variant "ilv" packs the codes
interleaved inside a span of S words (code i of word w is element i * S + w of the span; S = the
group's words for 4-bit, a fixed span for INT8), so the activations of code i are a contiguous
slice and load as vectors. Option PREFETCH loads the next chunk's words before the current chunk's
arithmetic (software pipelining by hand).

Usage on the device: python3 scripts/probes/probe_quant3.py SECONDS (writes $OUT/probe_quant3.json).
On a CPU: TRITON_INTERPRET=1 python3 scripts/probes/probe_quant3.py --check (small shapes, correctness).
"""
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from labutils import quant


@triton.jit
def _ilv_gemv(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, y_ptr, N, K, KW, NG,
              INT8: tl.constexpr, NF4: tl.constexpr, S: tl.constexpr, GROUP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """y = deq(W) x for one row x; W's words interleaved in spans of S words. INT8: 4 codes per word,
    scale per row (GROUP unused); 4-bit: 8 codes per word, span = group (S = GROUP / 8)."""
    CPW: tl.constexpr = 4 if INT8 else 8  # codes per word
    NSP: tl.constexpr = BLOCK_K // (CPW * S)  # spans per chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * KW
    acc = tl.zeros((BLOCK_N, NSP), dtype=tl.float32)
    sp = tl.arange(0, NSP)
    c = sp[:, None] * S + tl.arange(0, S)[None, :]  # (NSP, S) word index within the chunk
    words = tl.load(w_rows + c[None, :, :], mask=n_ok[:, None, None] & (c < KW)[None, :, :], other=0)
    for k0 in range(0, K, BLOCK_K):
        cw = k0 // CPW + c  # words of this chunk
        c_ok = cw < KW
        if PREFETCH:
            cn = cw + BLOCK_K // CPW
            nxt = tl.load(w_rows + cn[None, :, :], mask=n_ok[:, None, None] & (cn < KW)[None, :, :], other=0)
        else:
            nxt = words
        xbase = k0 + sp[:, None] * (CPW * S) + tl.arange(0, S)[None, :]  # element of code 0 of each word
        part = tl.zeros((BLOCK_N, NSP, S), dtype=tl.float32)
        if INT8:
            for i in tl.static_range(4):
                u = (words >> (8 * i)) & 0xFF
                w = ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                x = tl.load(x_ptr + xbase + i * S, mask=c_ok, other=0.0).to(tl.float32)
                part += w * x[None, :, :]
            acc += tl.sum(part, axis=2)
        else:
            g = k0 // GROUP + sp  # (NSP,) groups of this chunk
            sz = rn[:, None] * NG + g[None, :]
            sz_ok = n_ok[:, None] & (g < NG)[None, :]
            s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)
            if not NF4:
                off = 8388608.0 + tl.load(z_ptr + sz, mask=sz_ok, other=0).to(tl.float32)
            for i in tl.static_range(8):
                u = (words >> (4 * i)) & 0xF
                if NF4:
                    w = tl.load(code_ptr + u)
                else:
                    w = (u | 0x4B000000).to(tl.float32, bitcast=True) - off[:, :, None]
                x = tl.load(x_ptr + xbase + i * S, mask=c_ok, other=0.0).to(tl.float32)
                part += w * x[None, :, :]
            acc += tl.sum(part, axis=2) * s
        if PREFETCH:
            words = nxt
        else:
            c2 = cw + BLOCK_K // CPW
            words = tl.load(w_rows + c2[None, :, :], mask=n_ok[:, None, None] & (c2 < KW)[None, :, :], other=0)
    y = tl.sum(acc, axis=1)
    if INT8:
        y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def interleave(codes: torch.Tensor, cpw: int, S: int) -> torch.Tensor:
    """codes (N, K) in [0, 2^(32/cpw)) -> (N, K / cpw) int32 words, interleaved in spans of S words."""
    N, K = codes.shape
    bits = 32 // cpw
    c = codes.to(torch.int64).view(N, K // (cpw * S), cpw, S)  # element i * S + w of each span
    words = sum(c[:, :, i, :] << (bits * i) for i in range(cpw))  # (N, spans, S)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(N, K // cpw).to(torch.int32)


class Ilv:
    """One layer in the interleaved format, from a library quantized layer."""

    def __init__(self, fmt, qlin, span_words=128):
        self.fmt, self.N, self.K = fmt, qlin.out_features, qlin.in_features
        self.s = qlin.scale if fmt != "nf4" else qlin.absmax
        self.z, self.code = (qlin.zero if fmt == "int4" else self.s), (qlin.code if fmt == "nf4" else self.s)
        if fmt == "int8":
            self.S, self.group = span_words, 1
            self.words = interleave(qlin.q.to(torch.int16) & 0xFF, 4, self.S)
        else:
            self.group = qlin._meta["group_size" if fmt == "int4" else "block_size"]
            self.S = self.group // 8
            self.words = interleave(quant.unpack_int4(qlin.packed), 8, self.S)
        self.NG = self.s.shape[1] if self.s.dim() == 2 else 1

    def __call__(self, x, y, BN, BK, warps, prefetch, stages=1):
        grid = (triton.cdiv(self.N, BN),)
        _ilv_gemv[grid](x, self.words, self.s, self.z, self.code, y, self.N, self.K, self.words.shape[1], self.NG,
                        INT8=self.fmt == "int8", NF4=self.fmt == "nf4", S=self.S, GROUP=self.group,
                        BLOCK_N=BN, BLOCK_K=BK, PREFETCH=prefetch, num_warps=warps, num_stages=stages)
        return y


def check(dev, dtype, N, K, tiles):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
    x = torch.randn(1, K, device=dev, dtype=dtype)
    out = []
    for fmt in ("int8", "int4", "nf4"):
        q = quant.FORMATS[fmt].from_linear(lin)
        ref = torch.nn.functional.linear(x.float(), q.dequantize(torch.float32))
        il = Ilv(fmt, q, span_words=min(128, K // 4))
        for bn, bk, w in tiles[fmt]:
            for pf in (False, True):
                y = il(x, torch.empty(1, N, device=dev, dtype=dtype), bn, bk, w, pf)
                e = ((y.float() - ref).norm() / ref.norm()).item()
                out.append((fmt, bn, bk, w, pf, e))
    return out


if __name__ == "__main__":
    if "--check" in sys.argv:  # CPU, interpreter
        res = check("cpu", torch.float32, 48, 1024, {"int8": [(16, 512, 1), (8, 1024, 1)],
                                                    "int4": [(16, 256, 1), (8, 512, 1)], "nf4": [(16, 128, 1)]})
        for r in res:
            print(r)
        assert all(r[-1] < 1e-5 for r in res)
        sys.exit()
    from labutils.bench import time_fn
    from labutils.gemv import GemvLinear
    import torch.nn.functional as F
    OUT = os.environ.get("OUT", "/tmp")
    DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 200)
    res = {"check": [], "layer": [], "ilv": []}
    save = lambda: json.dump(res, open(f"{OUT}/probe_quant3.json", "w"), indent=1)  # noqa: E731
    def us(fn): return time_fn(fn, rep_ms=30, cuda_graph=True).median_ms * 1e3
    dev, dt = "cuda", torch.bfloat16
    tiles = {"int8": [(4, 1024, 4), (8, 1024, 4), (8, 2048, 8), (16, 512, 4), (16, 1024, 8), (4, 2048, 4),
                      (2, 2048, 4), (32, 512, 8)],
             "int4": [(4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (4, 1024, 4),
                      (32, 256, 8)]}
    tiles["nf4"] = [t for t in tiles["int4"]]
    chk = check(dev, dt, 4096, 3584, {f: t[:2] for f, t in tiles.items()})
    res["check"] = chk; print("check", chk, flush=True); save()
    SHAPES = {"up 3584->18944": (18944, 3584), "down 18944->3584": (3584, 18944), "qkv 3584->4608": (4608, 3584)}
    for name, (N, K) in SHAPES.items():
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)
        x = torch.randn(1, K, device=dev, dtype=dt)
        y = torch.empty(1, N, device=dev, dtype=dt)
        row = {"shape": name, "cuBLAS": us(lambda: F.linear(x, lin.weight)), "gemv_bf16": us(lambda: GemvLinear(lin)(x))}
        for fmt in ("int8", "int4", "nf4"):
            q = quant.FORMATS[fmt].from_linear(lin)
            q(x)
            row[fmt] = us(lambda: q(x))
            row[fmt + "_best"] = str(list((quant._w8_gemv_kernel if fmt == "int8" else quant._w4_gemv_kernel).cache.values())[-1])
            il = Ilv(fmt, q, span_words=128)
            best = None
            for bn, bk, w in tiles[fmt]:
                if bk % (il.S * (4 if fmt == "int8" else 8)) or time.time() > DEADLINE:
                    continue
                for pf in (False, True):
                    try:
                        il(x, y, bn, bk, w, pf)
                        t = us(lambda: il(x, y, bn, bk, w, pf))
                        r = {"shape": name, "fmt": fmt, "BN": bn, "BK": bk, "warps": w, "prefetch": pf, "us": t,
                             "GB/s": q.nbytes / t / 1e3}
                        best = r if best is None or t < best["us"] else best
                    except Exception as e:  # noqa: BLE001
                        r = {"shape": name, "fmt": fmt, "BN": bn, "BK": bk, "warps": w, "prefetch": pf, "error": str(e)[:200]}
                    res["ilv"].append(r)
            row[fmt + "_ilv"] = best
            row[fmt + "_GBps"] = q.nbytes / row[fmt] / 1e3
        res["layer"].append(row); print(row, flush=True); save()
    print("done", flush=True)
