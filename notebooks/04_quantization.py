# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Weight-only quantization: fewer bytes per weight, and what they buy in speed
#
# At batch 1 a decode step reads every weight once (notebook 02), so storing weights in fewer
# bytes should buy speed in proportion: int8 halves the bytes of bf16, int4 quarters them. That
# can only happen if the weights are dequantized *inside* the matrix-vector product, in registers;
# a layer that first writes a bf16 copy of its weight to memory moves more bytes than it saves
# (section 3 measures it: 163 us for a 3584 → 18944 layer at one row, against 43.4 us for cuBLAS on
# the bf16 weight). Even then the bytes set the speed only as far as the kernel keeps up with them:
# in this run INT8 decodes 1.43x as many tokens per second as bf16, INT4 1.08x and NF4 0.44x (section 4).
# This notebook
#
# 1. builds three quantizers (INT8 per channel, INT4 per group of 128, NF4 per block of 64), has you
#    write INT4 group quantization and the packing of two 4-bit codes per byte, and measures their error;
# 2. reads the Triton kernels that dequantize inside the product and checks them;
# 3. times them per layer against cuBLAS and bitsandbytes, in GB/s of weight bytes, and measures
#    what dequantizing *before* the product costs;
# 4. runs the decode engine of notebook 02 with each format on the Qwen2.5-7B **shape twin**;
# 5. measures what each format costs in perplexity on real weights (the embedded model);
# 6. looks beyond weight-only: W8A8 through `torch._int_mm` and FP8.
#
# **About the "unquantized" model.** The embedded SmolLM2-135M ships as a Q4_1 GGUF, so its float
# weights (fp32 as loaded, bf16 in section 5) are already a 4-bit model dequantized; quantizing them
# again adds a second round of error on a grid that does not line up with the first. Its
# perplexities say how the formats compare, not what they would cost a bf16 model.

# %%
import logging
import math
import os
import time
import warnings

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from labutils import actquant, configs, quant, roofline
from labutils.bench import sync, time_fn
from labutils.data import DataUnavailableError, load_text, load_wikitext2
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.gemv import GemvLinear
from labutils.hardware import ceilings
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


def spread(t, scale=1e3) -> dict:
    """A Timing (ms) as median, p20 and p80 in microseconds (scale=1e3)."""
    return {"us": t.median_ms * scale, "p20": t.p20_ms * scale, "p80": t.p80_ms * scale}


def time_us(fn, rep_ms):
    """(median/p20/p80 in us, how it was timed): GPU time as a captured decode step sees it (no Python or
    launch overhead), or launch by launch for a function that cannot be captured in a CUDA graph."""
    try:
        return spread(time_fn(fn, rep_ms=rep_ms, cuda_graph=True)), "graph" if has_cuda() else "cpu"
    except Exception:  # noqa: BLE001  (not capturable: time its launches)
        return spread(time_fn(fn, rep_ms=rep_ms)), "launch"


# %% [markdown]
# ## 1. Three formats and their error
#
# **INT8 per channel** keeps one scale per output row: s = max|W[n]| / 127, code = round(W / s).
# **INT4 per group** cannot afford one scale per row: 16 levels spread over a whole row's range
# would be coarse, and one outlier would stretch them for every weight of the row. So each group of
# G consecutive weights along K (G = 128 here) gets its own *asymmetric* grid, a scale and a zero point:
#
# - lo = min(group, 0), hi = max(group, 0) (the range always holds 0, so 0.0 is exact),
# - scale = (hi − lo) / 15 (16 levels, 15 steps), zero = round(−lo / scale), an integer in [0, 15],
# - code = clamp(round(W / scale) + zero, 0, 15), and back: W ≈ (code − zero) · scale.
#
# Rounding to nearest makes each weight's error at most scale / 2. **NF4** (QLoRA) instead puts its
# 16 levels at the quantiles of a normal distribution, scaled by one absmax per block of 64.
#
# **Exercise 1.** Write the INT4 round trip: quantize W (N, K) per group of `group_size` along K and
# return what the codes dequantize to, (N, K) float32. K need not be a multiple of the group size: the
# last group of each row is shorter. A group of zeros has hi = lo: give it any positive scale.

# %%
def int4_group_quantize(W, group_size):
    ### BEGIN SOLUTION
    N, K = W.shape
    Wg = F.pad(W.float(), (0, -K % group_size)).view(N, -1, group_size)  # (N, n_groups, G); zero padding
    lo = Wg.amin(-1, keepdim=True).clamp(max=0)  # (N, n_groups, 1); padding cannot move lo or hi,
    hi = Wg.amax(-1, keepdim=True).clamp(min=0)  # which hold 0 anyway
    scale = (hi - lo) / 15  # 16 levels, 15 steps
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    zero = torch.round(-lo / scale)  # the code of 0.0, an integer in [0, 15]
    q = (torch.round(Wg / scale) + zero).clamp(0, 15)  # (N, n_groups, G) codes, rounded to nearest
    return ((q - zero) * scale).view(N, -1)[:, :K]  # (N, K) what the codes stand for
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("int4_group_quantize", int4_group_quantize)

# %% [markdown]
# The package's quantizer does the same and keeps the codes, scales and zero points. It stores each
# scale in fp16, rounded *up* so that no weight leaves the code range, so its round trip differs
# slightly from yours (below: by 1.0e-02 relative to your round trip, with relative errors of
# 0.10149 against your 0.10145):

# %%
show_source(quant.quantize_int4)

