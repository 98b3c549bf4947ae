#!/usr/bin/env python3
"""Weight-only INT4 / INT8 layer timings at 1-16 rows on the Qwen2.5-7B shapes (one CUDA GPU, bf16).

    PYTHONPATH=$PWD python3 scripts/gpu/quant_layer_bench.py            # ~4 min on an H200 (--budget)
    PYTHONPATH=$PWD python3 scripts/gpu/quant_layer_bench.py --dry-run  # the plan, no GPU needed

Per layer and row count, each implementation replayed from a CUDA graph with an L2 flush
(labutils.bench.time_fn(cuda_graph=True); median, p20, p80; launch by launch where capture fails):
cuBLAS bf16 (F.linear); torch's tinygemm int4 (aten._weight_int4pack_mm, same codes as the lab's
INT4, scales and zeros in bf16) and aten._weight_int8pack_mm; bitsandbytes int8 / nf4 if importable;
labutils.quant's INT4 / INT8 modules; every variant of labutils.kernels.int4_fast (dequantization
method, kernel, join, split-K off / default); INT4 dequantized to bf16 then F.linear. Each output is
checked against x @ W^T in fp32: "err_q" against the weight the format dequantizes to (kernel
correctness, ~bf16 rounding expected), "err_w" against the unquantized weight (format error).
Measurements run core implementations first, then the variants, and stop at --budget seconds
(what was skipped is listed). Results: $OUT/quant_layer_bench.json (or ./quant_layer_bench.json).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # name -> (N, K)
    "qkv 3584->4608": (4608, 3584),
    "o 3584->3584": (3584, 3584),
    "gate_up 3584->37888": (37888, 3584),
    "up 3584->18944": (18944, 3584),
    "down 18944->3584": (3584, 18944),
}
ROWS = [1, 2, 4, 8, 16]
GROUP = 128
QUICK_CONFIGS = {  # (BLOCK_N, BLOCK_K, num_warps, num_stages): 3 per kernel keeps compiles + tuning in budget
    "i4_gemv": [(8, 512, 4, 2), (16, 512, 4, 2), (4, 1024, 4, 2)],
    "i8_gemv": [(8, 512, 4, 2), (16, 256, 4, 2), (4, 1024, 4, 2)],
    "i4_mma": [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4)],
    "i8_mma": [(16, 128, 4, 4), (32, 128, 4, 4), (64, 256, 8, 3)],
}
# new-kernel variants: (label, fmt, kwargs, rows it applies to, core?)
NEW_VARIANTS = [
    ("new int4 gemv one", "int4", dict(kernel="gemv", deq="one"), "1", True),
    ("new int4 gemv magic", "int4", dict(kernel="gemv", deq="magic"), "1", False),
    ("new int4 gemv int", "int4", dict(kernel="gemv", deq="int"), "1", False),
    ("new int4 mma after join", "int4", dict(kernel="mma", deq="after", join=True), "all", True),
    ("new int4 mma after dots", "int4", dict(kernel="mma", deq="after", join=False), "all", False),
    ("new int4 mma one join", "int4", dict(kernel="mma", deq="one", join=True), "all", False),
    ("new int4 mma magic dots", "int4", dict(kernel="mma", deq="magic", join=False), "all", False),
    ("new int8 gemv one", "int8", dict(kernel="gemv", deq="one"), "1", True),
    ("new int8 gemv magic", "int8", dict(kernel="gemv", deq="magic"), "1", False),
    ("new int8 gemv int", "int8", dict(kernel="gemv", deq="int"), "1", False),
    ("new int8 mma int join", "int8", dict(kernel="mma", deq="int", join=True), "all", True),
    ("new int8 mma int dots", "int8", dict(kernel="mma", deq="int", join=False), "all", False),
    ("new int8 mma magic join", "int8", dict(kernel="mma", deq="magic", join=True), "all", False),
]
BASELINES = ["cuBLAS bf16", "torch int4pack", "torch int8pack", "bnb int8", "bnb nf4", "lab int4", "lab int8",
             "unfused int4 deq+F.linear"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--budget", type=float, default=215, help="seconds of measurements before skipping the rest")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--shapes", default="", help="comma-separated substrings of layer names (default: all)")
    p.add_argument("--configs", choices=["quick", "all"], default="quick", help="tuner candidates per kernel")
    p.add_argument("--split", default="1,auto", help="split-K settings for the new kernels: ints and/or 'auto'")
    p.add_argument("--variant-rows", default="1,16", help="row counts that also get the non-core variants")
    p.add_argument("--rep-ms", type=float, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    a.rows = [int(r) for r in a.rows.split(",") if r]
    bad = [r for r in a.rows if not 1 <= r <= 16]
    if bad:
        p.error(f"rows must lie in 1..16, got {bad}")
    a.shapes = {k: v for k, v in SHAPES.items() if not a.shapes or any(s in k for s in a.shapes.split(","))}
    if not a.shapes:
        p.error("no layer matches --shapes")
    a.variant_rows = [int(r) for r in a.variant_rows.split(",") if r]
    a.split = [None if s == "auto" else int(s) for s in a.split.split(",") if s]
    return a


def plan(a):
    """(pass, layer, rows, impl, kwargs, split) in measurement order: core first, then variants."""
    out = []
    for core in (True, False):
        for layer in a.shapes:
            for M in a.rows:
                if core:
                    out += [(0, layer, M, b, {}, None) for b in BASELINES]
                if not core and M not in a.variant_rows:
                    continue
                for label, fmt, kw, rows, is_core in NEW_VARIANTS:
                    if is_core != core or (rows == "1" and M != 1):
                        continue
                    for sk in a.split:
                        if core and sk is not None and len(a.split) > 1:
                            continue  # core pass: default split only; the others in the variant pass
                        out.append((0 if core else 1, layer, M, label, dict(kw, fmt=fmt), sk))
                if not core:
                    for label, fmt, kw, rows, is_core in NEW_VARIANTS:
                        if is_core and (rows == "all" or M == 1):
                            out += [(1, layer, M, label, dict(kw, fmt=fmt), sk) for sk in a.split if sk is not None]
    return out


# ---- implementations ------------------------------------------------------------------------------------------
def tinygemm_int4(q, W_shape):
    """aten._weight_int4pack_mm's operands from a labutils.quant.Int4Weight: w = (q - 8) s + zero_tg with
    zero_tg = (8 - z) s. Tries the uint8 (N, K/2) input of torch >= 2.5 in both nibble orders and the
    int32 (N, K) input of older releases; returns (fn(x), info)."""
    import labutils.quant as Q

    N, K = W_shape
    codes = Q.unpack_int4(q.packed).to(torch.int32)  # (N, K)
    s = q.scale.float()
    zt = (8 - q.zero.float()) * s
    sz = torch.stack([s, zt], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G, N, 2)
    ref_w = q.dequantize(torch.float32)
    x = torch.randn(3, K, device=codes.device, dtype=torch.bfloat16)
    ref = x.float() @ ref_w.T
    tries = {"uint8 even-high": lambda: ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8),
             "uint8 even-low": lambda: ((codes[:, 1::2] << 4) | codes[:, ::2]).to(torch.uint8),
             "int32 (N, K)": lambda: codes}
    errors, best = {}, None
    for name, make in tries.items():
        for inner in (8, 4, 2):
            try:
                wp = torch.ops.aten._convert_weight_to_int4pack(make().contiguous(), inner)
                y = torch.ops.aten._weight_int4pack_mm(x, wp, GROUP, sz)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                if best is None or err < best[0]:
                    best = (err, name, inner, wp)
                break
            except Exception as e:  # noqa: BLE001
                errors[f"{name} innerKTiles={inner}"] = f"{type(e).__name__}: {str(e)[:160]}"
    if best is None:
        raise RuntimeError(f"_weight_int4pack_mm unusable: {errors}")
    wp = best[3]
    return (lambda x: torch.ops.aten._weight_int4pack_mm(x, wp, GROUP, sz)), \
        {"packing": best[1], "innerKTiles": best[2], "probe_err": best[0], "bytes": wp.nbytes + sz.nbytes}


def deq_int4_torch(packed, scale, zero, G, dtype):
    """The INT4 weight written out in ``dtype`` by PyTorch ops (the unfused path)."""
    N = packed.shape[0]
    q = torch.stack((packed & 15, packed >> 4), dim=-1).view(N, -1, G)
    return ((q.to(dtype) - zero[..., None].to(dtype)) * scale[..., None].to(dtype)).view(N, -1)


def bnb_linear(lin, fmt):
    import bitsandbytes as bnb

    if fmt == "int8":
        m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=0.0)
        m.weight = bnb.nn.Int8Params(lin.weight.detach().half().cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=lin.weight.dtype,
                              quant_type="nf4")
        m.weight = bnb.nn.Params4bit(lin.weight.detach().half(), requires_grad=False, quant_type="nf4")
    return m.to(lin.weight.device)


class Layer:
    """One layer's weights in every format, built lazily and kept for all row counts."""

    def __init__(self, N, K, dev):
        import labutils.quant as Q
        from labutils.kernels import int4_fast as F4

        self.N, self.K, self.cache = N, K, {}
        g = torch.Generator(device=dev).manual_seed(N + K)
        self.W = (torch.randn(N, K, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        self.q4 = Q.quantize_int4(self.W, GROUP)
        self.q8 = Q.quantize_int8(self.W)
        self.p4, self.p8 = F4.pack_int4(self.q4), F4.pack_int8(self.q8)
        self.Wq4 = self.q4.dequantize(torch.float32)
        self.Wq8 = self.q8.dequantize(torch.float32)

    def get(self, name, make):
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]


def make_impl(L, impl, kw, split):
    """(fn(x), weight format for err_q ('int4', 'int8', 'w' or None), bytes, info)."""
    import labutils.quant as Q
    from labutils.kernels import int4_fast as F4

    if impl == "cuBLAS bf16":
        return (lambda x: F.linear(x, L.W)), "w", L.W.nbytes, {}
    if impl == "torch int4pack":
        fn, info = L.get("tinygemm", lambda: tinygemm_int4(L.q4, (L.N, L.K)))
        return fn, "int4", info["bytes"], {k: v for k, v in info.items() if k != "bytes"}  # bytes: its own column
    if impl == "torch int8pack":
        s = L.q8.scale.to(torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, L.q8.q, s)), "int8", L.q8.q.nbytes + s.nbytes, {}
    if impl.startswith("bnb"):
        fmt = impl.split()[1]
        lin = torch.nn.Linear(L.K, L.N, bias=False, device=L.W.device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(L.W)
        m = L.get(impl, lambda: bnb_linear(lin, fmt))
        nbytes = sum(t.nbytes for t in m.state_dict().values() if torch.is_tensor(t))
        return m, None, nbytes, {}
    if impl == "lab int4":
        m = L.get(impl, lambda: Q.Int4Linear(L.q4))
        return m, "int4", m.nbytes, {}
    if impl == "lab int8":
        m = L.get(impl, lambda: Q.Int8Linear(L.q8))
        return m, "int8", m.nbytes, {}
    if impl == "unfused int4 deq+F.linear":
        q = L.q4
        return (lambda x: F.linear(x, deq_int4_torch(q.packed, q.scale, q.zero, GROUP, x.dtype))), "int4", q.nbytes, {}
    kw = dict(kw)
    fmt = kw.pop("fmt")
    if fmt == "int4":
        return (lambda x: F4.int4_linear(x, L.p4, split_k=split, **kw)), "int4", L.p4.nbytes, {}
    return (lambda x: F4.int8_linear(x, L.p8, split_k=split, **kw)), "int8", L.p8.nbytes, {}


def time_it(fn, rep_ms):
    from labutils.bench import time_fn

    try:
        return time_fn(fn, rep_ms=rep_ms, cuda_graph=True), "cuda graph"
    except Exception as e:  # noqa: BLE001  (not capturable: time launch by launch)
        torch.cuda.synchronize()
        t = time_fn(fn, warmup_ms=10, rep_ms=rep_ms)
        return t, f"launches ({type(e).__name__})"


def main(argv=None):
    a = parse(argv)
    todo = plan(a)
    if a.dry_run or not torch.cuda.is_available():
        print(f"plan: {len(todo)} measurements, budget {a.budget:.0f} s, configs {a.configs}, split-K {a.split}")
        print("layers:", ", ".join(f"{k} (N={n}, K={k_})" for k, (n, k_) in a.shapes.items()), "| rows:", a.rows)
        seen = set()
        for pas, layer, M, impl, kw, sk in todo:
            tag = (pas, impl, sk)
            if tag not in seen:
                seen.add(tag)
                print(f"  pass {pas}: {impl:28s} split_k={'-' if impl in BASELINES else 'auto' if sk is None else sk} "
                      f"{ {k: v for k, v in kw.items() if k != 'fmt'} }")
        if not torch.cuda.is_available() and not a.dry_run:
            print("no CUDA GPU: nothing measured (the plan above is what a GPU run does)")
        return 0

    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast", category=UserWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from labutils import bench, runtime
    from labutils.kernels import int4_fast as F4

    if a.configs == "quick":
        F4.CONFIGS.update({k: list(v) for k, v in QUICK_CONFIGS.items()})
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = True
    except Exception:  # noqa: BLE001
        has_bnb = False
    dev = torch.device("cuda")
    t0 = time.time()
    layers, records, skipped, failures = {}, [], [], {}
    xs = {}
    for pas, layer, M, impl, kw, sk in todo:
        label = impl + ("" if impl in BASELINES else f" split={'auto' if sk is None else sk}")
        if time.time() - t0 > a.budget:
            skipped.append(f"{layer} rows={M} {label}")
            continue
        if impl.startswith("bnb") and not has_bnb:
            continue
        if impl in failures and impl in BASELINES:
            continue  # a baseline that failed once (e.g. unsupported op) is not retried on every shape
        N, K = a.shapes[layer]
        if layer not in layers:
            layers.clear()  # one layer's weights at a time (gate_up: 271 MB in bf16)
            torch.cuda.empty_cache()
            layers[layer] = Layer(N, K, dev)
        L = layers[layer]
        x = xs.setdefault((K, M), torch.randn(M, K, device=dev, generator=torch.Generator(device=dev).manual_seed(M),
                                              dtype=torch.float32).to(torch.bfloat16))
        rec = {"layer": layer, "N": N, "K": K, "rows": M, "impl": label, "pass": pas}
        try:
            fn, wfmt, nbytes, info = make_impl(L, impl, kw, sk)
            with torch.no_grad():
                y = fn(x)  # compile / tune outside the timing
                torch.cuda.synchronize()
                ref_w = x.float() @ L.W.float().T
                rec["err_w"] = ((y.float() - ref_w).norm() / ref_w.norm()).item()
                Wq = {"int4": L.Wq4, "int8": L.Wq8, "w": L.W.float()}.get(wfmt)
                if Wq is not None:
                    ref_q = x.float() @ Wq.T
                    rec["err_q"] = ((y.float() - ref_q).norm() / ref_q.norm()).item()
                t, how = time_it(lambda: fn(x), a.rep_ms)
            rec.update(us=t.median_ms * 1e3, p20_us=t.p20_ms * 1e3, p80_us=t.p80_ms * 1e3, timed_as=how,
                       bytes=nbytes, GBps=nbytes / (t.median_ms * 1e-3) / 1e9, **info)
        except Exception as e:  # noqa: BLE001  (record it, keep going)
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            failures[impl] = rec["error"]
            if os.environ.get("BENCH_TRACE"):
                traceback.print_exc()
        records.append(rec)
        print(f"[{time.time() - t0:6.1f}s] {layer:20s} M={M:2d} {label:38s} "
              + (f"{rec['us']:8.2f} us  err_q {rec.get('err_q', float('nan')):.1e}" if "us" in rec else rec["error"][:90]),
              flush=True)

    # vs cuBLAS and a compact table: the best new variant per (layer, rows, format) next to the baselines
    cub = {(r["layer"], r["rows"]): r["us"] for r in records if r["impl"] == "cuBLAS bf16" and "us" in r}
    for r in records:
        if "us" in r and (r["layer"], r["rows"]) in cub:
            r["vs_cublas"] = r["us"] / cub[(r["layer"], r["rows"])]
    print("\nus (x cuBLAS bf16); new = fastest variant of labutils.kernels.int4_fast")
    cols = ["cuBLAS bf16", "torch int4pack", "lab int4", "new int4", "lab int8", "new int8", "bnb nf4", "bnb int8"]
    print(f"{'layer':20s} {'M':>2s} " + " ".join(f"{c:>18s}" for c in cols))
    for layer in a.shapes:
        for M in a.rows:
            rs = [r for r in records if r["layer"] == layer and r["rows"] == M and "us" in r]
            cells = []
            for c in cols:
                if c.startswith("new"):
                    cand = [r for r in rs if r["impl"].startswith(c)]
                else:
                    cand = [r for r in rs if r["impl"] == c]
                if not cand:
                    cells.append(f"{'-':>18s}")
                    continue
                b = min(cand, key=lambda r: r["us"])
                cells.append(f"{b['us']:8.2f} ({b.get('vs_cublas', float('nan')):4.2f}x)  ")
            print(f"{layer:20s} {M:2d} " + " ".join(cells))
    best = {}
    for r in records:
        if "us" in r and r["impl"].startswith("new"):
            k = (r["layer"], r["rows"], r["impl"].split()[1])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    print("\nfastest new variant per layer / rows / format:")
    for (layer, M, fmt), r in sorted(best.items()):
        print(f"  {layer:20s} M={M:2d} {fmt}: {r['impl']:38s} {r['us']:7.2f} us ({r.get('vs_cublas', 0):.2f}x) "
              f"err_q {r.get('err_q', float('nan')):.1e}")
    bad = [r for r in records if r["impl"].startswith("new") and r.get("err_q", 0) > 2e-2]
    if bad:
        print(f"\nWARNING: {len(bad)} new-kernel outputs differ from the dequantized reference by > 2e-2:")
        for r in bad[:10]:
            print(f"  {r['layer']} M={r['rows']} {r['impl']}: err_q {r['err_q']:.2e}")
    if skipped:
        print(f"\nskipped at the {a.budget:.0f} s budget: {len(skipped)} measurements (first: {skipped[0]})")
    out = {"env": bench.env_record(torch.bfloat16), "args": {k: v for k, v in vars(a).items() if k != "shapes"},
           "shapes": a.shapes, "records": records, "skipped": skipped, "failures": failures,
           "tuned_configs": {repr(k): list(v) for k, v in F4._TUNED.items()},
           "configs": {k: [list(c) for c in v] for k, v in F4.CONFIGS.items()}, "elapsed_s": time.time() - t0,
           "interpreted": runtime.triton_interpreted()}
    path = Path(a.out) / "quant_layer_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {path} ({len(records)} records, {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
