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
# - shows with a slider at which batch size decoding stops being memory-bound.
#
# The predicted numbers here are the targets of every later notebook.

# %%
import pandas as pd
import torch

from labutils import configs, hardware, roofline
from labutils.bench import env_record
from labutils.notebook import setup, slider
from labutils.results import save_results
from labutils.runtime import pick

device = setup()

# %% [markdown]
# ## 1. Ceiling one: memory bandwidth
#
# The simplest memory-bound kernel is a copy: it reads N bytes and writes N bytes and does no
# arithmetic. We copy a buffer far larger than the L2 cache (2 GiB on the GPU; 64 MiB in a CPU smoke
# run) and count **bytes read + bytes written** per second. Prediction: a little below the data
# sheet, since no real kernel saturates HBM completely.

# %%
spec = hardware.spec_sheet()
copy = hardware.copy_bandwidth_gbps()
copy_gbps = copy["gbps"]
print(f"copy of {copy['nbytes'] / 2**20:,.0f} MiB: {copy['ms']:.3f} ms  ->  {copy_gbps:,.0f} GB/s "
      f"(p20-p80 {copy['gbps_p20_p80'][0]:,.0f}-{copy['gbps_p20_p80'][1]:,.0f})")
if spec:
    print(f"data sheet: {spec[0]:,} GB/s  ->  measured / sheet = {copy_gbps / spec[0]:.0%}")

# %% [markdown]
# ## 2. Ceiling two: matmul rate
#
# A square matmul of size n does 2n³ FLOPs on 3n² values: its intensity grows with n, so large
# ones are compute-bound and show the tensor cores' real peak. We try a few sizes in bf16 and keep
# the best.

# %%
matmul_bf16_tflops, rows = hardware.matmul_peak_tflops(torch.bfloat16)
mm = pd.DataFrame(rows)
print(mm.to_string(index=False, float_format=lambda x: f"{x:,.3f}"))
print(f"\npeak bf16 matmul: {matmul_bf16_tflops:,.1f} TFLOP/s")
if spec:
    print(f"data sheet: {spec[1]:,} TFLOP/s dense  ->  measured / sheet = {matmul_bf16_tflops / spec[1]:.0%}")

ridge = roofline.ridge_point(matmul_bf16_tflops, copy_gbps)
print(f"ridge point: {ridge:,.0f} FLOP per byte -- work below this intensity is memory-bound")

# %% [markdown]
# ## 3. How intense is LLM inference?
#
# For a decoder with N weights in its matmuls, each token costs about **2N FLOPs** (a multiply and
# an add per weight). What differs between the two phases is how many tokens share one read of the
# weights:
#
# - **prefill** processes the T prompt tokens together: 2NT FLOPs for ~2N bytes (bf16), intensity
#   ≈ T. A prompt of a few hundred tokens is already compute-bound.
# - **decode** produces one token per sequence per step: at batch 1, 2N FLOPs for 2N bytes,
#   intensity ≈ **1 FLOP/byte**, hundreds of times below the ridge. Decode speed is set by
#   bandwidth alone: tokens/s ≤ W / (weight bytes).
#
# The table applies this to every architecture in `labutils.configs` (their published shapes; the
# attention terms and KV-cache reads are included, see `labutils/roofline.py`).

# %%
BYTES = 2  # bf16
table = []
for name, cfg in configs.ARCHITECTURES.items():
    dec = roofline.decode_step(cfg, batch=1, context=1024, dtype_bytes=BYTES)
    pre = roofline.prefill(cfg, seq_len=2048, dtype_bytes=BYTES)
    table.append({
        "model": name,
        "params (B)": configs.param_count(cfg) / 1e9,
        "weights (GB, bf16)": roofline.linear_params(cfg) * BYTES / 1e9,
        "decode intensity (b=1, ctx 1k)": dec["intensity"],
        "prefill intensity (T=2k)": pre["intensity"],
        "decode bound (tok/s, b=1)": roofline.decode_tok_s_bound(cfg, matmul_bf16_tflops, copy_gbps, 1, 1024, BYTES),
    })