# %%
hf, tok = load_model()  # the embedded model, fp32
real_W = hf.model.layers[0].mlp.up_proj.weight.detach().float().to(device)  # (1536, 576), real weights
q_real = quant.quantize_int4(real_W, 128)
mine = int4_group_quantize(real_W, 128)
print(f"SmolLM2 layer-0 up_proj {tuple(real_W.shape)}, groups of 128 (K = 576: four of 128, one of 64)")
print(f"  rel error of your round trip      {((mine.double() - real_W.double()).norm() / real_W.double().norm()).item():.5f}")
print(f"  rel error of the package's        {quant.quant_error(real_W, q_real):.5f}  (fp16 scales, rounded up)")
print(f"  your round trip vs the package's  {((mine - q_real.dequantize()).norm() / mine.norm()).item():.1e}")

# %% [markdown]
# ### Two codes per byte
#
# A 4-bit code is half a byte, so the package packs two per uint8 along K: byte j of a row holds
# element 2j in its **low** nibble and element 2j + 1 in its **high** nibble (bitsandbytes does the
# opposite). The decode kernels of section 2 read four such bytes at a time as one little-endian
# int32 word, and then nibble i of word c is simply element 8c + i, taken out with `(word >> 4i) & 15`:

# %%
def packing_diagram(codes=(3, 12, 7, 0, 15, 9, 1, 6)):
    """Eight codes of a row -> four bytes (low nibble = even element) -> one int32 word."""
    fig = go.Figure()
    blue, green, grey = "#9ecae1", "#a1d99b", "#555"
    for k, c in enumerate(codes):  # the row of codes
        fig.add_shape(type="rect", x0=k, x1=k + 0.9, y0=4, y1=4.8, fillcolor=blue if k % 2 == 0 else green,
                      line_color=grey, opacity=0.9)
        fig.add_annotation(x=k + 0.45, y=4.4, text=f"w<sub>{k}</sub> = {c}", showarrow=False, font_size=13)
    for j in range(len(codes) // 2):  # the bytes, drawn most significant nibble first
        lo, hi = codes[2 * j], codes[2 * j + 1]
        x0 = 2 * j
        for x, color, val, k in ((x0, green, hi, 2 * j + 1), (x0 + 0.9, blue, lo, 2 * j)):
            fig.add_shape(type="rect", x0=x, x1=x + 0.9, y0=2, y1=2.8, fillcolor=color, line_color=grey, opacity=0.9)
            fig.add_annotation(x=x + 0.45, y=2.4, text=f"{val:04b}", showarrow=False, font_size=13)
            fig.add_shape(type="line", x0=k + 0.45, y0=4, x1=x + 0.45, y1=2.8, line=dict(color=grey, width=1))
        fig.add_annotation(x=x0 + 0.9, y=1.7, showarrow=False, font_size=12,
                           text=f"byte {j} = 0x{hi:X}{lo:X} = {16 * hi + lo}")
    word = sum(c << (4 * i) for i, c in enumerate(codes))
    fig.add_shape(type="rect", x0=0, x1=7.9, y0=0.2, y1=1.0, fillcolor="#f0f0f0", line_color=grey, opacity=0.9)
    fig.add_annotation(x=3.95, y=0.6, showarrow=False, font_size=13,
                       text=f"read as one int32 (little-endian): 0x{word:08X}; code i = (word >> 4i) & 15")
    fig.add_annotation(x=3.95, y=5.2, showarrow=False, font_size=13,
                       text="codes along K (blue: even elements, low nibbles; green: odd, high nibbles)")
    fig.update_xaxes(visible=False, range=[-0.3, 8.2])
    fig.update_yaxes(visible=False, range=[0, 5.5])
    fig.update_layout(title="INT4 packing: two codes per byte, eight per 32-bit word", height=340, width=760,
                      plot_bgcolor="white", showlegend=False, template="none")  # no theme: a diagram
    return fig


show(packing_diagram())

# %% [markdown]
# **Exercises 2 and 3.** Pack codes (..., K) uint8 in [0, 15] into (..., K/2) bytes in this layout, and
# take them apart again.

# %%
def int4_pack(q):
    ### BEGIN SOLUTION
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)  # element 2j low, 2j + 1 high
    ### END SOLUTION


def int4_unpack(p):
    ### BEGIN SOLUTION
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)  # (..., K/2, 2) -> (..., K), interleaved
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("int4_pack", int4_pack)
check("int4_unpack", int4_unpack)

# %% [markdown]
# Your functions against the package's packed weight of the real layer, and the word view the kernels use:

# %%
codes = int4_unpack(q_real.packed)  # (1536, 576) codes in [0, 15]
word = int(q_real.packed[0, :4].view(torch.int32))  # the first 8 codes of row 0 as one int32
print("your unpack of the package's bytes, packed again, gives the same bytes:",
      torch.equal(int4_pack(codes), q_real.packed))
print("nibble i of the first word is element i:", [(word >> 4 * i) & 15 for i in range(8)] == codes[0, :8].tolist())

# %% [markdown]
# **Exercise 4.** What a format costs in memory is its codes *plus* its scales and zero points. Write
# the bytes per weight of a row of K weights in groups of `group_size` (the last group may be
# shorter but still has a scale and a zero point):

# %%
def int4_bytes_per_weight(K, group_size, scale_bytes=2, zero_bytes=1):
    ### BEGIN SOLUTION
    groups = math.ceil(K / group_size)
    return (K / 2 + groups * (scale_bytes + zero_bytes)) / K
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("int4_bytes_per_weight", int4_bytes_per_weight)

