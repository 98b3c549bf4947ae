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
# # 00 · The roofline of your GPU
#
# Every speed in this book is judged against two numbers that belong to the GPU, not to the code:
#
# 1. **memory bandwidth** W: how many bytes per second can move between HBM and the chip;
# 2. **peak matmul rate** P: how many FLOP per second the tensor cores can do.
#
# A piece of work that does F FLOPs and moves M bytes has **arithmetic intensity** I = F / M.
# It cannot run faster than min(P, W · I): below the *ridge point* I* = P / W it is
# **memory-bound**, above it **compute-bound**. This notebook
#
# - measures W and P on this device and compares them with the data sheet;
# - computes the arithmetic intensity of LLM **prefill** and **decode** for the models the book uses
#   (their real shapes, from a table in `labutils.configs`) and places them on the roofline;
# - derives the size of the **KV cache** from first principles;
# - finds, per context length, the batch size at which decoding stops being memory-bound.
#
# You write three functions on the way (the roof itself, the intensity of a matmul, the knee of
# decode), each checked by the cell after it, and predict one measurement before you see it.
# The bounds computed here are the targets of every later notebook. Without a GPU the notebook
# runs too: the measurements are then the CPU's, and the roofline, tables and sliders use a GPU's
# data sheet instead (pick one with the slider of section 6).

# %%
import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from labutils import configs, hardware, roofline
from labutils.bench import env_record
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.notebook import setup, slider
from labutils.results import save_results
from labutils.runtime import has_cuda

device = setup()

# %% [markdown]
# ## The picture
#
# On log-log axes the bound min(P, W · I) is a roof: a slope of bandwidth, then a flat ceiling of
# compute, meeting at the ridge. A kernel is a point at its intensity; the roof above it is the
# fastest it can go. The sketch uses round illustrative ceilings (P = 1000 TFLOP/s, W = 3300 GB/s,
# ridge ≈ 303) and made-up kernel points; this device's own ceilings are measured in sections 1
# and 2, and the models' real points are placed in section 4. Raising a kernel's intensity
# (batching, fusing, fewer bytes per value) moves it right, along the slope, until it reaches the
# flat part.

# %%
def roofline_diagram(peak: float = 1000.0, bw: float = 3300.0):
    """The roofline of a GPU with ``peak`` TFLOP/s and ``bw`` GB/s, three kernels under it, the two
    regions. Only traces and shapes (both in data units on log axes), no annotations: on a log axis
    an annotation's x is read as log10(x)."""
    ridge = roofline.ridge_point(peak, bw)
    lo, hi = 0.1, 1e4
    fig = go.Figure()
    y0, y1 = 0.1, peak * 3
    fig.add_shape(type="rect", x0=lo, x1=ridge, y0=y0, y1=y1, fillcolor="#cfe2f3", opacity=0.5, line_width=0)
    fig.add_shape(type="rect", x0=ridge, x1=hi, y0=y0, y1=y1, fillcolor="#fce5cd", opacity=0.5, line_width=0)
    fig.add_shape(type="line", x0=ridge, x1=ridge, y0=y0, y1=peak, line=dict(dash="dot", color="#555"))
    fig.add_trace(go.Scatter(x=[lo, ridge, hi], y=[bw * lo / 1e3, peak, peak], mode="lines", name="roof: min(P, W · I)",
                             line=dict(color="black", width=3)))
    for I, tflops, text in [(1.0, 0.5, "decode, batch 1 (I ≈ 1)"), (60.0, 40.0, "decode, batch 64"),
                            (2000.0, 350.0, "prefill, 2k tokens")]:
        fig.add_trace(go.Scatter(x=[I, I], y=[tflops, roofline.attainable_tflops(I, peak, bw)], mode="lines",
                                 line=dict(dash="dash", color="#c0392b", width=1), showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=[I], y=[tflops], mode="markers+text", text=[text], textposition="bottom center",
                                 marker=dict(size=11, color="#c0392b"), showlegend=False))
    labels = [(1.5, 0.2, "memory-bound: time = bytes / W"), (1800, 0.2, "compute-bound: time = FLOPs / P"),
              (2500, peak * 1.6, "flat roof: peak P"), (ridge / 2, peak * 1.6, f"ridge I* = P / W ≈ {ridge:.0f}"),
              (4.0, bw * 4.0 / 1e3 * 2.2, "slope: bandwidth W")]
    fig.add_trace(go.Scatter(x=[x for x, _, _ in labels], y=[y for _, y, _ in labels], mode="text",
                             text=[t for _, _, t in labels], showlegend=False, hoverinfo="skip"))
    fig.update_xaxes(type="log", range=[-1, 4], title="arithmetic intensity I (FLOP / byte)")
    fig.update_yaxes(type="log", range=[-1, float(np.log10(y1))], title="attainable TFLOP/s")
    fig.update_layout(title=f"The roofline (P = {peak:.0f} TFLOP/s, W = {bw:.0f} GB/s): a kernel (red) rises at most "
                            "to the roof above it", height=440, width=780, plot_bgcolor="white", showlegend=False)
    return fig


