"""W8A8 and FP8 with the scaling fused (run on the H200, 2026-11-30: results/probe_w8a8.json).

Notebook 04's first run timed W8A8 (`torch._int_mm`) and FP8 (`torch._scaled_mm`) as a reader would
first write them: activations quantized by several PyTorch ops per call, and W8A8's int32 output
rescaled in fp32 in further passes. At 4096 rows of the 3584->18944 layer that made W8A8 2.4x slower
than bf16 cuBLAS and FP8 only 1.2x faster. Here:

- ``quant_rows``: one Triton pass that turns x (M, K) into int8 or fp8 codes with a scale per row;
- ``w8a8_matmul``: a Triton int8 x int8 -> int32 GEMM whose epilogue multiplies by the row scale of x
  and the channel scale of W and writes bf16, so the int32 matrix never reaches memory;
- FP8 through ``torch._scaled_mm`` with row-wise scales (scale_a (M, 1), scale_b (1, N)), whose
  epilogue applies them.

The kernels moved into labutils/actquant.py after the run (results/probe_w8a8.json); this script now
imports them from there (the fused GEMM's tiling is the library's fixed 128 x 128 x 64, the one timed).

Usage on the device: python3 scripts/probes/probe_w8a8.py SECONDS (writes $OUT/probe_w8a8.json).
On a CPU: TRITON_INTERPRET=1 python3 scripts/probes/probe_w8a8.py --check (int8 path only).
"""
import json
import os
import sys
import time

import torch

from labutils.actquant import FP8, quant_rows, w8a8_matmul


def check_cpu():
    torch.manual_seed(0)
    M, N, K = 20, 48, 200
    x, W = torch.randn(M, K), torch.randn(N, K) * 0.02
    xq, xs = quant_rows(x)
    assert xq.dtype == torch.int8 and (xq.float() * xs - x).abs().max() <= xs.max() / 2 + 1e-6
    wq_s = W.abs().amax(1) / 127
    wq = torch.round(W / wq_s[:, None]).to(torch.int8)
    y = w8a8_matmul(xq, xs, wq, wq_s, out_dtype=torch.float32)
    ref = (xq.double() @ wq.double().T) * xs.double() * wq_s.double()[None, :]
    err = ((y.double() - ref).norm() / ref.norm()).item()
    print("w8a8 kernel vs its own arithmetic in float64:", err)
    assert err < 1e-6
    print("w8a8 vs the bf16-free reference x W^T:", ((y - x @ W.T).norm() / (x @ W.T).norm()).item())


if __name__ == "__main__":
    if "--check" in sys.argv:
        check_cpu()
        sys.exit()
    import torch.nn.functional as F

    from labutils.bench import time_fn
    OUT = os.environ.get("OUT", "/tmp")
    DEADLINE = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 120)
    res = []
    dev = "cuda"
    N, K = 18944, 3584
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    ws = W.float().abs().amax(1) / 127
    wq = torch.round(W.float() / ws[:, None]).to(torch.int8)
    w8s = W.float().abs().amax(1, keepdim=True) / 448
    w8 = (W.float() / w8s).to(torch.float8_e4m3fn)
    for M in (1, 16, 256, 1024, 4096, 8192):
        if time.time() > DEADLINE:
            break
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.float(), W.float())
        row = {"rows": M, "bf16 cuBLAS": time_fn(lambda: F.linear(x, W), cuda_graph=True).median_ms * 1e3}

        def w8a8():
            xq, xs = quant_rows(x)
            return w8a8_matmul(xq, xs, wq, ws)

        def fp8():
            xq, xs = quant_rows(x, FP8)
            pad = -M % 16  # _scaled_mm wants rows in multiples of 16
            if pad:
                xq = torch.cat([xq, xq.new_zeros(pad, K)])
                xs = torch.cat([xs, xs.new_ones(pad, 1)])
            return torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=w8s.t(), out_dtype=torch.bfloat16)[:M]

        for name, fn in (("W8A8 fused (Triton)", w8a8), ("FP8 rowwise (_scaled_mm)", fp8)):
            try:
                out = fn()
                row[name] = time_fn(fn, cuda_graph=True).median_ms * 1e3
                row[name + " rel err"] = ((out.float() - ref).norm() / ref.norm()).item()
            except Exception as e:  # noqa: BLE001
                row[name] = f"{type(e).__name__}: {str(e)[:150]}"
        res.append(row)
        print(row, flush=True)
        json.dump(res, open(f"{OUT}/probe_w8a8.json", "w"), indent=1)