# %% [markdown]
# The three formats on the real layer and on a Gaussian weight of the shape of Qwen2.5-7B's up_proj;
# the last column is the bytes predicted from the layout: INT8 1 + 2/K (an fp16 scale per row), the 4-bit
# formats from your formula (INT4: fp16 scale and uint8 zero per 128; NF4: fp16 absmax per 64, no zero point):

# %%
N, K = pick((18944, 3584), (512, 256))
rand_W = torch.randn(N, K, device=device) * 0.02  # Gaussian, the shape of a Qwen2.5-7B up_proj
formula = {"int8": lambda K: 1 + 2 / K,  # a byte per code, an fp16 scale per row
           "int4": lambda K: int4_bytes_per_weight(K, 128), "nf4": lambda K: int4_bytes_per_weight(K, 64, 2, 0)}
rows = []
for name, W in [("SmolLM2 layer-0 up_proj (real)", real_W), (f"Gaussian {N}x{K}", rand_W)]:
    for fmt in FORMATS:
        q = QUANTIZE[fmt](W)
        rows.append({"weight": name, "format": fmt, "bytes/weight": q.nbytes / W.numel(),
                     "rel error": quant.quant_error(W, q), "predicted": formula[fmt](W.shape[1])})
err = pd.DataFrame(rows)
print(err.to_string(index=False, float_format=lambda x: f"{x:.4f}"))

# %% [markdown]
# Smaller groups cost more bytes (one scale and one zero point per group) and buy accuracy: on the
# Gaussian weight, groups of 32 store 0.5938 bytes per weight at a relative error of 0.0808, groups
# of 512 store 0.5059 at 0.1176. The kernels step through K in chunks of whole groups, so a group is a
# power of two of at least 32; the slider offers those that also divide K (here 32 to 512, since
# 3584 = 7 × 512).

# %%
GROUPS = [g for g in (32, 64, 128, 256, 512, 1024) if K % g == 0]  # valid group sizes for this K


def group_tradeoff(group_size: int = 128):
    q = quant.quantize_int4(rand_W, group_size=group_size)
    print(f"int4, group {group_size:4d}: {q.nbytes / rand_W.numel():.4f} bytes/weight "
          f"(your formula {int4_bytes_per_weight(K, group_size):.4f}), rel error {quant.quant_error(rand_W, q):.4f}")


for g in GROUPS:
    group_tradeoff(g)
slider(group_tradeoff, group_size=GROUPS)  # the valid sizes only

# %% [markdown]
# ## 2. Kernels that dequantize inside the product
#
# Each program streams BLOCK_N rows of packed weights along K and dequantizes them in registers,
# accumulating in fp32; the dequantized weights never reach memory. Decode (one activation row) has
# its own kernels, built for bandwidth: the codes are read as 32-bit words and taken apart with
# shifts (the word view above), turned into floats with the *magic-number* trick (OR a small integer
# into the mantissa of 2^23, subtract 2^23: exact, and it avoids the integer-to-float unit, which runs
# at a fraction of the FP32 rate), and each group's scale multiplies the group's partial sum once
# rather than every weight.

# %%
show_source(quant._w4_gemv_kernel)

# %% [markdown]
# With 2-16 activation rows (small batches, the verification step of speculative decoding) the 4-bit
# layers run `_w4_mma_kernel`: the same words and magic numbers, each nibble position's dequantized
# (BLOCK_N, BLOCK_K / 8) tile scaled by its group and handed to `tl.dot` with the matching strided
# columns of x, so the tensor cores do the multiply-adds for all rows and every weight is still read
# and dequantized once. (A byte-wise tile kernel, `_w4a16_kernel`, is used only where K or the group
# size is not a multiple of 8; more than 16 rows dequantize and call `F.linear`.) The two kernels
# shown are the ones timed below: `_w4_gemv_kernel` at one row, `_w4_mma_kernel` at 2-16 rows.

# %%
show_source(quant._w4_mma_kernel)

# %% [markdown]
# Each kernel against `F.linear` with the dequantized weight, at 1 row (the GEMV kernels) and 16 rows
# (the tile kernels at their full height):

# %%
checks = []
Nk, Kk = pick((3584, 3584), (96, 256))  # the o_proj shape of section 3: its autotuning is shared
Wk = torch.randn(Nk, Kk, device=device) * 0.02
for fmt in FORMATS:
    for dtype in pick([torch.bfloat16], [torch.float32, torch.float16]):
        lin = torch.nn.Linear(Kk, Nk, bias=False, device=device, dtype=dtype)  # bias: tests/test_quant.py
        with torch.no_grad():
            lin.weight.copy_(Wk)
        qlin = quant.FORMATS[fmt].from_linear(lin)
        W_deq = qlin.dequantize(torch.float32)  # what the kernel should multiply by
        for M in (1, 16):
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
# Beside the lab's kernels: cuBLAS in bf16 and fp16, and bitsandbytes' int8 and nf4 layers (when the
# package is installed). Bandwidths are divided by this GPU's copy bandwidth as notebook 00 measured it
# (measured here instead when notebook 00 has not run on this GPU; the printout says which).
#
# **How the layers are timed.** Each layer is replayed from a CUDA graph with an L2 flush before every
# call (`time_fn(..., cuda_graph=True)`), the way a captured decode step runs it: a kernel of a few
# microseconds behind a Python custom op and an autotuner would otherwise be timed as its launch
# overhead, and a weight smaller than the L2 cache (tens of MB) would be read from it instead of memory. Layers
# that cannot be captured are timed launch by launch (column "timed as"). Every time is the median
# of many replays, with the 20th and 80th percentiles beside it.

