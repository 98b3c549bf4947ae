# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Weight-only quantization: fewer bytes, more tokens per second
#
# At batch 1 a decode step reads every weight once (notebook 02), so storing weights in fewer
# bytes should buy speed in proportion: int8 halves the bytes of bf16, int4 quarters them. That
# only happens if the weights are dequantized *inside* the matrix-vector product, in registers;
# a kernel that first writes a bf16 copy of the weight reads and writes more than it saves. This
# notebook
#
# 1. builds three quantizers (INT8 per channel, INT4 per group of 128, NF4 per block of 64) and
#    measures their error;
# 2. reads the Triton kernels that dequantize inside the product (W8A16, W4A16) and checks them;
# 3. times them per layer against cuBLAS and bitsandbytes, in GB/s of weight bytes;
# 4. runs the decode engine of notebook 02 with each format on the Qwen2.5-7B **shape twin**;
# 5. measures what each format costs in perplexity on real weights (the embedded model);
# 6. looks beyond weight-only: W8A8 through `torch._int_mm` and FP8.
#
# **About the "unquantized" model.** The embedded SmolLM2-135M ships as a Q4_1 GGUF, so its fp32
# weights are already a 4-bit model dequantized; quantizing them again adds a second round of
# error on a grid that does not line up with the first. Its perplexities say how the formats
# compare, not what they would cost a bf16 model.

# %%
import logging
import os
import time

import pandas as pd
import plotly.express as px
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labutils import actquant, configs, quant, roofline
from labutils.bench import time_fn
from labutils.data import DataUnavailableError, load_text, load_wikitext2
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.gemv import GemvLinear
from labutils.hardware import copy_bandwidth_gbps, matmul_peak_tflops
from labutils.models import load_model, shape_twin
from labutils.notebook import setup, show_source, slider
from labutils.perplexity import perplexity
from labutils.results import save_results
from labutils.runtime import has_cuda, pick

device = setup()
DT = pick(torch.bfloat16, torch.float32)  # bf16 is wrong in Triton's interpreter
FORMATS = ["int8", "int4", "nf4"]
UNQ = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DT]  # the unquantized format's name
QUANTIZE = {"int8": quant.quantize_int8, "int4": quant.quantize_int4, "nf4": quant.quantize_nf4}

# %% [markdown]
# ## 1. Three formats and their error

# %%
show_source(quant.quantize_int4)

# %%
hf, tok = load_model()  # the embedded model, fp32
real_W = hf.model.layers[0].mlp.up_proj.weight.detach().float().cpu()  # (1536, 576), real weights
N, K = pick((18944, 3584), (512, 256))
rand_W = torch.randn(N, K) * 0.02  # Gaussian, the shape of a Qwen2.5-7B up_proj
rows = []
for name, W in [("SmolLM2 layer-0 up_proj (real)", real_W), (f"Gaussian {N}x{K}", rand_W)]:
    for fmt in FORMATS:
        q = QUANTIZE[fmt](W)
        rows.append({"weight": name, "format": fmt, "bytes/weight": q.nbytes / W.numel(),
                     "rel error": quant.quant_error(W, q)})
err = pd.DataFrame(rows)
print(err.to_string(index=False, float_format=lambda x: f"{x:.4f}"))

# %% [markdown]
# Smaller groups cost more bytes (one fp16 scale and one zero point per group) and buy accuracy:

# %%
def group_tradeoff(group_size: int = 128):
    if group_size & (group_size - 1):
        print(f"group {group_size}: group sizes are powers of two here (the kernels split words by them)")
        return
    q = quant.quantize_int4(rand_W, group_size=group_size)
    print(f"int4, group {group_size}: {q.nbytes / rand_W.numel():.4f} bytes/weight, "
          f"rel error {quant.quant_error(rand_W, q):.4f}")


for g in (32, 64, 128, 256):
    group_tradeoff(g)
slider(group_tradeoff, group_size=(32, 512, 32, 128))

# %% [markdown]
# ## 2. Kernels that dequantize inside the product
#
# Each program streams BLOCK_N rows of packed weights along K and dequantizes them in registers,
# accumulating in fp32. Decode (one activation row) has its own kernels, built for bandwidth: the
# codes are read as 32-bit words and taken apart with shifts, turned into floats with the
# *magic-number* trick (OR a small integer into the mantissa of 2^23, subtract 2^23: exact, and it
# avoids the integer-to-float unit, which runs at a fraction of the FP32 rate), and each 4-bit
# group's scale multiplies the group's partial sum once rather than every weight.