show(roofline_diagram())

# %% [markdown]
# **Exercise 1: the roof.** Write the bound itself: given a kernel's intensity (FLOP per byte), the
# peak matmul rate (TFLOP/s) and the bandwidth (GB/s), return the attainable TFLOP/s. Mind the
# units: GB/s × FLOP/B is GFLOP/s. The rest of the notebook computes its bounds with your function.

# %%
def roofline_bound(intensity: float, peak_tflops: float, bw_gbps: float) -> float:
    """Attainable TFLOP/s of a kernel of this intensity under the two ceilings."""
    ### BEGIN SOLUTION
    return min(peak_tflops, bw_gbps * intensity / 1e3)  # GB/s * FLOP/B = GFLOP/s; / 1e3 -> TFLOP/s
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("roofline_bound", roofline_bound);

# %% [markdown]
# ## 1. Ceiling one: memory bandwidth
#
# The simplest memory-bound kernel is a copy: it reads N bytes and writes N bytes and does no
# arithmetic. We copy a buffer far larger than the L2 cache (2 GiB on the GPU; 64 MiB in a CPU smoke
# run) and count **bytes read + bytes written** per second.
#
# **Predict first.** What will the copy reach, in GB/s? The data sheet's number is printed below
# (no real kernel saturates HBM completely); without a GPU, guess your machine's DRAM.

# %%
spec = hardware.spec_sheet()
print(f"data sheet of this device: {spec[0]:,} GB/s, {spec[1]:,} TFLOP/s bf16 dense" if spec
      else "no data sheet for this device (a CPU: a desktop's DRAM moves tens of GB/s)")
my_copy_gbps = None  # your prediction, GB/s

# %%
copy = hardware.copy_bandwidth_gbps()
copy_gbps = copy["gbps"]
print(f"copy of {copy['nbytes'] / 2**20:,.0f} MiB: {copy['ms']:.3f} ms  ->  {copy_gbps:,.0f} GB/s "
      f"(p20-p80 {copy['gbps_p20_p80'][0]:,.0f}-{copy['gbps_p20_p80'][1]:,.0f})")
if spec:
    print(f"data sheet: {spec[0]:,} GB/s  ->  measured / sheet = {copy_gbps / spec[0]:.0%}")
predict("copy bandwidth", my_copy_gbps, copy_gbps, "GB/s");

# %% [markdown]
# ## 2. Ceiling two: matmul rate
#
# A matmul of x (B × d_in) by W (d_in × d_out) does 2·B·d_in·d_out FLOPs (a multiply and an add
# per weight per row) and, at best, reads x and W once and writes y once.
#
# **Exercise 2: the intensity of a matmul.** Write it, with each element `dtype_bytes` long. At
# B = 1 (one token) it is about 1 FLOP/byte in bf16, whatever the layer's size; it grows about
# linearly with B while the weights dominate the bytes.

# %%
def matmul_intensity(B: int, d_in: int, d_out: int, dtype_bytes: int = 2) -> float:
    """FLOP per byte of (B, d_in) @ (d_in, d_out), each operand read once and the result written once."""
    ### BEGIN SOLUTION
    flops = 2 * B * d_in * d_out
    nbytes = (B * d_in + d_in * d_out + B * d_out) * dtype_bytes  # read x, read W, write y
    return flops / nbytes
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("matmul_intensity", matmul_intensity);