# %%
ceil = ceilings()
copy_gbps = ceil["copy_gbps"]
try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
HAS_BNB = bnb is not None and has_cuda()
# bitsandbytes' int8 layer casts bf16 inputs to fp16 and says so with a UserWarning on every call that
# Python's once-per-location rule does not hold back (tens of thousands of lines in a timing loop)
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast", category=UserWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # versions that log it instead
print(f"copy bandwidth {copy_gbps:,.0f} GB/s ({ceil['source']}); "
      f"bitsandbytes: {bnb.__version__ if bnb else 'not installed'}")


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
CUBLAS = "cuBLAS " + str(DT)[6:]

# %% [markdown]
# **Predict first.** At one activation row a layer should take (bytes read) / bandwidth. INT4 with
# groups of 128 stores 0.5234 bytes per weight against bf16's 2, so if the kernels streamed their
# bytes as well as cuBLAS does, the INT4 up_proj would take 0.26x cuBLAS bf16's time. What fraction
# do you expect it to take?

# %%
my_int4_vs_bf16 = None  # your prediction: INT4 time / cuBLAS bf16 time, up_proj at 1 row

# %%
def layer_times(M: int = 1, shapes=SHAPES) -> pd.DataFrame:
    rows = []
    for shape, (N, K) in shapes.items():
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=DT)
        x = torch.randn(M, K, device=device, dtype=DT)
        variants = {CUBLAS: (lambda: F.linear(x, lin.weight), lin.weight.nbytes)}
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
            t, how = time_us(fn, rep_ms=pick(50, 20))
            rows.append({"layer": shape, "rows": M, "kernel": name, **t, "GB/s": nbytes / t["us"] / 1e3,
                         "% of copy": nbytes / t["us"] / 1e3 / copy_gbps, "bytes": nbytes, "timed as": how})
    df = pd.DataFrame(rows)
    df["vs cuBLAS"] = df.us / df.layer.map(df[df.kernel.str.startswith("cuBLAS")].groupby("layer").us.min())
    return df