# %%
show_source(quant._w4_gemv_kernel)

# %% [markdown]
# With 2-16 activation rows, all rows share one `tl.dot` per dequantized weight tile, so the
# weights are still read once:

# %%
show_source(quant._w4a16_kernel)

# %%
checks = []
Nk, Kk = pick((4096, 3584), (96, 256))
Wk = torch.randn(Nk, Kk, device=device) * 0.02
for fmt in FORMATS:
    for dtype in pick([torch.float16, torch.bfloat16], [torch.float32, torch.float16]):
        lin = torch.nn.Linear(Kk, Nk, bias=False, device=device, dtype=dtype)  # bias: tests/test_quant.py
        with torch.no_grad():
            lin.weight.copy_(Wk)
        qlin = quant.FORMATS[fmt].from_linear(lin)
        W_deq = qlin.dequantize(torch.float32)  # what the kernel should multiply by
        for M in (1, 16):  # the GEMV kernel, and the tile kernel at its full height
            x = torch.randn(M, Kk, device=device, dtype=dtype)
            ref = F.linear(x.float(), W_deq)
            e = ((qlin(x).float() - ref).norm() / ref.norm()).item()
            checks.append({"format": fmt, "rows": M, "dtype": str(dtype)[6:], "rel err": e,
                           "tol": 1e-5 if dtype == torch.float32 else 1e-2})