# %% [markdown]
# A square matmul of size n has intensity 2n³ / (3n² · 2 bytes) = n / 3 in bf16, so large ones are
# compute-bound and show the tensor cores' real peak. We time a few sizes in bf16, keep the best,
# and print each size's intensity from your function.

# %%
matmul_bf16_tflops, rows = hardware.matmul_peak_tflops(torch.bfloat16)
mm = pd.DataFrame(rows)
mm["intensity (FLOP/B)"] = [matmul_intensity(n, n, n, 2) for n in mm["n"]]
print(mm.to_string(index=False, float_format=lambda x: f"{x:,.3f}"))
print(f"\npeak bf16 matmul: {matmul_bf16_tflops:,.1f} TFLOP/s")
if spec:
    print(f"data sheet: {spec[1]:,} TFLOP/s dense  ->  measured / sheet = {matmul_bf16_tflops / spec[1]:.0%}")
ridge_measured = roofline.ridge_point(matmul_bf16_tflops, copy_gbps)
print(f"ridge point of the measured ceilings: {ridge_measured:,.0f} FLOP per byte")

# %% [markdown]
# **The ceilings used below.** On a GPU, the two measured numbers. On this H200 the copy reached
# 4,273 GB/s (89% of the sheet's 4,800) and the best matmul 686.7 TFLOP/s at n = 16384 (69% of
# the sheet's 989; the medians of the three sizes lie within 1%, 679-687), a measured ridge of 161
# FLOP/B, about half the sketch's 303. The p20-p80 range of n = 4096 is wide (441-719 TFLOP/s): a
# call takes 0.2 ms, and a few slow calls among the timed ones pull its 20th percentile down; the
# notebook uses the medians. On a CPU they describe a machine no one serves LLMs on (its "matmul peak" is a few
# small matmuls through one library call), so the roofline, the tables and the slider use a GPU's
# data sheet instead: an H200 by default, any GPU of `labutils.hardware.SPECS` through the slider
# of section 6.

# %%
GPUS = (["this device (measured)"] if has_cuda() else []) + list(hardware.SPECS)


def ceilings_of(gpu: str) -> tuple[float, float]:
    """(bandwidth GB/s, bf16 TFLOP/s) of a choice in GPUS: this device's measurements or a data sheet."""
    return (copy_gbps, matmul_bf16_tflops) if gpu == "this device (measured)" else hardware.SPECS[gpu]


roof_gpu = GPUS[0] if has_cuda() else "H200"
bw, peak = ceilings_of(roof_gpu)
roof_name = f"{env_record()['device']} (measured)" if has_cuda() else f"{roof_gpu} (data sheet; this machine has no GPU)"
ridge = roofline.ridge_point(peak, bw)
print(f"ceilings used below: {roof_name}: {bw:,.0f} GB/s, {peak:,.1f} TFLOP/s -> ridge {ridge:,.0f} FLOP/B; "
      f"work below this intensity is memory-bound")

# %% [markdown]
# ## 3. How intense is LLM inference?
#
# For a decoder with N weights in its matmuls, each token costs about **2N FLOPs** (a multiply and
# an add per weight). What differs between the two phases is how many tokens share one read of the
# weights:
#
# - **prefill** processes the T prompt tokens together: 2NT FLOPs for ~2N bytes (bf16), intensity
#   ≈ T. A prompt of a couple of hundred tokens is already past the ridge (161 FLOP/B here) and
#   compute-bound; at T = 2k the table below prints 1,971-2,201 FLOP/B.
# - **decode** produces one token per sequence per step: at batch 1, 2N FLOPs for 2N bytes,
#   intensity ≈ **1 FLOP/byte** (your `matmul_intensity` at B = 1; 1.00-1.16 in the table), about
#   140-160 times below the ridge of 161. Decode speed is set by bandwidth alone:
#   tokens/s ≤ W / (weight bytes).
#
# The table applies this to every architecture in `labutils.configs` (their published shapes; the
# attention terms and KV-cache reads are included, see `labutils/roofline.py`). The decode bound
# is your `roofline_bound` at the step's intensity, turned into steps per second.

