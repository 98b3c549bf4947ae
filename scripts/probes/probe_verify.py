"""Speculative verification on the Qwen2.5-7B shape twin: one forward of T = 1..16 new tokens, cuBLAS
against ``labutils.gemv.SmallMLinear`` (the GEMV at 1 row, ``_small_m_kernel`` at 2-16 rows).

Verifying k drafted tokens is one forward of T = k + 1 rows at batch 1. With nn.Linear (cuBLAS) that
forward cost 6.29 ms at T = 1 but 7.63 ms at T = 2 on an H200 (cuBLAS leaves its matrix-vector path);
the Triton kernel reads each weight tile once for all T <= 16 rows, so its time should stay within a
few % of its 1-row time. Measured here, in CUDA graphs (``time_fn(..., cuda_graph=True)``, L2 flushed):

1. ``forward``: a decoder (``fuse_projections``, static KV caches of 1024 positions, 256 positions filled)
   timed on T tokens at positions 256 .. 256 + T - 1, once on nn.Linear and once on SmallMLinear (a
   second decoder over the same twin, its linears swapped in place); the two logits compared.
2. ``layer``: the five projections of the model (fused qkv, o, fused gate_up, down, lm_head) at
   M = 1, 2, 5, 8, 16 rows, F.linear against ``torch.ops.labutils.linear_small_m``; GB/s = weight bytes / time.
3. ``split``: ``small_m_triton`` with split_k forced to 1, 2, 4 on the three shapes with N <= 4608 (whether
   the host heuristic ``gemv._split_k``, which splits only down_proj in 2, is right).

Each part stops at the deadline (first argument, seconds, default 220; everything, autotuning included,
should take < 4 minutes on an H200) and the JSON is rewritten after each part.

Usage on the device: PYTHONPATH=$PWD python3 scripts/probes/probe_verify.py [SECONDS] (writes $OUT/probe_verify.json).
On a CPU: python3 scripts/probes/probe_verify.py --check (a tiny model in Triton's interpreter, untimed in
substance: it runs every code path of the script, no CUDA graphs).
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

CHECK = "--check" in sys.argv
if not CHECK and not torch.cuda.is_available():
    sys.exit("probe_verify needs a CUDA GPU (or --check on a CPU)")

import pandas as pd  # noqa: E402

from labutils import gemv  # noqa: E402  (imports labutils: TRITON_INTERPRET=1 on a CPU)
from labutils.bench import env_record, time_fn  # noqa: E402
from labutils.decoder import Decoder  # noqa: E402
from labutils.kv_cache import static_caches  # noqa: E402

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
DEADLINE = time.time() + float(ARGS[0] if ARGS else 220)
OUT = os.environ.get("OUT")
DEV, DT = ("cpu", torch.float32) if CHECK else ("cuda", torch.bfloat16)
PREFILL, MAX_SEQ = (8, 64) if CHECK else (256, 1024)
TS = [1, 2, 5, 16] if CHECK else list(range(1, 17))
ROWS = [1, 2, 5, 8, 16]
SPLITS = [1, 2, 4]
# name -> (N, K) of the Qwen2.5-7B projections (fused as the decoder runs them); --check: small stand-ins
SHAPES = ({"qkv": (96, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 256), "lm_head": (512, 64)} if CHECK else
          {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
           "lm_head": (152064, 3584)})

res = {"env": env_record(DT), "check": CHECK, "forward": [], "layer": [], "split": [], "configs": {}}


def save():
    res["configs"] = {"small_m": {str(k): str(v) for k, v in getattr(gemv._small_m_kernel, "cache", {}).items()},
                      "gemv": {str(k): str(v) for k, v in getattr(gemv._gemv_kernel, "cache", {}).items()}}
    if OUT:
        with open(os.path.join(OUT, "probe_verify.json"), "w") as f:
            json.dump(res, f, indent=1)


def ms(fn) -> float:
    fn()  # autotuning and lazy initialisation outside the timing (and outside the graph's side stream)
    if CHECK:
        return time_fn(fn, warmup_ms=0, rep_ms=0, min_reps=1).median_ms
    return time_fn(fn, cuda_graph=True).median_ms


def rel(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def twin():
    if not CHECK:
        from labutils.models import shape_twin
        return shape_twin("Qwen2.5-7B", dtype=DT, device=DEV)
    from transformers import AutoConfig, AutoModelForCausalLM  # the 7B's structure (q/k/v bias, untied), tiny
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                               max_position_embeddings=MAX_SEQ, tie_word_embeddings=False, use_sliding_window=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=DT).eval()


def part_forward():
    hf = twin()
    models = {"cuBLAS": Decoder.from_hf(hf).fuse_projections(),
              "SmallMLinear": Decoder.from_hf(hf).fuse_projections()}
    del hf  # the unfused q/k/v and gate/up tensors go; the decoders share the rest
    models["SmallMLinear"].swap_linears(lambda name, lin: gemv.SmallMLinear(lin))
    n_swapped = sum(isinstance(m, gemv.SmallMLinear) for m in models["SmallMLinear"].modules())
    print(f"{n_swapped} SmallMLinear modules", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models["cuBLAS"].cfg.vocab_size, (1, PREFILL + max(TS)), generator=g).to(DEV)
    pos = torch.arange(PREFILL + max(TS), device=DEV)
    for m in models.values():
        m.set_kv_caches(static_caches(m, 1, MAX_SEQ))
        m(ids[:, :PREFILL], input_pos=pos[:PREFILL])  # 256 rows: cuBLAS in both
    logits = {}
    for T in TS:
        if time.time() > DEADLINE:
            print(f"deadline: forward stops before T={T}", flush=True)
            break
        x, p = ids[:, PREFILL:PREFILL + T], pos[PREFILL:PREFILL + T]  # fixed tensors: capturable
        row = {"T": T}
        for name, m in models.items():
            row[f"{name} ms"] = ms(lambda: m(x, input_pos=p))
            logits[name] = m(x, input_pos=p)
        row["logits rel err"] = rel(logits["SmallMLinear"], logits["cuBLAS"])
        row["same argmax"] = bool((logits["SmallMLinear"].argmax(-1) == logits["cuBLAS"].argmax(-1)).all())
        res["forward"].append(row)
        print(row, flush=True)
        save()
    del models, logits
    if not CHECK:
        torch.cuda.empty_cache()
    df = pd.DataFrame(res["forward"])
    if len(df):
        for name in ("cuBLAS", "SmallMLinear"):
            df[f"{name} / T=1"] = df[f"{name} ms"] / df[f"{name} ms"].iloc[0]
        df["cuBLAS / SmallM"] = df["cuBLAS ms"] / df["SmallMLinear ms"]
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)


def part_layer():
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=DEV, dtype=DT) * K ** -0.5
        gbytes = N * K * w.element_size() / 1e9
        for M in ROWS:
            if time.time() > DEADLINE:
                print(f"deadline: layer stops at {name} M={M}", flush=True)
                return
            x = torch.randn(M, K, device=DEV, dtype=DT)
            y_ref = F.linear(x, w)
            y = torch.ops.labutils.linear_small_m(x, w)
            t_cublas = ms(lambda: F.linear(x, w)) * 1e3
            t_lab = ms(lambda: torch.ops.labutils.linear_small_m(x, w)) * 1e3
            row = {"shape": name, "N": N, "K": K, "M": M, "cuBLAS us": t_cublas, "kernel us": t_lab,
                   "cuBLAS GB/s": gbytes / t_cublas * 1e6, "kernel GB/s": gbytes / t_lab * 1e6,
                   "kernel / cuBLAS": t_lab / t_cublas, "rel err": rel(y, y_ref),
                   "split_k": 1 if M == 1 else gemv._split_k(N, K, gemv._sm_count(torch.device(DEV)))}
            res["layer"].append(row)
            print(row, flush=True)
        save()


def part_split():
    for name, (N, K) in SHAPES.items():
        if N > 4608 and not CHECK:
            continue
        w = torch.randn(N, K, device=DEV, dtype=DT) * K ** -0.5
        for M in (2, 16):
            x = torch.randn(M, K, device=DEV, dtype=DT)
            y_ref = F.linear(x, w)
            row = {"shape": name, "N": N, "K": K, "M": M}
            for s in SPLITS:
                if time.time() > DEADLINE:
                    print(f"deadline: split stops at {name} M={M} split={s}", flush=True)
                    res["split"].append(row)
                    return
                row[f"split {s} us"] = ms(lambda: gemv.small_m_triton(x, w, split_k=s)) * 1e3
                row[f"split {s} rel err"] = rel(gemv.small_m_triton(x, w, split_k=s), y_ref)
            res["split"].append(row)
            print(row, flush=True)
        save()


if __name__ == "__main__":
    t0 = time.time()
    with torch.no_grad():
        part_forward()
        print(f"forward done at {time.time() - t0:.0f} s", flush=True)
        part_layer()
        if res["layer"]:
            print(pd.DataFrame(res["layer"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
        part_split()
        if res["split"]:
            print(pd.DataFrame(res["split"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    res["seconds"] = time.time() - t0
    save()
    print(f"done in {res['seconds']:.0f} s", flush=True)