checks = pd.DataFrame(checks)
print(checks.to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
print(f"every kernel within its dtype's tolerance of the dequantized reference: {bool((checks['rel err'] <= checks['tol']).all())}")

# %% [markdown]
# ## 3. Per layer: time and GB/s of weight bytes
#
# **Prediction.** A layer at batch 1 takes (bytes stored) / bandwidth: int8 ≈ 0.5× and int4 ≈
# 0.26× of bf16's time if the kernels stream as well as a copy. Beside them: cuBLAS in bf16 and
# fp16, and bitsandbytes' int8 and nf4 layers (when the package is installed).
#
# **How we time.** Each layer is replayed from a CUDA graph with an L2 flush before every call
# (`time_fn(..., cuda_graph=True)`), the way a captured decode step runs it: a few-microsecond kernel
# behind a Python custom op and an autotuner would otherwise be timed as its launch overhead, and a
# weight smaller than the 50 MB L2 would be read from cache instead of memory. Layers that cannot be
# captured are timed launch by launch (column "timed as").

# %%
copy_gbps = copy_bandwidth_gbps()["gbps"]
try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
HAS_BNB = bnb is not None and has_cuda()
print(f"copy bandwidth {copy_gbps:,.0f} GB/s; bitsandbytes: {bnb.__version__ if bnb else 'not installed'}")
# bitsandbytes' int8 layer casts bf16 inputs to fp16 and logs a warning saying so on every call (tens of
# thousands of lines in a timing loop): silenced (it is a logging message, not a Python warning)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def bnb_linear(lin: torch.nn.Linear, fmt: str):
    """A bitsandbytes layer holding ``lin``'s weights (quantized when moved to the GPU)."""
    if fmt == "int8":  # Int8Params quantizes on its way from the CPU to the GPU
        m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
        m.weight = bnb.nn.Int8Params(lin.weight.detach().half().cpu(), requires_grad=False, has_fp16_weights=False)
    else:  # Params4bit quantizes a GPU tensor in place on .to(device): no round trip through the host
        m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=lin.weight.dtype, quant_type="nf4")
        m.weight = bnb.nn.Params4bit(lin.weight.detach().half(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        m.bias = torch.nn.Parameter(lin.bias.detach().to("cpu"), requires_grad=False)
    return m.to(lin.weight.device)


def module_bytes(m) -> int:
    """Bytes a layer keeps for its weights (packed codes, scales, zeros; bias excluded)."""
    if isinstance(m, quant._QuantLinear):
        return m.nbytes
    return sum(t.nbytes for k, t in m.state_dict().items() if torch.is_tensor(t) and not k.endswith("bias"))


SHAPES = pick({"up_proj 3584->18944": (18944, 3584), "qkv fused 3584->4608": (4608, 3584),
               "o_proj 3584->3584": (3584, 3584), "down_proj 18944->3584": (3584, 18944)},
              {"up_proj (smoke)": (96, 256)})
HEADLINE = next(iter(SHAPES))


def layer_times(M: int = 1, shapes=SHAPES) -> pd.DataFrame:
    rows = []
    for shape, (N, K) in shapes.items():
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=DT)
        x = torch.randn(M, K, device=device, dtype=DT)
        variants = {"cuBLAS " + str(DT)[6:]: (lambda: F.linear(x, lin.weight), lin.weight.nbytes)}
        if has_cuda():
            w16, x16 = lin.weight.half(), x.half()
            variants["cuBLAS float16"] = (lambda: F.linear(x16, w16), w16.nbytes)
        for fmt in FORMATS:
            q = quant.FORMATS[fmt].from_linear(lin)
            variants[f"lab {fmt}"] = (lambda q=q: q(x), module_bytes(q))
        if HAS_BNB:
            for fmt in ("int8", "nf4"):
                try:
                    b = bnb_linear(lin, fmt)
                    variants[f"bitsandbytes {fmt}"] = (lambda b=b: b(x), module_bytes(b))
                except Exception as e:  # noqa: BLE001  (report, keep going)
                    print(f"bitsandbytes {fmt} failed: {type(e).__name__}: {str(e)[:120]}")
        for name, (fn, nbytes) in variants.items():
            fn()  # compile / autotune outside the timing
            timing = "graph"
            try:  # GPU time as a captured decode step sees it: no Python or launch overhead
                us = time_fn(fn, rep_ms=pick(100, 20), cuda_graph=True).median_ms * 1e3
            except Exception:  # noqa: BLE001  (a layer that cannot be captured: time its launches)
                timing = "launch"
                us = time_fn(fn, rep_ms=pick(100, 20)).median_ms * 1e3
            rows.append({"layer": shape, "rows": M, "kernel": name, "us": us, "GB/s": nbytes / us / 1e3,
                         "% of copy": nbytes / us / 1e3 / copy_gbps, "timed as": timing if has_cuda() else "cpu"})
    return pd.DataFrame(rows)


per_layer = layer_times(1)
base_us = per_layer[(per_layer.layer == HEADLINE) & per_layer.kernel.str.startswith("cuBLAS")].us.min()
per_layer["vs cuBLAS"] = per_layer.us / per_layer.layer.map(
    per_layer[per_layer.kernel.str.startswith("cuBLAS")].groupby("layer").us.min())
print(per_layer.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %%
def batch_sweep(max_rows: int = 16):
    df = pd.concat([layer_times(M, {HEADLINE: SHAPES[HEADLINE]}) for M in sorted({1, 2, 4, 8, max_rows})])
    px.line(df, x="rows", y="us", color="kernel", markers=True, log_y=True,
            title=f"{HEADLINE}: time against activation rows").show()
    return df


sweep = batch_sweep(pick(16, 2))
slider(batch_sweep, max_rows=(2, 16, 1, 16))

# %% [markdown]
# **What the layer table says** (committed run, on an H200: 4,240 GB/s copy bandwidth). INT8 takes
# 0.65x cuBLAS bf16's time on the 3584->18944 layer (28.4 against 43.6 us) and streams 2.4 TB/s of
# weight bytes, 56% of the copy ceiling. INT4 halves the bytes again but not the time: 30.8 us, 0.71x,
# 1.15 TB/s. Count codes instead of bytes and the two kernels agree: both turn about 2.2-2.4 codes
# per nanosecond into products (68 M codes in 28-31 us). The same notebook on an H100 (same SMs and
# clocks, 3.0 TB/s; the previous commit of this notebook) gave cuBLAS 60.5, INT8 33.4 and INT4 31.0 us:
# the extra bandwidth sped up cuBLAS and INT8, and left INT4 where it was. So the 4-bit kernel is
# limited by the work per code, not by memory. Which part of that work is not settled: its compiled
# loop (SASS from `cuobjdump`) spends ~9 instructions per code, yet a variant with fewer than half as
# many was no faster (`scripts/probes/probe_quant4.py`), and feeding the tiles through TMA with a
# pipelined loop gained 9% (`probe_quant5.py`). NF4 is slower still: a table lookup per code.
# bitsandbytes' nf4 layer is faster than the lab's nf4 but not than its int4; its int8 layer first
# casts bf16 inputs to fp16 and is slower than the lab's int8, on down_proj 2.7x.
#
# **The batch sweep**: INT8 keeps its time (~29 us) up to 16 rows, because the tile kernel reads each
# weight once for all rows. INT4 and NF4 do not: from 2 rows on they run the tensor-core kernel
# (`_w4_mma_kernel`), 76-119 us for INT4, 1.8-2.6x cuBLAS. The GEMV's tricks carried over, but not its
# speed (`scripts/probes/probe_quant6.py` has the other shapes; on down_proj too few programs fill the
# GPU). For the verification batches of speculative decoding (notebook 05), INT8 is the format that
# keeps its advantage past batch 1.

# %% [markdown]
# ## 4. End to end: the decode engine with each format (shape twin)
#
# The engine of notebook 02 (fused projections, static cache, torch.compile + CUDA graph) with its
# linear layers swapped through the seam. Each format's roofline is the copy bandwidth over the
# bytes it actually reads per token. To keep the notebook's run within minutes, the engines here
# compile one decoder layer and reuse it for all 28 (`regional=True`, see `labutils/engine.py`)
# instead of compiling the whole step for every format; bf16 runs the same way, so the comparison
# is like for like. bitsandbytes layers are captured in a CUDA graph where they allow it (no
# compile), else run eagerly.

# %%
arch = pick("Qwen2.5-7B", "SmolLM2-135M")
twin = shape_twin(arch, dtype=DT)  # random weights: speed only
tcfg = configs.arch(arch)
ids = torch.randint(0, tcfg["vocab_size"], (1, 32), device=device)
n_decode = pick(128, 4)
e2e_formats = [UNQ] + pick(["int8", "int4", "nf4"] + (["bnb_int8", "bnb_nf4"] if HAS_BNB else []), ["int8"])


def build(fmt: str) -> Decoder:
    m = Decoder.from_hf(twin).fuse_projections()
    if fmt == UNQ:
        return m.swap_linears(lambda n, l: GemvLinear(l)) if has_cuda() else m
    if fmt.startswith("bnb_"):
        return m.swap_linears(lambda n, l: bnb_linear(l, fmt[4:]))
    # on a CPU the kernels run in Triton's interpreter, far too slowly for a whole model: use the
    # same arithmetic through dequantized weights there
    return quant.quantize_model(m, fmt, simulate=not has_cuda())


e2e = []
for fmt in tqdm(e2e_formats, desc="engines"):
    t_build = time.perf_counter()
    model_q = build(fmt)
    linear_bytes = sum(module_bytes(m) for n, m in model_q.named_modules()
                       if n.endswith(("_proj", "lm_head")) and not list(m.children()))
    # memory of this format alone: the tensors its model holds (each counted once), plus what the
    # engine adds at its peak (KV cache, activations, graph pools); the bf16 twin every format is
    # built from stays resident but is not this format's
    model_gib = sum({t.data_ptr(): t.nbytes for t in model_q.state_dict().values()  # bitsandbytes keeps its
                     if torch.is_tensor(t)}.values()) / 2**30                            # scales in state_dict only
    if has_cuda():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    tok_s, used = None, None
    modes = ["graph", "eager"] if fmt.startswith("bnb_") else ["compile", "graph", "eager"]
    for mode in pick(modes, ["eager"]):
        try:
            engine = DecodeEngine(model_q, batch=1, max_seq_len=32 + n_decode + 8, mode=mode,
                                  regional=mode == "compile")
            n = n_decode if mode != "eager" or not has_cuda() else 16  # eager 7B: ~20 tok/s, keep it short
            tok_s, used = engine.decode_tok_s(ids, n, repeats=pick(3, 1)), mode
            print(f"{fmt}: {mode} engine built, compiled and timed in {time.perf_counter() - t_build:.0f} s", flush=True)
            break
        except Exception as e:  # noqa: BLE001  (some third-party layers cannot be compiled or captured)
            print(f"{fmt}: mode {mode} failed ({type(e).__name__}: {str(e)[:100]}), trying the next")
        finally:
            torch._dynamo.reset()
    bytes_per_token = linear_bytes + roofline.kv_bytes_per_token(tcfg, 2) * (32 + n_decode)
    e2e.append({"format": fmt, "mode": used, "tok/s": tok_s, "GB read/token": bytes_per_token / 1e9,
                "roofline tok/s": copy_gbps * 1e9 / bytes_per_token, "model GiB": model_gib,
                "peak GiB": model_gib + (torch.cuda.max_memory_allocated() - base) / 2**30 if has_cuda() else None})
    del model_q
e2e = pd.DataFrame(e2e)
e2e["% of roofline"] = e2e["tok/s"] / e2e["roofline tok/s"]
e2e[f"vs {UNQ}"] = e2e["tok/s"] / e2e.loc[e2e.format == UNQ, "tok/s"].iloc[0]
print(f"[{arch} shape twin, batch 1]")
print(e2e.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %%
points = pd.DataFrame({"label": e2e.format, "group": "decode, batch 1",
                       "intensity": [2 * roofline.linear_params(tcfg) / (b * 1e9) for b in e2e["GB read/token"]],
                       "tflops": [2 * roofline.linear_params(tcfg) * t / 1e12 for t in e2e["tok/s"]]})
peak = matmul_peak_tflops(DT)[0]  # measured, as in notebook 00
roofline.chart(peak, copy_gbps, points, title=f"Formats on the roofline ({arch} shape twin, achieved)").show()

# %% [markdown]
# **What the engines say** (shape twin, committed run on the H200). bf16 decodes at ~238 tok/s, 80%
# of its roofline. INT8 reaches ~338 tok/s, 1.42x bf16 and 57% of its own roofline: the per-layer
# 0.65x, plus the attention, norms and sampling that did not shrink. INT4 gains almost nothing
# (~252 tok/s, 1.06x, 22% of its roofline) for the reason the layer table gave: its kernels are
# limited by the work per code, so a quarter of the bytes does not buy a quarter of the time, and on
# this GPU, with more bandwidth than the H100, the gap is wider (the H100 run: bf16 179, INT8 277,
# INT4 249 tok/s). NF4 pays its table lookups. bitsandbytes' layers cannot be compiled here and run
# in graph mode only.
#
# The memory columns count each format alone: "model GiB" is the tensors its model holds (packed
# codes, scales, the bf16 embedding and norms; not the bf16 twin every format is built from), and
# "peak GiB" adds what the engine allocates at most. For the lab's formats that peak comes from the
# prefill: 32 prompt rows are more than the kernels take (16), so each layer is dequantized for
# `F.linear`, and the largest one, the 152064 x 3584 lm_head, is ~1 GiB in bf16 (INT8) or ~2 GiB on
# its way through fp32 (INT4, NF4). Decoding itself adds only the KV cache and activations.

# %% [markdown]
# ## 5. Quality on real weights: perplexity
#
# The embedded model on the held-out text in data/ (`load_text('eval')`, never used for
# calibration); activation-aware scaling (AWQ-style) calibrated on the calibration text only.
# Remember the baseline is a dequantized Q4_1 model.

# %%
# A hub model instead of the embedded one: LAB_QUALITY_MODEL=Qwen/Qwen2.5-0.5B-Instruct (needs the hub or
# its cache); it is then scored on WikiText-2 when `datasets` can reach it, else on the same text.
quality_model = os.environ.get("LAB_QUALITY_MODEL")
hf_q, tok_q = load_model(quality_model, dtype=DT) if quality_model else load_model(dtype=DT)
text, text_name = load_text("eval"), "data/ eval text (public domain, held out)"
if quality_model:
    try:
        text, text_name = load_wikitext2(), "WikiText-2 test"
    except DataUnavailableError as e:
        print(e)
print(f"model: {quality_model or 'embedded SmolLM2-135M-Instruct'}; text: {text_name}")
max_tokens = pick(None, 1024)
calib = tok_q(load_text("calibration"), return_tensors="pt").input_ids[0, : 8 * 512].reshape(8, 512)
ppl = {}
ppl[UNQ] = perplexity(Decoder.from_hf(hf_q), tok_q, text, max_tokens=max_tokens)
for fmt in FORMATS:
    ppl[fmt] = perplexity(quant.quantize_model(Decoder.from_hf(hf_q), fmt), tok_q, text, max_tokens=max_tokens)
awq = quant.awq_scales(Decoder.from_hf(hf_q), calib[: pick(8, 2)], "int4")
ppl["int4_awq"] = perplexity(quant.quantize_model(Decoder.from_hf(hf_q), "int4", awq=awq), tok_q, text, max_tokens=max_tokens)
if HAS_BNB:
    for fmt in ("int8", "nf4"):
        ppl[f"bnb_{fmt}"] = perplexity(Decoder.from_hf(hf_q).swap_linears(lambda n, l: bnb_linear(l, fmt)), tok_q, text,
                                       max_tokens=max_tokens)
quality = pd.DataFrame({"format": list(ppl), "perplexity": list(ppl.values())})
quality["vs unquantized"] = quality.perplexity / ppl[UNQ] - 1
print(f"unquantized = {quality_model or 'the embedded model'} in {str(DT)[6:]}"
      + ("" if quality_model else " (itself dequantized from Q4_1)"))
print(quality.to_string(index=False, float_format=lambda x: f"{x:,.4f}"))

# %% [markdown]
# **What the perplexities say** (committed run, all 88,039 tokens of the eval text; the H100 run
# before it gave the same numbers to four digits). The bf16
# model scores 41.32, the same as the fp32 model on a CPU (41.32), so bf16 itself costs nothing.
# INT8 per channel costs nothing measurable either (41.31). INT4 with groups of 128, rounded to
# nearest, costs +26%, far outside the +5% the issue asks for; activation-aware scaling calibrated on
# the calibration text recovers about a third of that (+18%), not enough. Two cross-checks hold:
# the lab's NF4 and bitsandbytes' NF4 land within 0.2% of each other, and bitsandbytes' int8 (+2.6%)
# is worse than the lab's because with `threshold=0` it also rounds the activations to int8.
#
# Two causes of the INT4 loss cannot be separated on this model: a 135M-parameter model is small,
# and small models lose more to 4-bit rounding; and its weights are already a Q4_1 model (4-bit
# blocks of 32 with their own scale and minimum), so group-128 INT4 is a second rounding onto a grid
# that does not line up with the first (section 1's error table: 0.10 relative error per weight, the
# same as on Gaussian weights). The same cell on a bf16-trained hub model
# (`LAB_QUALITY_MODEL=Qwen/Qwen2.5-0.5B-Instruct`) would tell them apart; it needs the hub and did not run here.

# %% [markdown]
# ## 6. Beyond weight-only: W8A8 and FP8
#
# Quantizing the activations too lets the tensor cores multiply int8 × int8 or fp8 × fp8 at twice
# their bf16 rate. That saves compute, which only pays where the layer is compute-bound: at large
# batch (prefill, big serving batches). At batch 1 the weights' bytes are all that count, and they
# are the same as weight-only INT8's. Each activation row (token) gets its own scale.
#
# Three ways to run the same layer, all from `labutils.actquant`:
# - **W8A8 as first written**: PyTorch ops quantize x, `torch._int_mm` multiplies, and its int32
#   result is rescaled in fp32 afterwards: extra passes over M × N × 4 bytes;
# - **W8A8 fused**: one Triton pass quantizes x (`quant_rows`), and a Triton int8 GEMM applies both
#   scales in its epilogue, so the int32 product never reaches memory;
# - **FP8 (e4m3) row-wise**: the same one-pass quantizer, then `torch._scaled_mm`, which applies
#   per-row and per-column scales in cuBLASLt's epilogue.

# %%
show_source(actquant.w8a8_reference)
show_source(actquant._w8a8_kernel)

# %%
def beyond_weight_only(rows=(1, 16, 256, 1024, 4096)):
    N, K = SHAPES[HEADLINE]
    W = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
    wq = quant.quantize_int8(W.float())
    w8 = actquant.quantize_fp8_rows(W)
    out = []
    for M in rows:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        exact = F.linear(x.float(), W.float())
        variants = {"bf16 cuBLAS": lambda: F.linear(x, W),
                    "W8A8 as first written (_int_mm)": lambda: actquant.w8a8_reference(x, wq.q, wq.scale),
                    "W8A8 fused (Triton)": lambda: actquant.w8a8_linear(x, wq.q, wq.scale),
                    "FP8 row-wise (_scaled_mm)": lambda: actquant.fp8_linear(x, *w8)}
        for name, fn in variants.items():
            try:
                y = fn()
                err = ((y.float() - exact).norm() / exact.norm()).item()
                try:
                    us = time_fn(fn, rep_ms=50, cuda_graph=True).median_ms * 1e3
                except Exception:  # noqa: BLE001  (not capturable: time its launches)
                    us = time_fn(fn, rep_ms=50).median_ms * 1e3
            except RuntimeError as e:
                print(f"{name} at {M} rows: {str(e)[:120]}")
                us, err = None, None
            out.append({"rows": M, "kernel": name, "us": us, "rel err": err})
    df = pd.DataFrame(out)
    df["vs bf16"] = df.us / df.rows.map(df[df.kernel == "bf16 cuBLAS"].set_index("rows").us)
    return df


if has_cuda():
    beyond = beyond_weight_only()
    print(f"[{HEADLINE}, bf16 activations; 'vs bf16' < 1 is faster]")
    print(beyond.pivot(index="rows", columns="kernel", values="vs bf16").to_string(float_format=lambda x: f"{x:,.2f}"))
    print(beyond.to_string(index=False, float_format=lambda x: f"{x:,.4g}"))
    px.line(beyond, x="rows", y="us", color="kernel", markers=True, log_x=True, log_y=True,
            title=f"{HEADLINE}: time against rows, 8-bit activations or not").show()
else:
    beyond = pd.DataFrame()
    print("int8 x int8 and fp8 tensor-core products need a GPU; the kernels are tested in the interpreter (tests/test_actquant.py)")

# %% [markdown]
# **Where they pay** (committed run, H200). *Not at decode batch sizes.* At 1-16 rows every variant
# takes about as long as bf16 or longer (FP8 0.88-1.05x, fused W8A8 1.09-1.18x), although FP8 and
# int8 weights are half the bytes: these are GEMM kernels, not GEMVs, and weight-only INT8 (28 us at
# 1-16 rows, section 3) is the better choice there. *At large batch, FP8 pays*: from 1024 rows, where
# the product is compute-bound, it takes 0.62x bf16's time (1.6x faster; the tensor cores' ratio is
# 2x). *W8A8 pays only when fused*: written the first way (PyTorch ops around `torch._int_mm`, the
# int32 result rescaled afterwards) it is 1.6-2.9x *slower* than bf16 at every size; with the
# quantization in one pass and the scales in the GEMM's epilogue it is 1.2x faster at 4096 rows
# (0.82x the time), with a single untuned tiling of 128 x 128 (at 256 rows that tiling leaves most
# SMs idle: 1.7x). The price is accuracy: 1.2% (W8A8) and 3.7% (FP8 e4m3) relative output error
# against 0.17% for bf16 on these Gaussian inputs; real activations have outlier channels that
# per-token scales handle worse (`tests/test_actquant.py` shows the effect), which is what SmoothQuant
# and FP8 training recipes address.

# %% [markdown]
# ## 7. Results

# %%
headline = per_layer[per_layer.layer == HEADLINE].set_index("kernel").us
metrics = {
    "layer_us": {k.replace("lab ", "").replace("bitsandbytes ", "bnb_").replace("cuBLAS ", ""): v for k, v in headline.items()},
    "engine_tok_s": dict(zip(e2e.format, e2e["tok/s"])),
    "engine_roofline_tok_s": dict(zip(e2e.format, e2e["roofline tok/s"])),
    "ppl": ppl, "ppl_tokens": max_tokens, "ppl_model": quality_model or "embedded SmolLM2-135M-Instruct (Q4_1)",
    "ppl_text": text_name, "copy_gbps": copy_gbps, "shape_twin": arch,
    "per_layer": per_layer.to_dict(orient="records"),
    "beyond_weight_only": beyond.to_dict(orient="records") if len(beyond) else None,
}
print(save_results("04_quantization", metrics, dtype=DT, note="engine tok/s on a random-weight shape twin; ppl on real weights (ppl_model)"))