per_layer = layer_times(1)
print(per_layer.drop(columns="bytes").to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %%
h = per_layer[per_layer.layer == HEADLINE].set_index("kernel")
int4_vs_bf16 = h.us["lab int4"] / h.us[CUBLAS]
predict("INT4 / cuBLAS time, up_proj at 1 row", my_int4_vs_bf16, int4_vs_bf16, "x")
NK = math.prod(SHAPES[HEADLINE])
for fmt in FORMATS:
    r = h.loc[f"lab {fmt}"]
    print(f"{fmt}: {r.us:.1f} us = {r.us / h.us[CUBLAS]:.2f}x cuBLAS for {r.bytes / h.bytes[CUBLAS]:.2f}x its bytes; "
          f"{r['% of copy']:.0%} of the copy bandwidth; {NK / (r.us * 1e3):.2f} weights per ns")

# %% [markdown]
# **Reading the table.** A kernel that is limited by memory takes time in proportion to its bytes: its
# "vs cuBLAS" equals its bytes ratio and its "% of copy" is high. On the up_proj layer none of the
# lab's formats gets there. INT8 takes 28.6 us, 0.65x cuBLAS bf16's 43.6 us for 0.50x its bytes (56%
# of the copy bandwidth, cuBLAS 73%); INT4 takes 30.8 us, 0.70x for 0.26x its bytes (27%); NF4 takes
# 80.4 us, 1.84x cuBLAS: slower than bf16 on a quarter of its bytes (11%). The last column says why
# halving the bytes again bought INT4 nothing over INT8: both turn weights into products at about the
# same rate (2,376 and 2,208 weights per ns), so both are limited by something other than their
# bytes, most likely the work per weight, and INT4 cannot pull ahead until that gets cheaper. NF4,
# which looks each code up in a table, manages 845 weights per ns. bitsandbytes takes 41.1 us (int8)
# and 36.9 us (nf4, 2.2x faster than the lab's NF4); its int8 layer (with `threshold=0`) also
# quantizes the activations to int8, after casting bf16 inputs to fp16.
#
# ### Dequantize first, then multiply?
#
# The obvious way to run a quantized layer is to dequantize the weight to bf16 and call `F.linear`.
# Count the bytes: the dequantization reads 0.52 bytes per weight and writes 2, and the product reads
# those 2 again, 4.5 bytes per weight against the fused kernel's 0.52 and cuBLAS's 2 on the
# unquantized weight. Measured on the up_proj layer at 1 and 16 rows, the dequantization written as
# PyTorch ops (`unpack`, subtract, multiply in fp32, cast: several passes over the weight), and compiled
# into one kernel by `torch.compile` (one pass over the weight):

# %%
def dequantize_int4(packed, scale, zero, group_size: int, dtype):
    """The INT4 weight (N, K) in ``dtype``, written out to memory (K a multiple of the group size)."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    q = torch.stack((packed & 15, packed >> 4), dim=-1).view(N, -1, group_size)  # (N, n_groups, G) codes
    w = (q.float() - zero.float()[..., None]) * scale.float()[..., None]  # (q - z) s per group
    return w.view(N, K).to(dtype)


def unfused_vs_fused(rows=(1, 16)) -> pd.DataFrame:
    N, K = SHAPES[HEADLINE]
    lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=DT)
    q4 = quant.Int4Linear.from_linear(lin)
    args = (q4.packed, q4.scale, q4.zero, q4._meta["group_size"], DT)
    deq = {"dequantize (PyTorch ops) + F.linear": dequantize_int4}
    if has_cuda():  # inductor fuses unpack, subtract, multiply and cast into one pass
        deq["dequantize (compiled, one kernel) + F.linear"] = torch.compile(dequantize_int4, dynamic=False)
    nbytes = q4.nbytes
    model_bytes = {CUBLAS: lin.weight.nbytes, "lab int4 (fused)": nbytes}
    out = []
    for M in rows:
        x = torch.randn(M, K, device=device, dtype=DT)
        variants = {CUBLAS: lambda: F.linear(x, lin.weight), "lab int4 (fused)": lambda: q4(x)}
        for name, fn in deq.items():
            variants[name] = lambda fn=fn: F.linear(x, fn(*args))
            model_bytes[name] = nbytes + 2 * lin.weight.nbytes  # read codes, write bf16, read bf16 again
        y, y_ref = variants["lab int4 (fused)"]().float(), F.linear(x, dequantize_int4(*args)).float()
        assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-2  # the same product, however it is computed
        for name, fn in variants.items():
            fn()
            t, how = time_us(fn, rep_ms=pick(50, 20))
            out.append({"rows": M, "layer": name, **t, "timed as": how,
                        "bytes at copy speed (us)": model_bytes[name] / copy_gbps / 1e3})
    df = pd.DataFrame(out)
    df["vs fused"] = df.us / df.rows.map(df[df.layer == "lab int4 (fused)"].set_index("rows").us)
    return df


unfused = unfused_vs_fused()
print(f"[{HEADLINE}, {UNQ} activations; median and p20-p80 in us]")
print(unfused.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
best_unfused = unfused[unfused.layer.str.startswith("dequantize")].groupby("rows").us.min()
fused_us = unfused[unfused.layer == "lab int4 (fused)"].set_index("rows").us
print("the best unfused layer takes " + ", ".join(f"{best_unfused[m] / fused_us[m]:.1f}x the fused kernel's time at "
                                                  f"{m} row{'s' if m > 1 else ''}" for m in best_unfused.index))

# %% [markdown]
# At one row dequantizing first is much slower, as the bytes predict: 885 us as PyTorch ops and
# 163 us compiled, against 31.0 us for the fused kernel and 43.4 us for cuBLAS on the bf16 weight
# (the compiled version takes 5.3x the fused kernel's time, and 2.3x the 72 us its bytes need at
# copy speed). At 16 rows the fused INT4 kernel is no longer fast: it takes 117 us, 2.6x cuBLAS
# bf16's 44.9 us, and the compiled unfused layer (164 us) is only 1.4x slower than it.
#
# ### Against the number of activation rows
#
# Small batches (2-16 rows) run the tile kernels, which read each weight once for all rows: a kernel
# that keeps its time as the rows grow is still limited by its weight bytes; one whose time climbs is
# limited by its arithmetic or by too few programs to fill the GPU. Medians with p20-p80 error bars
# (mostly smaller than the markers):

# %%
def batch_sweep(max_rows: int = 16):
    Ms = sorted({2, pick(4, 2), max_rows})  # 1 row: the table above
    df = pd.concat([per_layer[per_layer.layer == HEADLINE]]
                   + [layer_times(M, {HEADLINE: SHAPES[HEADLINE]}) for M in Ms])
    fig = px.line(df.assign(plus=df.p80 - df.us, minus=df.us - df.p20), x="rows", y="us", color="kernel",
                  error_y="plus", error_y_minus="minus", markers=True, log_y=True, height=400,
                  labels={"us": "time (us)", "rows": "activation rows"},
                  title=f"{HEADLINE}: time against activation rows (median, p20-p80)")
    show(fig)
    return df


sweep = batch_sweep(pick(16, 2))
print(f"[{HEADLINE}: us, median (p20-p80)]")
print(sweep.assign(t=[f"{u:,.1f} ({a:,.1f}-{b:,.1f})" for u, a, b in zip(sweep.us, sweep.p20, sweep.p80)])
      .pivot_table(index="kernel", columns="rows", values="t", aggfunc="first").to_string())
slider(batch_sweep, max_rows=(2, 16, 1, 16))

# %%
flat = {k: d.set_index("rows").us for k, d in sweep.groupby("kernel")}
for k in ("lab int8", "lab int4", "lab nf4", CUBLAS):
    s = flat[k]
    print(f"{k:>16}: {s.iloc[0]:6.1f} us at 1 row, {s.iloc[-1]:6.1f} us at {s.index[-1]} rows "
          f"({s.iloc[-1] / s.iloc[0]:.2f}x), {s.iloc[-1] / flat[CUBLAS].iloc[-1]:.2f}x cuBLAS there")

# %% [markdown]
# **Reading the sweep.** INT8 and cuBLAS keep their time from 1 to 16 rows (INT8 28.6 to 30.8 us,
# cuBLAS bf16 43.6 to 44.3 us): still limited by their weight bytes. The 4-bit layers do not: INT4
# goes from 30.8 us at 1 row (the GEMV kernel) to 75.1 us at 2 rows (the tensor-core kernel) and
# 118.0 us at 16, 2.66x cuBLAS there; NF4 from 80.4 to 305.3 us, 6.89x cuBLAS. At 2-16 rows both are
# slower than bf16 on this layer, limited by their arithmetic or their number of programs rather than
# their bytes. bitsandbytes' NF4 climbs as well (36.9 to 87.9 us); its int8 stays at 41-47 us.

# %% [markdown]
# ## 4. End to end: the decode engine with each format (shape twin)
#
# The engine of notebook 02 (fused projections, static cache, torch.compile + CUDA graph) with its
# linear layers swapped through the seam. Each format's roofline is the copy bandwidth over the
# bytes it actually reads per token. To keep the run within minutes, the engines compile one decoder
# layer and reuse it for all 28 (`regional=True`, see `labutils/engine.py`) instead of compiling the
# whole step for every format; bf16 runs the same way, so the comparison is like for like.
# bitsandbytes appears per layer (section 3) and in perplexity (section 5) but not here: its 7B
# engines are slow to build (the int8 weights are quantized on their way through the host), so they
# are left out to keep the run short.

# %%
arch = pick("Qwen2.5-7B", "SmolLM2-135M")
twin = shape_twin(arch, dtype=DT)  # random weights: speed only
tcfg = configs.arch(arch)
ids = torch.randint(0, tcfg["vocab_size"], (1, 32), device=device)
n_decode = pick(128, 4)
e2e_formats = [UNQ] + pick(FORMATS, ["int8"])


def build(fmt: str) -> Decoder:
    m = Decoder.from_hf(twin).fuse_projections()
    if fmt == UNQ:
        return m.swap_linears(lambda n, l: GemvLinear(l)) if has_cuda() else m
    # on a CPU the kernels run in Triton's interpreter, far too slowly for a whole model: use the
    # same arithmetic through dequantized weights there
    return quant.quantize_model(m, fmt, simulate=not has_cuda())


def decode_tok_s(engine, n: int, reps: int) -> dict:
    """tok/s of n decode steps after a prefill of ``ids``: median, p20 and p80 of ``reps`` timed runs
    after one untimed run (which compiles and captures)."""
    engine.prefill(ids)
    engine.decode(n)
    rates = []
    for _ in range(reps):
        engine.prefill(ids)
        sync()
        t0 = time.perf_counter()
        engine.decode(n)
        sync()
        rates.append(n / (time.perf_counter() - t0))
    p20, med, p80 = np.percentile(rates, [20, 50, 80])
    return {"tok/s": med, "p20": p20, "p80": p80}


e2e = []
for fmt in e2e_formats:  # each prints a line when it is done (no progress bar: its text would stay behind)
    t_build = time.perf_counter()
    model_q = build(fmt)
    linear_bytes = sum(module_bytes(m) for n, m in model_q.named_modules()
                       if n.endswith(("_proj", "lm_head")) and not list(m.children()))
    # memory of this format alone: the tensors its model holds (each counted once), plus what the
    # engine adds at its peak (KV cache, activations, graph pools); the bf16 twin every format is
    # built from stays resident but is not this format's
    model_gib = sum({t.data_ptr(): t.nbytes for t in model_q.state_dict().values() if torch.is_tensor(t)}.values()) / 2**30
    if has_cuda():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rate, used = {"tok/s": None, "p20": None, "p80": None}, None
    for mode in pick(["compile", "graph", "eager"], ["eager"]):
        try:
            engine = DecodeEngine(model_q, batch=1, max_seq_len=32 + n_decode + 8, mode=mode,
                                  regional=mode == "compile")
            n = n_decode if mode != "eager" or not has_cuda() else 16  # eager 7B: ~20 tok/s, keep it short
            rate, used = decode_tok_s(engine, n, reps=pick(5, 2)), mode
            print(f"{fmt}: {mode} engine built, compiled and timed in {time.perf_counter() - t_build:.0f} s", flush=True)
            break
        except Exception as e:  # noqa: BLE001  (a layer that cannot be compiled or captured)
            print(f"{fmt}: mode {mode} failed ({type(e).__name__}: {str(e)[:100]}), trying the next")
        finally:
            torch._dynamo.reset()
    bytes_per_token = linear_bytes + roofline.kv_bytes_per_token(tcfg, 2) * (32 + n_decode)
    e2e.append({"format": fmt, "mode": used, **rate, "GB read/token": bytes_per_token / 1e9,
                "roofline tok/s": copy_gbps * 1e9 / bytes_per_token, "model GiB": model_gib,
                "peak GiB": model_gib + (torch.cuda.max_memory_allocated() - base) / 2**30 if has_cuda() else None})
    del model_q
e2e = pd.DataFrame(e2e)
e2e["% of roofline"] = e2e["tok/s"] / e2e["roofline tok/s"]
e2e[f"vs {UNQ}"] = e2e["tok/s"] / e2e.loc[e2e.format == UNQ, "tok/s"].iloc[0]
print(f"[{arch} shape twin, batch 1; tok/s: median and p20-p80 of {pick(5, 2)} runs of {n_decode} tokens]")
print(e2e.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %%
points = pd.DataFrame({"label": e2e.format, "group": "decode, batch 1",
                       "intensity": [2 * roofline.linear_params(tcfg) / (b * 1e9) for b in e2e["GB read/token"]],
                       "tflops": [2 * roofline.linear_params(tcfg) * t / 1e12 for t in e2e["tok/s"]]})
show(roofline.chart(ceil["matmul_bf16_tflops"], copy_gbps, points,
                    title=f"Formats on the roofline ({arch} shape twin, achieved)"))

# %%
e = e2e.set_index("format")
for fmt in e.index[1:]:
    r = e.loc[fmt]
    print(f"{fmt}: {r['tok/s']:,.0f} tok/s, {r[f'vs {UNQ}']:.2f}x {UNQ} for {r['GB read/token'] / e.loc[UNQ, 'GB read/token']:.2f}x "
          f"its bytes per token; {r['% of roofline']:.0%} of its own roofline ({UNQ}: {e.loc[UNQ, '% of roofline']:.0%})")

# %% [markdown]
# **Reading the engines.** INT8 decodes 334 tok/s, 1.43x bf16's 234, for 0.50x its bytes per token;
# INT4 251 tok/s, 1.08x, for 0.26x; NF4 103 tok/s, 0.44x: slower than bf16 on a quarter of its bytes.
# Each ratio is also below the format's layer speed-up over cuBLAS in section 3 (up_proj at one row:
# 1.53x, 1.42x and 0.54x). Attention over the KV cache, the norms, the sampling and the engine's own
# fixed cost per step do not shrink with the weights and pull every ratio toward 1; that can account
# for part of INT8's and INT4's shortfall, but not for NF4 ending further below bf16 than its layers
# did. (The engine's layers are not exactly section 3's: gate and up are fused into one 37888 × 3584
# projection, the lm_head is quantized too, and bf16 runs the lab's GEMV, `GemvLinear`, not cuBLAS.)
# Against their own rooflines, which assume the bytes alone set the time, bf16 reaches 77%, INT8 55%,
# INT4 22% and NF4 9%: the formats whose layers were far from their bytes' time in section 3 stay far
# from it here.
#
# The memory columns count each format alone: "model GiB" is the tensors its model holds (packed
# codes, scales, the bf16 embedding and norms; not the bf16 twin every format is built from), and
# "peak GiB" adds what the engine allocates at most: 0.26 GiB more for bf16, 1.02 GiB for INT8,
# 2.04 GiB for INT4 and 1.53 GiB for NF4. For the lab's formats the excess comes from the prefill:
# 32 prompt rows are more than the kernels take (16), so each layer is dequantized for `F.linear`
# (through fp32 temporaries), and the largest one the prompt goes through is the fused 37888 × 3584
# gate and up projection (the prefill computes logits for the last position only, a single row, so
# the lm_head runs its kernel). Decoding itself adds only the KV cache and activations.

# %% [markdown]
# ## 5. Quality on real weights: perplexity
#
# The embedded model on the held-out text in data/ (`load_text('eval')`, never used for
# calibration), in windows of 512 tokens. To keep the run short, every format is scored on the same
# fixed prefix of that text, in a full run its first 16,384 tokens (the printout says how many the
# whole text has):
# the formats are compared on identical tokens, so their differences are far more precise than the
# perplexities themselves. Activation-aware scaling (AWQ-style) is calibrated on the calibration
# text only. Remember the baseline is a dequantized Q4_1 model.

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
max_tokens = pick(16384, 1024)
n_text = len(tok_q(text, add_special_tokens=False, verbose=False)["input_ids"])
print(f"model: {quality_model or 'embedded SmolLM2-135M-Instruct'}; text: {text_name}; "
      f"scored on its first {min(max_tokens, n_text):,} of {n_text:,} tokens")
calib = tok_q(load_text("calibration"), return_tensors="pt").input_ids[0, : 8 * 512].reshape(8, 512)
candidates = {UNQ: lambda: Decoder.from_hf(hf_q)}
for fmt in FORMATS:
    candidates[fmt] = lambda fmt=fmt: quant.quantize_model(Decoder.from_hf(hf_q), fmt)
candidates["int4_awq"] = lambda: quant.quantize_model(  # scales searched on calibration text, 10 exponents
    Decoder.from_hf(hf_q), "int4", awq=quant.awq_scales(Decoder.from_hf(hf_q), calib[: pick(8, 1)], "int4",
                                                         n_grid=pick(10, 4), max_rows=pick(512, 64), progress=False))
if HAS_BNB:
    for fmt in ("int8", "nf4"):
        candidates[f"bnb_{fmt}"] = lambda fmt=fmt: Decoder.from_hf(hf_q).swap_linears(lambda n, l: bnb_linear(l, fmt))
ppl = {}
for name, make in candidates.items():
    ppl[name] = perplexity(make(), tok_q, text, max_tokens=max_tokens, progress=False)
quality = pd.DataFrame({"format": list(ppl), "perplexity": list(ppl.values())})
quality["vs unquantized"] = quality.perplexity / ppl[UNQ] - 1
print(f"unquantized = {quality_model or 'the embedded model'} in {str(DT)[6:]}"
      + ("" if quality_model else " (itself dequantized from Q4_1)"))
print(quality.to_string(index=False, float_format=lambda x: f"{x:,.4f}"))

# %%
d = quality.set_index("format")["vs unquantized"]
print(f"INT8 per channel: {d['int8']:+.1%}; INT4 group 128, round to nearest: {d['int4']:+.1%}; "
      f"with activation-aware scales: {d['int4_awq']:+.1%} (recovers {1 - d['int4_awq'] / d['int4']:.0%} of the loss); "
      f"NF4: {d['nf4']:+.1%}")
if HAS_BNB:
    print(f"bitsandbytes NF4 {d['bnb_nf4']:+.1%} against the lab's {d['nf4']:+.1%}; "
          f"bitsandbytes int8 (activations rounded to int8 too) {d['bnb_int8']:+.1%}")

# %% [markdown]
# **Reading the perplexities.** INT8 per channel costs almost nothing: 25.39 against 25.37 (+0.1%);
# 256 levels per row leave an error per weight far below what a 135M model notices. bitsandbytes'
# int8, which rounds the activations to int8 as well, costs +3.0% (26.13). The 4-bit formats cost far
# more: INT4 33.13 (+30.5%), NF4 32.82 (+29.3%). Two causes cannot be separated on this model: a
# 135M-parameter model is small, and small models lose more to 4-bit rounding; and its weights are
# already a Q4_1 model (4-bit blocks of 32 with their own scale and minimum), so group-128 INT4 is a
# second rounding onto a grid that does not line up with the first. The error per weight does not
# tell them apart either: section 1's table gives INT4 a relative error of 0.1015 on the real layer
# and 0.1005 on a Gaussian one. Activation-aware scaling gives the weights that meet large
# activations a finer grid: 30.87 (+21.7%), 29% of INT4's loss recovered. The lab's NF4 and
# bitsandbytes' NF4 are the same format and land close together, 32.82 and 32.87: a cross-check of
# the quantizer. The same cell on a bf16-trained hub model (`LAB_QUALITY_MODEL=Qwen/Qwen2.5-0.5B-Instruct`)
# would tell the two causes apart; it needs the hub.

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
                t, _ = time_us(fn, rep_ms=50)
            except RuntimeError as e:
                print(f"{name} at {M} rows: {str(e)[:120]}")
                t, err = {"us": None, "p20": None, "p80": None}, None
            out.append({"rows": M, "kernel": name, **t, "rel err": err})
    df = pd.DataFrame(out)
    df["vs bf16"] = df.us / df.rows.map(df[df.kernel == "bf16 cuBLAS"].set_index("rows").us)
    return df


if has_cuda():
    beyond = beyond_weight_only()
    print(f"[{HEADLINE}, bf16 activations; 'vs bf16' < 1 is faster]")
    print(beyond.pivot(index="rows", columns="kernel", values="vs bf16").to_string(float_format=lambda x: f"{x:,.2f}"))
    print(beyond.to_string(index=False, float_format=lambda x: f"{x:,.4g}"))
    show(px.line(beyond.assign(plus=beyond.p80 - beyond.us, minus=beyond.us - beyond.p20), x="rows", y="us",
                 color="kernel", error_y="plus", error_y_minus="minus", markers=True, log_x=True, log_y=True,
                 height=400, labels={"us": "time (us)", "rows": "activation rows"},
                 title=f"{HEADLINE}: time against rows, 8-bit activations or not (median, p20-p80)"))
    v = beyond.pivot(index="rows", columns="kernel", values="vs bf16")
    e = beyond.groupby("kernel")["rel err"].mean()
    for k in v.columns.drop("bf16 cuBLAS"):
        small = v[k].loc[[m for m in v.index if m <= 16]]
        print(f"{k}: {small.min():.2f}-{small.max():.2f}x bf16's time at 1-16 rows, {v[k].iloc[-1]:.2f}x at "
              f"{v.index[-1]} rows; rel output error {e[k]:.2%} (bf16 {e['bf16 cuBLAS']:.2%})")
else:
    beyond = pd.DataFrame()
    print("int8 x int8 and fp8 tensor-core products need a GPU; the kernels are tested in the interpreter (tests/test_actquant.py)")

# %% [markdown]
# **Where they pay.** At 1-16 rows these are GEMM kernels meeting a GEMV's workload: the product is
# limited by the weight bytes, which are the same as weight-only INT8's, and none of them beats the
# lab's INT8 layer of section 3 there (28.6 us at one row, 30.8 us at 16): FP8 takes 44.5 and 39.1 us
# (0.99x and 0.86x bf16), the fused W8A8 49.8 and 50.3 us (1.11x). A product of M rows does about M
# FLOP per byte of bf16 weight, so once M passes the ridge point of notebook 00 (167 FLOP per byte on
# this GPU, the corner of section 4's roofline chart) it is compute-bound, and a format that doubles
# the tensor cores' rate could approach 2x. Measured, FP8 takes 0.61x bf16's time at 1024 rows and
# 0.62x at 4096 (about 1.6x faster), the fused W8A8 0.91x and 0.80x; at 256 rows, near the ridge,
# the fused W8A8 is still 1.60x slower than bf16. The first W8A8 version, which quantizes x in
# PyTorch ops and writes the int32 result out to rescale it in separate passes, is 2.6-3.0x slower
# than bf16 from 256 rows on; the fused version keeps the product on chip. The price is accuracy, in
# the "rel err" column: 1.23% for W8A8 and 3.74% for FP8 against bf16's 0.17%, the activations'
# rounding adding to the weights'. Real activations have outlier channels that per-token scales
# handle worse than these Gaussian inputs (`tests/test_actquant.py` shows the effect), which is what
# SmoothQuant and FP8 training recipes address.

# %% [markdown]
# ## 7. Results

# %%
headline = per_layer[per_layer.layer == HEADLINE].set_index("kernel").us
metrics = {
    "layer_us": {k.replace("lab ", "").replace("bitsandbytes ", "bnb_").replace("cuBLAS ", ""): v for k, v in headline.items()},
    "engine_tok_s": dict(zip(e2e.format, e2e["tok/s"])),
    "engine_roofline_tok_s": dict(zip(e2e.format, e2e["roofline tok/s"])),
    "ppl": ppl, "ppl_tokens": min(max_tokens, n_text), "ppl_text_tokens": n_text,
    "ppl_model": quality_model or "embedded SmolLM2-135M-Instruct (Q4_1)",
    "ppl_text": text_name, "copy_gbps": copy_gbps, "ceilings_source": ceil["source"], "shape_twin": arch,
    "per_layer": per_layer.to_dict(orient="records"),
    "unfused_dequantize": unfused.to_dict(orient="records"),
    "engines": e2e.to_dict(orient="records"),
    "beyond_weight_only": beyond.to_dict(orient="records") if len(beyond) else None,
}
path = save_results("04_quantization", metrics, dtype=DT,
                    note="engine tok/s on a random-weight shape twin; ppl on real weights (ppl_model)")
print(f"results: {path.parent.name}/{path.name}")
