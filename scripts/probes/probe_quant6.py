"""4-bit layers at 1-16 activation rows: the word-wise tensor-core kernel against the byte tile kernel.

Notebook 04's batch sweep (H100, 2026-11-23) had the lab INT4 layer at 54 us for 2 rows and 129 us
for 16 rows of the 3584 -> 18944 projection, against 30 us for one row (the GEMV) and ~61 us for
cuBLAS bf16 at any of those row counts: the byte tile kernel (``_w4a16_kernel``) converts every code
with an integer-to-float instruction and splits each byte into two half-depth products.
``labutils.quant._w4_mma_kernel`` reads int32 words, converts nibbles with the magic number, scales
them, and hands eight (BLOCK_N, BLOCK_K / 8) tiles per chunk to tl.dot. Here both kernels (and the
GEMV, and the new kernel at one row) are timed in CUDA graphs beside cuBLAS bf16 and the lab INT8
layer, each checked against the dequantized reference.

Two runs (H200, 2026-11-30): results/probe_quant6_run1.json with the dequantized tile as tl.dot's
right operand (y = x W^T), all shapes; results/probe_quant6.json with both operand orders ("word
mma" = left operand, y^T = W x^T, and "word mma x-lhs" = right operand), up/down. The library kept
the left operand (0-20% faster) and dropped the other order; to time it again, check out 0da6f52.

Usage on the device: [ROWS=1,4,16 SHAPES=up,down] python3 scripts/probes/probe_quant6.py SECONDS (writes $OUT/probe_quant6.json).
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from labutils import quant as Q
from labutils.bench import time_fn


def launch(kernel, mod, x):
    """Call one of the 4-bit kernels directly (bypassing the row-count dispatch of the custom op)."""
    nf4 = isinstance(mod, Q.NF4Linear)
    s = mod.absmax if nf4 else mod.scale
    group = mod._meta["block_size" if nf4 else "group_size"]
    rest = (s, s if nf4 else mod.zero, mod.code.float() if nf4 else s, s)
    meta = dict(NG=s.shape[1], NF4=nf4, GROUP=group, HAS_XS=False)
    packed = mod.packed if kernel is Q._w4a16_kernel else mod.packed.view(torch.int32)
    return Q._launch(kernel, x, mod.out_features, (packed, *rest), None, **meta)


if __name__ == "__main__":
    OUT = os.environ.get("OUT", "/tmp")
    DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 150)
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    save = lambda: json.dump(res, open(f"{OUT}/probe_quant6.json", "w"), indent=1)  # noqa: E731
    def us(fn): return time_fn(fn, rep_ms=30, cuda_graph=True).median_ms * 1e3
    dev, dt = "cuda", torch.bfloat16
    ROWS = [int(r) for r in os.environ.get("ROWS", "1,2,4,8,16").split(",")]
    SHAPES = {"up 3584->18944": (18944, 3584), "down 18944->3584": (3584, 18944), "qkv 3584->4608": (4608, 3584),
              "o 3584->3584": (3584, 3584)}
    for name, (N, K) in SHAPES.items():
        if name.split()[0] not in os.environ.get("SHAPES", "up,down,qkv,o").split(","):
            continue
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)
        mods = {f: Q.FORMATS[f].from_linear(lin) for f in ("int8", "int4", "nf4")}
        refW = {f: m.dequantize(torch.float32) for f, m in mods.items()}
        for M in ROWS:
            if time.time() > DEADLINE:
                break
            x = torch.randn(M, K, device=dev, dtype=dt)
            row = {"shape": name, "M": M, "cuBLAS bf16": us(lambda: F.linear(x, lin.weight))}
            m8 = mods["int8"]
            m8(x)
            row["int8 lib"] = us(lambda: m8(x))
            for f in ("int4", "nf4"):
                m = mods[f]
                ref = x.float() @ refW[f].T
                kernels = {"byte tile": Q._w4a16_kernel, "word mma": Q._w4_mma_kernel}
                if M == 1:
                    kernels["gemv"] = Q._w4_gemv_kernel
                for kn, k in kernels.items():
                    try:
                        y = launch(k, m, x)
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        row[f"{f} {kn}"] = us(lambda: launch(k, m, x))
                        row[f"{f} {kn} err"] = err
                    except Exception as e:  # noqa: BLE001
                        row[f"{f} {kn}"] = f"{type(e).__name__}: {str(e)[:200]}"
                best = Q._w4_mma_kernel.best_config if hasattr(Q._w4_mma_kernel, "best_config") else None
                row[f"{f} mma config"] = str(best)
            res["rows"].append(row)
            print({k: (round(v, 2) if isinstance(v, float) and "err" not in k else v) for k, v in row.items()}, flush=True)
            save()
    print("done", flush=True)