intensity = pd.DataFrame(table)
print(intensity.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %% [markdown]
# On this device, the last column is the fastest any batch-1 decoder can go for each model: the
# time to read every weight once. Notebook 02 builds a decode loop that comes within 15% of it.
#
# ## 4. The roofline, with the models on it
#
# Each point sits on the roof at its intensity: that is the best it can do. Decode points pile up
# at the far left, on the bandwidth slope; prefill points sit on the flat compute roof.

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
fig = roofline.chart(matmul_bf16_tflops, copy_gbps, pd.DataFrame(points),
                     title=f"Roofline of {env_record()['device']} (measured ceilings, bf16)")
fig.show()

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
# A single Llama-2-7B sequence at its 4k context already holds 2 GiB of cache (exactly: 2 · 32 · 32
# · 128 · 2 B · 4096); at batch 64 the cache outweighs the model several times over. That is why
# serving systems (notebook 06) manage it in pages.
#
# ## 6. When does decode stop being memory-bound?
#
# Batching B sequences shares one read of the weights among B tokens, so decode intensity grows
# about linearly with B, until the KV-cache reads (which are per sequence and do not shrink) and
# the compute roof take over. The function below computes, for one model, the roofline bound on
# tokens/s as B grows; the slider runs the same function.

# %%
def decode_vs_batch(batch: int = 1, context: int = 1024, model: str = "Qwen2.5-7B"):
    cfg = configs.ARCHITECTURES[model]
    rows = []
    for b in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, batch}):
        step = roofline.decode_step(cfg, b, context, BYTES)
        t_mem = step["bytes"] / (copy_gbps * 1e9)
        t_cmp = step["flops"] / (matmul_bf16_tflops * 1e12)
        rows.append({"batch": b, "intensity": step["intensity"], "bound": "memory" if t_mem > t_cmp else "compute",
                     "tok/s bound": b / max(t_mem, t_cmp), "ms/step": 1e3 * max(t_mem, t_cmp)})
    df = pd.DataFrame(rows)
    here = df[df.batch == batch].iloc[0]
    print(f"{model}, context {context}, batch {batch}: intensity {here.intensity:,.1f} FLOP/B "
          f"(ridge {ridge:,.0f}) -> {here.bound}-bound, at most {here['tok/s bound']:,.0f} tok/s in all")
    kv_gib = roofline.kv_cache_bytes(cfg, context, batch, BYTES) / 2**30
    print(f"KV cache for the batch: {kv_gib:,.1f} GiB  (weights: {configs.param_count(cfg) * BYTES / 2**30:,.1f} GiB)")
    import plotly.express as px
    fig = px.line(df, x="batch", y="tok/s bound", log_x=True, log_y=True, markers=True, color_discrete_sequence=["black"],
                  title=f"Decode roofline bound, {model} (bf16), context {context}")
    fig.add_vline(x=batch, line_dash="dot")
    fig.show()
    return df


df_batch = decode_vs_batch(1, 1024)
print(df_batch.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))

# %%
slider(decode_vs_batch, batch=(1, 1024, 1, 1), context=(128, 32768, 128, 1024))

# %% [markdown]
# With a short context the knee sits near B ≈ ridge point: below it, doubling the batch nearly
# doubles throughput for free. With long contexts the KV reads grow with B too, and decode stays
# memory-bound at any batch: then only a smaller cache (GQA, quantized KV, notebook 04) helps.
#
# ## 7. Results

# %%
metrics = {"copy_gbps": copy_gbps, "matmul_bf16_tflops": matmul_bf16_tflops, "ridge_flop_per_byte": ridge,
           "copy_bytes": copy["nbytes"], "matmul_rows": rows,
           "decode_bound_tok_s_bs1": dict(zip(intensity["model"], intensity["decode bound (tok/s, b=1)"]))}
print(save_results("00_roofline", metrics, dtype=torch.bfloat16))