# %%
BYTES = 2  # bf16
table = []
for name, cfg in configs.ARCHITECTURES.items():
    dec = roofline.decode_step(cfg, batch=1, context=1024, dtype_bytes=BYTES)
    pre = roofline.prefill(cfg, seq_len=2048, dtype_bytes=BYTES)
    tok_s = roofline_bound(dec["intensity"], peak, bw) * 1e12 / dec["flops"]  # steps per second, one token each
    table.append({
        "model": name,
        "params (B)": configs.param_count(cfg) / 1e9,
        "weights (GB, bf16)": roofline.linear_params(cfg) * BYTES / 1e9,
        "decode intensity (b=1, ctx 1k)": dec["intensity"],
        "prefill intensity (T=2k)": pre["intensity"],
        "decode bound (tok/s, b=1)": tok_s,
    })
intensity = pd.DataFrame(table)
print(f"ceilings: {roof_name}")
print(intensity.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %% [markdown]
# The last column is the fastest any batch-1 decoder can go for each model on these ceilings: the
# time to read every weight (and the KV cache) once. On this H200 that is about 280-310 tok/s for
# the 7-8B models (13-15 GB of weights), about 31 tok/s for the 70B ones and 14,607 tok/s for
# SmolLM2-135M. Notebook 02 builds a decode loop and measures how close it comes.
#
# ## 4. The roofline, with the models on it
#
# Each point sits on the roof at its intensity: that is the best it can do. Batch-1 decode points
# pile up at the far left (I ≈ 1.0-1.2); batch 64 moves them to 12-52 FLOP/B (SmolLM2-135M lowest,
# Qwen2.5-7B highest), still on the bandwidth slope below the ridge of 161; prefill points
# (≈ 2,100 FLOP/B) sit on the flat compute roof.

# %%
points = []
for name in configs.TWINS:
    cfg = configs.ARCHITECTURES[name]
    points.append({"label": name, "group": "decode, batch 1",
                   "intensity": roofline.decode_step(cfg, 1, 1024, BYTES)["intensity"]})
    points.append({"label": name, "group": "decode, batch 64",
                   "intensity": roofline.decode_step(cfg, 64, 1024, BYTES)["intensity"]})
    points.append({"label": name, "group": "prefill, 2k tokens",
                   "intensity": roofline.prefill(cfg, 2048, BYTES)["intensity"]})
points = pd.DataFrame(points)
# at batch 1 and in prefill the five models share one intensity: one label per group keeps it legible
first = ~points.duplicated("group")
crowded = points["group"] != "decode, batch 64"
points.loc[crowded, "label"] = [f"all {len(configs.TWINS)} models" if f else "" for f in first[crowded]]
points["tflops"] = [roofline_bound(i, peak, bw) for i in points["intensity"]]
show(roofline.chart(peak, bw, points, title=f"Roofline of {roof_name}, bf16"))

# %% [markdown]
# ## 5. The KV cache, from first principles
#
# To avoid recomputing the past at every step (notebook 02), a decoder keeps each layer's keys and
# values for every token it has seen. Per token that is
#
# $$\text{bytes/token} = 2\,(K\text{ and }V) \times n_\text{layer} \times n_\text{kv\_head} \times d_\text{head} \times \text{bytes per value}$$
#
# Grouped-query attention (n_kv_head < n_head) shrinks it by n_head / n_kv_head: compare Llama-2-7B
# (32 KV heads) with Llama-3-8B (8).

# %%
kv = []
for name, cfg in configs.ARCHITECTURES.items():
    ctx = cfg["max_position_embeddings"]
    per_token = roofline.kv_bytes_per_token(cfg, BYTES)
    kv.append({"model": name, "n_layer": cfg["num_hidden_layers"],
               "n_head / n_kv_head": f"{cfg['num_attention_heads']} / {cfg['num_key_value_heads']}",
               "head_dim": cfg["head_dim"], "KiB per token": per_token / 2**10, "context": ctx,
               "GiB per sequence at full context": roofline.kv_cache_bytes(cfg, ctx, 1, BYTES) / 2**30,
               "vs weights": roofline.kv_cache_bytes(cfg, ctx, 1, BYTES) / (configs.param_count(cfg) * BYTES)})
kv = pd.DataFrame(kv)
print(kv.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %% [markdown]
# A single Llama-2-7B sequence at its 4k context already holds 2 GiB of cache (exactly: 2 · 32 ·
# 32 · 128 · 2 B · 4096), 0.16 of its weights; at batch 64 that is 128 GiB, about ten times the
# weights. Grouped-query attention cuts Llama-3-8B to 128 KiB per token, a quarter of Llama-2-7B's
# 512. That is why serving systems (notebook 06) manage it in pages.
#
# ## 6. When does decode stop being memory-bound?
#
# Batching B sequences shares one read of the weights among B tokens, so decode intensity grows
# about linearly with B. The KV-cache reads do not: each sequence reads its own cache, and the
# attention over it does 4 · n_head · d_head FLOPs per cached token per layer for 2 · 2 ·
# n_kv_head · d_head bytes, an intensity of only n_head / n_kv_head FLOP/byte in bf16, whatever
# the batch.
#
# **Exercise 3: the knee.** Write the smallest batch at which a decode step of `model` (a name in
# `labutils.configs.ARCHITECTURES`) with `context` cached tokens per sequence is compute-bound
# (compute time ≥ memory time, with `roofline.decode_step`'s FLOPs and bytes), or None if no batch
# up to `max_batch` is.

# %%
def decode_knee(model: str, context: int, peak_tflops: float, bw_gbps: float, dtype_bytes: int = 2,
                max_batch: int = 4096):
    """Smallest batch in 1..max_batch at which decode is compute-bound, else None."""
    ### BEGIN SOLUTION
    cfg = configs.ARCHITECTURES[model]
    for b in range(1, max_batch + 1):
        step = roofline.decode_step(cfg, b, context, dtype_bytes)
        if step["flops"] / (peak_tflops * 1e12) >= step["bytes"] / (bw_gbps * 1e9):
            return b
    return None
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("decode_knee", decode_knee);

# %% [markdown]
# Your function, per model and context, on the ceilings chosen above. The last column is the
# longest context at which *some* batch (however large) turns decode compute-bound: as B grows, the
# step's intensity tends to 2N / (context · KV bytes per token) + n_head / n_kv_head, and once that
# is below the ridge no batch size helps.

# %%
CONTEXTS = [0, 128, 256, 512, 1024, 4096, 32768]
knees = []
for name in ["Qwen2.5-7B", "Llama-3-8B", "Mistral-7B", "Llama-2-7B"]:
    cfg = configs.ARCHITECTURES[name]
    row = {"model": name, "n_head / n_kv_head": cfg["num_attention_heads"] / cfg["num_key_value_heads"]}
    for ctx in CONTEXTS:
        k = decode_knee(name, ctx, peak, bw, BYTES)
        row[f"ctx {ctx}"] = "none" if k is None else str(k)
    attn_intensity = cfg["num_attention_heads"] / cfg["num_key_value_heads"] * 2 / BYTES
    weights_flops = 2 * roofline.linear_params(cfg)
    row["longest ctx with a knee"] = (f"{weights_flops / (ridge - attn_intensity) / roofline.kv_bytes_per_token(cfg, BYTES):,.0f}"
                                      if ridge > attn_intensity else "any")
    knees.append(row)
knees = pd.DataFrame(knees)
print(f"batch at which decode turns compute-bound ('none': not up to 4096), {roof_name}, ridge {ridge:,.0f} FLOP/B")
print(knees.to_string(index=False))
qwen_1k = decode_knee("Qwen2.5-7B", 1024, peak, bw, BYTES)
print(f"\nQwen2.5-7B at context 1024: " + (f"compute-bound from batch {qwen_1k} on"
                                            if qwen_1k else "memory-bound at every batch up to 4096"))

# %% [markdown]
# With no context the knee is at B = 161 for all four models, at the ridge of 161 FLOP/B
# (decode intensity ≈ B). Every cached token moves it right (Qwen2.5-7B: 161, 175, 192, 237, 445
# from context 0 to 1024), and past the context of the last column it is gone: decode stays
# memory-bound at any batch, and only a smaller cache per token helps (fewer KV heads per query
# head, fewer bytes per cached value). The ranking follows the cache per token: Qwen2.5-7B (7
# query heads per KV head, 56 KiB per token) keeps a knee up to about 1,600 tokens, Llama-3-8B and
# Mistral-7B (4 per KV head, 128 KiB) up to about 730 and 690, Llama-2-7B (no sharing, 512 KiB)
# only up to about 160: at context 256 it has none. The function below computes the bound on
# tokens/s as B grows for one model; the slider runs the same function, on this device or on any
# GPU's data sheet. For Qwen2.5-7B at context 1024 the table shows decode memory-bound up to batch
# 256 and compute-bound from 512 (the knee is 445), where the bound flattens at about 47,000
# tok/s, 157 times the 301 tok/s of batch 1.

# %%
def decode_vs_batch(batch: int = 1, context: int = 1024, gpu: str = roof_gpu, model: str = "Qwen2.5-7B"):
    cfg = configs.ARCHITECTURES[model]
    name = gpu
    g_bw, g_peak = ceilings_of(name)
    g_ridge = roofline.ridge_point(g_peak, g_bw)
    rows = []
    for b in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, batch}):
        step = roofline.decode_step(cfg, b, context, BYTES)
        t_mem = step["bytes"] / (g_bw * 1e9)
        t_cmp = step["flops"] / (g_peak * 1e12)
        rows.append({"batch": b, "intensity": step["intensity"], "bound": "memory" if t_mem > t_cmp else "compute",
                     "tok/s bound": b / max(t_mem, t_cmp), "ms/step": 1e3 * max(t_mem, t_cmp)})
    df = pd.DataFrame(rows)
    here = df[df.batch == batch].iloc[0]
    knee = decode_knee(model, context, g_peak, g_bw, BYTES)
    print(f"{name}: {g_bw:,.0f} GB/s, {g_peak:,.0f} TFLOP/s, ridge {g_ridge:,.0f} FLOP/B")
    print(f"{model}, context {context}, batch {batch}: intensity {here.intensity:,.1f} FLOP/B "
          f"-> {here.bound}-bound, at most {here['tok/s bound']:,.0f} tok/s in all; "
          + (f"compute-bound from batch {knee}" if knee else "memory-bound at every batch up to 4096"))
    kv_gib = roofline.kv_cache_bytes(cfg, context, batch, BYTES) / 2**30
    print(f"KV cache for the batch: {kv_gib:,.1f} GiB  (weights: {configs.param_count(cfg) * BYTES / 2**30:,.1f} GiB)")
    fig = px.line(df, x="batch", y="tok/s bound", log_x=True, log_y=True, markers=True, color_discrete_sequence=["black"],
                  title=f"Decode roofline bound, {model} (bf16), context {context}, {name}", height=380)
    fig.add_vline(x=batch, line_dash="dot")  # a shape: data units on a log axis
    show(fig)
    return df


df_batch = decode_vs_batch(1, 1024)
print(df_batch.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))

# %%
def decode_vs_batch_on(batch: int = 1, context: int = 1024, gpu: str = roof_gpu):
    decode_vs_batch(batch, context, gpu)  # the table stays out of the slider's output


slider(decode_vs_batch_on, batch=(1, 1024, 1, 1), context=(0, 32768, 128, 1024), gpu=GPUS)

# %% [markdown]
# ## 7. Results

# %%
metrics = {"copy_gbps": copy_gbps, "matmul_bf16_tflops": matmul_bf16_tflops, "ridge_flop_per_byte": ridge_measured,
           "copy_bytes": copy["nbytes"], "matmul_rows": rows, "bounds_from": roof_name,
           "decode_bound_tok_s_bs1": dict(zip(intensity["model"], intensity["decode bound (tok/s, b=1)"])),
           "decode_knee_batch": {r["model"]: {str(c): r[f"ctx {c}"] for c in CONTEXTS} for r in knees.to_dict("records")}}
path = save_results("00_roofline", metrics, dtype=torch.bfloat16)
print(f"wrote {path.parent.name}/{path.name}")  # relative: the same on every machine
