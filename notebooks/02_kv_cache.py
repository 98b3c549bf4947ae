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
# # 02 · The KV cache, and a decode loop at the memory-bandwidth limit
#
# Notebook 01 generated text by re-running the whole sequence for every new token. But the keys
# and values of past tokens never change: a **KV cache** stores them, so each step computes q, k, v
# for one new token and attends over the stored past. This notebook
#
# 1. builds two KV caches (a growing one and a preallocated **static** one), has you write the
#    static cache's write, and plugs the caches into the lab decoder through its cache seam,
#    checking that the text does not change;
# 2. has you derive the cache's size, and checks the formula against the allocator;
# 3. measures what the cache saves as sequences grow;
# 4. has you derive the speed limit of decoding: at batch 1 a step must read every weight once, so
#    tokens/s ≤ bandwidth / bytes. Then it builds a **decode engine** that approaches that limit,
#    one overhead at a time, on a Qwen2.5-7B **shape twin** (its exact architecture with random
#    weights: right for speed, meaningless for text), starting from Hugging Face `generate` (in the
#    run shown, on an H200, medians: from 50 tok/s, with a wide spread between runs, to 235 tok/s,
#    78% of the limit);
# 5. sweeps the batch size towards the point where decoding stops being memory-bound.

# %%
import time
import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from labutils import configs, kv_cache, roofline
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine, hf_decode_tok_s
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.gemv import GemvLinear
from labutils.generate import decode_step_ms, encode_prompt, greedy_cached, greedy_no_cache
from labutils.hardware import ceilings
from labutils.models import load_model, shape_twin
from labutils.notebook import setup, show_source, slider
from labutils.results import REPO, save_results
from labutils.runtime import default_dtype, has_cuda, pick

device = setup()
# Inductor warns on every compile that fp32 matmuls do not use TF32; the fp32 runs here are exact
# comparisons, so TF32 stays off and the warning says nothing new.
warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")


def spread(values) -> dict:
    """Median and 20th / 80th percentiles of repeated measurements."""
    med, p20, p80 = np.percentile(np.asarray(values, dtype=float), [50, 20, 80])
    return {"median": float(med), "p20": float(p20), "p80": float(p80)}


# %% [markdown]
# ## 1. Two caches behind one seam
#
# Every attention layer calls `self.kv_cache.update(input_pos, k, v)` and attends over what it
# returns (see `Attention.forward` in notebook 01). The simplest cache concatenates:

# %%
show_source(kv_cache.ConcatKVCache)

# %% [markdown]
# It works, but every step allocates a new, longer tensor and copies the whole cache into it, and
# its shapes change every step, which rules out capturing the step once and replaying it (section
# 5). The **static cache** preallocates `max_seq_len` positions per layer and writes the new keys
# and values in place at `input_pos`. Positions not yet written hold zeros; the causal mask (a key
# is visible iff its position ≤ the query's) already hides them.

# %%
def cache_layout_diagram(B=2, n_kv_head=2, S=12, prompt=5, decoded=3):
    """One layer's static K and V tensors, (B, n_kv_head, S, head_dim): a row per (sequence, KV head),
    a cell per position (each cell a head_dim vector), and the column a decode step writes."""
    write = prompt + decoded  # input_pos of this step
    colors = {"prompt": "#9ecae1", "decoded": "#a1d99b", "write": "#fd8d3c", "free": "#ffffff"}
    fig = go.Figure()
    rows = [(b, h) for b in range(B) for h in range(n_kv_head)]
    for t, name in enumerate(("K", "V")):
        y0 = t * (len(rows) + 2.2)  # V below K
        y1 = y0 + len(rows)
        for kind, (a, b_) in {"prompt": (0, prompt), "decoded": (prompt, write), "write": (write, write + 1),
                              "free": (write + 1, S)}.items():  # one block per kind, all rows
            fig.add_shape(type="rect", x0=a, x1=b_, y0=y0, y1=y1, fillcolor=colors[kind], line_width=0, opacity=1)
        for p in range(S + 1):  # cell borders: one cell per (row, position)
            fig.add_shape(type="line", x0=p, x1=p, y0=y0, y1=y1, line_color="#555", line_width=1)
        for r in range(len(rows) + 1):
            fig.add_shape(type="line", x0=0, x1=S, y0=y0 + r, y1=y0 + r, line_color="#555", line_width=1)
        for r, (b, h) in enumerate(rows):
            fig.add_annotation(x=-0.2, y=y0 + r + 0.5, text=f"b={b}, h={h}", showarrow=False, xanchor="right", font_size=11)
        fig.add_annotation(x=-2.6, y=y0 + len(rows) / 2, text=name, showarrow=False, font_size=16)
    for p in range(S):
        fig.add_annotation(x=p + 0.5, y=-0.55, text=str(p), showarrow=False, font_size=10)
    fig.add_annotation(x=S / 2, y=-1.35, showarrow=False, font_size=12,
                       text="position = dim 2 of the cache (0 … max_seq_len − 1); each cell holds one head_dim vector")
    bottom = 2 * len(rows) + 2.2  # below V
    fig.add_annotation(x=write + 0.5, y=bottom + 0.3, showarrow=False, font_size=12, yanchor="top",
                       text=f"this decode step writes k, v at input_pos = {write} (every row)")
    legend = [("prompt (written by prefill)", "prompt"), ("earlier decode steps", "decoded"),
              ("written now", "write"), ("free: zeros, hidden by the causal mask", "free")]
    for i, (text, kind) in enumerate(legend):
        x = S + 0.8
        y = 0.3 + 1.3 * i
        fig.add_shape(type="rect", x0=x, x1=x + 0.7, y0=y, y1=y + 0.7, fillcolor=colors[kind], line_color="#555", opacity=1)
        fig.add_annotation(x=x + 0.9, y=y + 0.35, text=text, showarrow=False, xanchor="left", font_size=11)
    fig.add_annotation(x=S + 0.8, y=6.2, showarrow=False, xanchor="left", font_size=11, align="left",
                       text=f"one K and one V tensor per layer,<br>shape (B, n_kv_head, max_seq_len, head_dim)"
                            f"<br>= ({B}, {n_kv_head}, {S}, head_dim) here;<br>the query at position {write} attends "
                            f"to 0 … {write}")
    fig.update_xaxes(visible=False, range=[-3.2, S + 9])
    fig.update_yaxes(visible=False, range=[bottom + 1.4, -1.9])  # row 0 at the top
    fig.update_layout(title="A static KV cache: one layer's K and V, and where a decode step writes",
                      height=430, width=900, plot_bgcolor="white", margin=dict(l=10, r=10, t=50, b=10))
    return fig


show(cache_layout_diagram())

# %% [markdown]
# **Exercise 1.** Write the static cache's write for one of the two tensors (K and V are written the
# same way). `cache` is `(B, n_kv_head, max_seq_len, head_dim)`, `new` is `(B, n_kv_head, T,
# head_dim)` for the T new tokens and `input_pos` their T positions. Put `new[:, :, t]` at position
# `input_pos[t]` and return the part attention reads: positions 0 … max(input_pos). Work on a copy
# (`cache.clone()`), so that the check can run your function and the reference on the same inputs;
# the package writes in place, which is the point of a static cache: no allocation, and a buffer
# address that never changes.

# %%
def static_cache_write(cache, input_pos, new):
    ### BEGIN SOLUTION
    out = cache.clone()
    out[:, :, input_pos] = new  # (B, n_kv_head, T, head_dim) into dim 2 at the T positions
    return out[:, :, : int(input_pos.max()) + 1]
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
static_write_ok = check("static_cache_write", static_cache_write)

# %% [markdown]
# The package's `update` does the same write in place for K and V with `index_copy_` (and handles
# per-sequence positions `(B, T)`, which a batch of prompts of different lengths needs). It returns
# the whole buffer rather than the prefix: a slice whose length changes every step would change the
# shapes, and the step could no longer be captured once. `greedy_cached` attaches one cache per
# layer, runs the prompt once (prefill) and then one token per step.

# %%
show_source(kv_cache.StaticKVCache.update)
show_source(greedy_cached)

# %% [markdown]
# Your write works as a cache too: a class with the seam's one method, whose `update` keeps your
# result and returns it. (It copies the whole cache every step, like the concatenating one; it is
# here to be checked, in section 2.)

# %%
class MyStaticCache:
    """A static cache whose write is your static_cache_write (for K and for V)."""

    def __init__(self, batch, n_kv_head, max_seq_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_kv_head, max_seq_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.max_seq_len = max_seq_len

    def update(self, input_pos, k, v):
        k_valid, v_valid = static_cache_write(self.k, input_pos, k), static_cache_write(self.v, input_pos, v)
        self.k[:, :, : k_valid.shape[2]] = k_valid  # keep what was written
        self.v[:, :, : v_valid.shape[2]] = v_valid
        return k_valid, v_valid  # (B, n_kv_head, max(input_pos) + 1, head_dim)


# %% [markdown]
# ## 2. Check: the cache must not change a single token
#
# On the embedded model in fp32: greedy text without a cache (notebook 01's loop), with the
# concatenating cache, with the static cache (and with yours); and the logits of every cached step
# against the no-cache forward at the same position.

# %%
hf, tok = load_model()  # SmolLM2-135M-Instruct, real weights, fp32
model = Decoder.from_hf(hf)
ids = encode_prompt(tok, "Give me three tips for writing clear code.", device=device)
n_new = pick(32, 16)
ref = greedy_no_cache(model, ids, n_new)
with_concat = greedy_cached(model, ids, n_new, kv_cache.concat_caches(model))
with_static = greedy_cached(model, ids, n_new, kv_cache.static_caches(model, 1, ids.shape[1] + n_new))
print(tok.decode(with_static[0, ids.shape[1]:], skip_special_tokens=True))

# logits of each cached step vs the full forward over the same tokens
with torch.no_grad():
    full = model(ref).float()  # (1, T + n_new, vocab), no cache
    model.set_kv_caches(kv_cache.static_caches(model, 1, ref.shape[1]))
    T = ids.shape[1]
    steps = [model(ref[:, :T], torch.arange(T, device=device)).float()]
    steps += [model(ref[:, p : p + 1], torch.tensor([p], device=device)).float() for p in range(T, ref.shape[1])]
    model.set_kv_caches(None)
cached = torch.cat(steps, dim=1)
cache_rel_err = ((cached - full).abs().max() / full.abs().max()).item()
print(f"cached vs no-cache logits, max |diff| / max |ref| over {ref.shape[1]} positions: {cache_rel_err:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"greedy tokens, no cache == concat cache == static cache: {torch.equal(ref, with_concat) and torch.equal(ref, with_static)}")
print(f"cached logits match the no-cache forward (fp32, rel err <= 1e-4): {cache_rel_err <= 1e-4}")

# %%
if static_write_ok:
    c = model.cfg
    mine = [MyStaticCache(1, c.n_kv_head, ids.shape[1] + n_new, c.head_dim, model.dtype, device) for _ in range(c.n_layer)]
    print(f"greedy tokens with your static_cache_write == no cache: {torch.equal(ref, greedy_cached(model, ids, n_new, mine))}")
else:
    print("write static_cache_write above (its check passes) to decode with your own cache here")

# %% [markdown]
# ## 3. How big is the cache? Predict, then measure
#
# **Exercise 2.** Write the size in bytes of the KV cache of `batch` sequences of `context` tokens.
# The model has `n_layer` layers and `n_head` query heads of `head_dim = hidden_size // n_head`;
# with grouped-query attention (GQA) only `n_kv_head` ≤ `n_head` heads of keys and values are
# stored, each shared by `n_head / n_kv_head` query heads.

# %%
def kv_cache_size_bytes(n_layer, n_head, n_kv_head, hidden_size, context, batch, dtype_bytes):
    ### BEGIN SOLUTION
    head_dim = hidden_size // n_head
    return 2 * n_layer * n_kv_head * head_dim * context * batch * dtype_bytes  # 2: K and V
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
size_ok = check("kv_cache_size_bytes", kv_cache_size_bytes)

# %% [markdown]
# The prediction against the allocator: static caches for the Qwen2.5-7B shape, and what the CUDA
# allocator handed out for them (on a CPU smoke run, the buffers' own byte counts).

# %%
kv_arch = pick("Qwen2.5-7B", "SmolLM2-135M")
kv_ctx = pick(32768, 1024)
cfg = configs.arch(kv_arch)
kv_dtype = default_dtype()
kv_dtype_bytes = torch.finfo(kv_dtype).bits // 8
kv_bytes_predicted = roofline.kv_cache_bytes(cfg, kv_ctx, batch=1, dtype_bytes=kv_dtype_bytes)
if has_cuda():
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
caches = [kv_cache.StaticKVCache(1, cfg["num_key_value_heads"], kv_ctx, cfg["head_dim"], kv_dtype, device)
          for _ in range(cfg["num_hidden_layers"])]
if has_cuda():
    torch.cuda.synchronize()
    kv_bytes_measured = torch.cuda.memory_allocated() - before
else:
    kv_bytes_measured = sum(c.k.nbytes + c.v.nbytes for c in caches)
del caches
yours = ""
if size_ok:  # your formula, on the same configuration
    yours_bytes = kv_cache_size_bytes(cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                      cfg["hidden_size"], kv_ctx, 1, kv_dtype_bytes)
    yours = f"your formula {yours_bytes / 2**20:,.1f} MiB, "
print(f"{kv_arch}, batch 1, {kv_ctx:,} positions, {kv_dtype}: {yours}roofline.kv_cache_bytes "
      f"{kv_bytes_predicted / 2**20:,.1f} MiB, measured {kv_bytes_measured / 2**20:,.1f} MiB, "
      f"measured / predicted {kv_bytes_measured / kv_bytes_predicted:.4f}")

# %% [markdown]
# The same formula for the models people deploy, at their full context, in bf16; the last columns
# show what grouped-query attention saves (the same model with one KV head per query head) and what
# another dtype would.

# %%
rows = []
for name, ctx_len in [("Llama-2-7B", 4096), ("Llama-2-70B", 4096), ("Llama-3-8B", 131072),
                      ("Qwen2.5-7B", 32768), ("Mistral-7B", 32768)]:
    c = configs.arch(name)
    mha = dict(c, num_key_value_heads=c["num_attention_heads"])
    rows.append({"model": name + (" (Llama-3.1 context)" if ctx_len == 131072 else ""), "context": ctx_len,
                 "q / kv heads": f"{c['num_attention_heads']} / {c['num_key_value_heads']}",
                 "KiB/token": roofline.kv_bytes_per_token(c, 2) / 2**10,
                 "GiB/sequence bf16": roofline.kv_cache_bytes(c, ctx_len, 1, 2) / 2**30,
                 "GiB if MHA": roofline.kv_cache_bytes(mha, ctx_len, 1, 2) / 2**30,
                 "GiB fp32": roofline.kv_cache_bytes(c, ctx_len, 1, 4) / 2**30,
                 "GiB fp8": roofline.kv_cache_bytes(c, ctx_len, 1, 1) / 2**30,
                 "weights GiB bf16": configs.param_count(c) * 2 / 2**30})
deployed = pd.DataFrame(rows)
print(deployed.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
l3 = deployed.iloc[2]
print(f"\nOne Llama-3-8B sequence at {l3['context']:,} tokens: {l3['GiB/sequence bf16']:.0f} GiB of cache next to "
      f"{l3['weights GiB bf16']:.0f} GiB of weights; without GQA it would be {l3['GiB if MHA']:.0f} GiB.")
print(f"Llama-2-70B's {configs.arch('Llama-2-70B')['num_key_value_heads']} KV heads: "
      f"{deployed.iloc[1]['KiB/token']:.0f} KiB per token, against Llama-2-7B's {deployed.iloc[0]['KiB/token']:.0f} KiB.")

# %% [markdown]
# ## 4. What the cache saves
#
# Without a cache, the step that produces token n+1 runs all n tokens through the model; with
# one, it runs one token and reads n cached keys/values. We time single steps of both as the
# context grows, with `decode_step_ms` (also used by notebook 01; each point measured a few times:
# the table shows the median and the range), on the model whose speed this notebook is after: on a
# GPU the **Qwen2.5-7B shape twin** in bf16 (time depends on shapes, not on values; it is the model
# of sections 5 and 6), on a CPU the embedded model's shape in fp32 at small sizes.

# %%
show_source(decode_step_ms)

# %%
twin_arch = pick("Qwen2.5-7B", "SmolLM2-135M")
twin_dtype = pick(torch.bfloat16, torch.float32)
twin_dtype_bytes = torch.finfo(twin_dtype).bits // 8
twin = shape_twin(twin_arch, dtype=twin_dtype)  # random weights: speed only
tcfg = configs.arch(twin_arch)
lab = Decoder.from_hf(twin)
max_len = lab.cfg.max_seq_len
STEP_RUNS, STEP_REP_MS = pick(3, 2), pick(50, 20)


def step_costs(n: int, runs: int = STEP_RUNS) -> dict:
    """ms of the step after a context of n tokens, without and with a static KV cache: median and range
    of ``runs`` measurements [shape twin]."""
    row = {"context n": n}
    for name, cached in (("no cache", False), ("static KV cache", True)):
        ms = [decode_step_ms(lab, n, cached=cached, rep_ms=STEP_REP_MS) for _ in range(runs)]
        row |= {name: float(np.median(ms)), f"{name} min": min(ms), f"{name} max": max(ms)}
    return row


lengths = pick([128, 1024, 4096, 8192], [16, 128])
costs = pd.DataFrame([step_costs(n) for n in tqdm(lengths, desc="step costs")])
costs["no cache / cache"] = costs["no cache"] / costs["static KV cache"]
shown = pd.DataFrame({"context n": costs["context n"]})
for name in ("no cache", "static KV cache"):
    shown[f"{name}, ms (range)"] = [f"{m:,.2f} ({lo:,.2f}-{hi:,.2f})" for m, lo, hi
                                    in zip(costs[name], costs[f"{name} min"], costs[f"{name} max"])]
shown["no cache / cache"] = costs["no cache / cache"].map(lambda x: f"{x:.2f}")
print(f"{twin_arch} shape twin, {str(twin_dtype)[6:]}, eager decoder, ms per step, median of {STEP_RUNS} (min-max):")
print(shown.to_string(index=False))

fig = go.Figure()
for name in ("no cache", "static KV cache"):
    fig.add_trace(go.Scatter(x=costs["context n"], y=costs[name], mode="lines+markers", name=name,
                             error_y=dict(type="data", array=costs[f"{name} max"] - costs[name],
                                          arrayminus=costs[name] - costs[f"{name} min"])))
fig.update_xaxes(type="log", title="context n (tokens)")
fig.update_yaxes(type="log", title="ms per new token")
fig.update_layout(title=f"One decode step after n tokens, {twin_arch} shape twin ({str(twin_dtype)[6:]})", height=380)
show(fig)

# %% [markdown]
# Generating n tokens costs n(n+1)/2 token passes without a cache and n with one: O(n²) against
# O(n) in the linear layers. Attention over the cache still grows with n, but it reads only the
# cache's bytes per step, small next to the weights: 470 MB at n = 8,192, 3.3% of the 14.14 GB of
# weights a step reads (printed below), and 1.75 GiB, about 13%, at the model's full 32,768
# (section 3's table). With the cache, a step of this eager loop shows no trend with the context:
# its medians lie between 19.25 and 20.11 ms from 128 to 8,192 tokens (the small differences, and
# the wide range at 128 tokens, 19.0-25.8 ms, are run-to-run noise), about six times the 3.31 ms
# that one step's memory traffic takes (section 5). It is bound by launching small kernels from
# Python (counted in section 5), not by the weights or the cache. Without the cache the step grows
# with n once the n-token forward's FLOPs outweigh that fixed launch cost (medians; the table gives
# the ranges, all narrow): 15.4 ms at 128 tokens, 28.7 ms at 1,024, 110 ms at 4,096 and 227 ms at
# 8,192 (about ∝ n between the last two, 11.8x the cached step), and a generation pays that
# growing price at every step. Where both are launch-bound (short contexts), the uncached step can
# even be the cheaper one, as it measured at 128 tokens (15.4 against 20.1 ms) and at 512 (the
# slider's line, a single measurement: 16.5 against 19.5 ms): the cached step launches more
# kernels per layer (the two cache writes, and the causal mask over the cache that its attention
# needs), and a few more launches in each of 28 layers, at roughly 17 us each (section 5), add up
# to milliseconds. Eager timings of a launch-bound GPU also move with the CPU's load (the ranges
# above); section 5's captured steps do not.

# %%
kv_tok = roofline.kv_bytes_per_token(tcfg, twin_dtype_bytes)
weights_read = roofline.decode_step(tcfg, 1, 0, twin_dtype_bytes)["bytes"]
n_max = int(costs["context n"].max())
cached_ms = costs["static KV cache"]
slower = costs[costs["no cache"] > costs["static KV cache"]]["context n"]
a, b = costs.iloc[-2], costs.iloc[-1]
slope = np.log(b["no cache"] / a["no cache"]) / np.log(b["context n"] / a["context n"])
print(f"[shape twin] cached step: {cached_ms.min():.2f}-{cached_ms.max():.2f} ms (medians) over contexts "
      f"{int(costs['context n'].min()):,}-{n_max:,}")
print(f"the cache's read per step at n = {n_max:,}: {n_max * kv_tok / 1e6:,.0f} MB, next to {weights_read / 1e9:.2f} GB of weights "
      f"({n_max * kv_tok / weights_read:.1%})")
print("uncached step slower than the cached one from context "
      + (f"{int(slower.min()):,}" if len(slower) else "(never, in this range)")
      + f"; at {n_max:,} tokens {b['no cache / cache']:.1f}x the cached step")
print(f"uncached step time ~ n^{slope:.2f} between {int(a['context n']):,} and {int(b['context n']):,} tokens "
      f"(1: the n-token forward's work dominates; 0: a fixed cost does)")


# %%
def compare_at(seq_len: int = 512):
    try:
        r = step_costs(seq_len, runs=1)
    except ValueError as e:
        print(e)
        return
    print(f"context {seq_len}: {r['no cache']:.2f} ms without a cache, {r['static KV cache']:.2f} ms with one "
          f"({r['no cache'] / r['static KV cache']:.1f}x) [shape twin]; to generate {seq_len} tokens: "
          f"{seq_len * (seq_len + 1) // 2:,} token passes without, {seq_len:,} with")


compare_at(pick(512, 64))
slider(compare_at, seq_len=(16, pick(max_len, 1024), 16, pick(512, 64)))

# %% [markdown]
# ## 5. A decode engine at the bandwidth limit
#
# At batch 1 each step reads every weight that takes part in a matmul (all layers and the lm_head;
# of the embedding table only one row) plus the KV cache of every sequence. Whatever the loop
# does, a step cannot take less than those bytes divided by the memory bandwidth W.
#
# **Exercise 3.** Write that bound: tokens per second, all sequences together, for `batch`
# sequences of `context` cached tokens each, given the bytes of the weights a step reads, the KV
# bytes per token and W in GB/s (10⁹ bytes per second).

# %%
def decode_tok_s_memory_bound(weight_bytes, kv_bytes_per_token, batch, context, bandwidth_gbps):
    ### BEGIN SOLUTION
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token  # weights once, each sequence's cache
    return batch * bandwidth_gbps * 1e9 / step_bytes  # one token per sequence per step
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
bound_ok = check("decode_tok_s_memory_bound", decode_tok_s_memory_bound)

# %% [markdown]
# W is the copy bandwidth that notebook 00 measured on this GPU (`labutils.hardware.ceilings()`
# reads it from 00's results of the same device, and measures only when there are none; 4,273 GB/s
# on the H200 of the run shown). A looser convention divides W by the whole model, embedding table
# included; both ratios are printed (for the Qwen2.5-7B twin in bf16: 14.15 GB read per step, so
# 302.1 tok/s, against 15.23 GB of model, 280.6 tok/s).

# %%
ceil = ceilings()
copy_gbps, peak_tflops = ceil["copy_gbps"], ceil["matmul_bf16_tflops"]
prompt_len, n_decode = 32, pick(64, 8)
ctx = prompt_len + n_decode
bytes_read = roofline.decode_step(tcfg, 1, ctx, twin_dtype_bytes)["bytes"]
model_bytes = configs.param_count(tcfg) * twin_dtype_bytes
roofline_tok_s_bytes_read = copy_gbps * 1e9 / bytes_read
roofline_tok_s = copy_gbps * 1e9 / model_bytes
yours = f"; your bound: {decode_tok_s_memory_bound(weights_read, kv_tok, 1, ctx, copy_gbps):,.1f}" if bound_ok else ""
print(f"ceilings from {ceil['source']}: copy {copy_gbps:,.0f} GB/s, bf16 matmul {peak_tflops:,.1f} TFLOP/s")
print(f"{twin_arch} shape twin ({twin_dtype}): bytes read per step {bytes_read / 1e9:.2f} GB, model {model_bytes / 1e9:.2f} GB")
print(f"roofline {roofline_tok_s_bytes_read:,.1f} tok/s (bytes read{yours}), "
      f"{roofline_tok_s:,.1f} tok/s (model bytes); one step's memory traffic takes {1e3 / roofline_tok_s_bytes_read:.2f} ms")
twin_ids = torch.randint(0, tcfg["vocab_size"], (1, prompt_len), device=device)

# %% [markdown]
# The engine removes what stands between a Python loop and that limit, in stages:
#
# | stage | what it removes |
# |---|---|
# | `eager` | the dynamic cache (static cache: no allocation, fixed shapes) |
# | `graph` | the kernel launches Python makes per token (counted below): the step is captured once in a CUDA graph and replayed |
# | `compile` | small kernels: Inductor fuses norms, RoPE, SwiGLU and residuals inside each decoder layer (one layer compiled and reused by all of them, so compiling costs about one layer's time) |
# | `compile + fused` | short matmuls: q/k/v and gate/up concatenated into single passes (still cuBLAS) |
# | `compile + fused + GEMV` | cuBLAS's matrix-vector kernel: a Triton one (`labutils/gemv.py`) takes its place through the linear-layer seam |
#
# Each stage decodes `n_decode` tokens several times after a warm-up (which also captures and
# compiles); the lines printed give the median and the 20th-80th percentiles. The baseline is HF
# transformers' `generate` with its default dynamic cache. (transformers can also compile its own
# forward when given a static cache; that variant spends most of its time compiling and is left out
# to keep this notebook's GPU time short.)

# %%
show_source(DecodeEngine._step)
show_source(DecodeEngine._capture)

# %% [markdown]
# **Predict first.** The eager stage already has the static cache; only Python and the kernel
# launches stand between it and the bound. What fraction of the bytes-read roofline will it reach?

# %%
my_eager_fraction = None  # your prediction, between 0 and 1

# %%
RUNS = pick(4, 2)


def decode_runs(engine, ids, n, runs=RUNS):
    """tok/s (all sequences) of ``runs`` timed decodes of n tokens after one warm-up; prefill not timed."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    out = []
    for r in range(runs + 1):
        engine.prefill(ids)
        sync()
        t0 = time.perf_counter()
        engine.decode(n)  # the first call captures the CUDA graph (and compiles): the warm-up
        sync()
        if r:
            out.append(engine.batch * n / (time.perf_counter() - t0))
    return out


speeds = {}


def record(name, runs):
    s = spread(runs)
    speeds[name] = s
    print(f"{name:<36} {s['median']:8.1f} tok/s (p20-p80 {s['p20']:,.1f}-{s['p80']:,.1f})   "
          f"{s['median'] / roofline_tok_s_bytes_read:6.1%} of bytes-read roofline   "
          f"{s['median'] / roofline_tok_s:6.1%} of model-bytes roofline   [shape twin]")


record("HF generate (dynamic cache)",
       [hf_decode_tok_s(twin, twin_ids, n=pick(32, 8), repeats=1) for _ in range(pick(3, 2))])

n_ops = None
if has_cuda():  # how many GPU operations does one eager step launch?
    from torch.profiler import ProfilerActivity, profile

    probe = DecodeEngine(lab, batch=1, max_seq_len=ctx + 8, mode="eager")
    probe.prefill(twin_ids)
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        probe.decode(1)
        torch.cuda.synchronize()
    n_ops = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"one eager decode step launches {n_ops:,} GPU operations ({n_ops / tcfg['num_hidden_layers']:.0f} per layer)")
    del probe

stages = {"eager": lambda: lab, "graph": lambda: lab, "compile": lambda: Decoder.from_hf(twin),
          "compile + fused": lambda: Decoder.from_hf(twin).fuse_projections(),
          "compile + fused + GEMV": lambda: Decoder.from_hf(twin).fuse_projections().swap_linears(
              lambda name, lin: GemvLinear(lin))}
for stage in pick(list(stages), ["eager"]):
    mode = "compile" if stage.startswith("compile") else stage
    # compiled stages: a fresh decoder whose layers are compiled in place (regional), so `lab` stays eager
    engine = DecodeEngine(stages[stage](), batch=1, max_seq_len=ctx + 8, mode=mode, regional=mode == "compile")
    record(f"lab engine: {stage}", decode_runs(engine, twin_ids, n_decode))
    del engine
    torch._dynamo.reset()
if has_cuda():
    torch.cuda.empty_cache()
engine_bs1_tok_s = max(v["median"] for k, v in speeds.items() if k.startswith("lab"))
hf_generate_bs1_tok_s = speeds["HF generate (dynamic cache)"]["median"]

# %%
eager_fraction = speeds["lab engine: eager"]["median"] / roofline_tok_s_bytes_read
prediction = predict("eager engine / bytes-read roofline", my_eager_fraction, eager_fraction)

# %%
sp = pd.DataFrame([{"method": k, "tok/s": v["median"], "p20": v["p20"], "p80": v["p80"]} for k, v in speeds.items()])
fig = go.Figure(go.Bar(x=sp["tok/s"], y=sp["method"], orientation="h", text=[f"{v:,.0f}" for v in sp["tok/s"]],
                       error_x=dict(type="data", array=sp["p80"] - sp["tok/s"], arrayminus=sp["tok/s"] - sp["p20"])))
fig.add_vline(x=roofline_tok_s_bytes_read, line_dash="dash", annotation_text="roofline (bytes read)")
fig.add_vline(x=roofline_tok_s, line_dash="dot", annotation_text="W / model bytes", annotation_position="bottom right")
fig.update_layout(title=f"Batch-1 decode, {twin_arch} shape twin ({str(twin_dtype)[6:]}), "
                        f"{torch.cuda.get_device_name() if has_cuda() else 'CPU'} (median, p20-p80)",
                  xaxis_title="tokens/s", height=360, yaxis={"categoryorder": "total ascending"})
show(fig)

# %% [markdown]
# What each stage bought, read off the bars and the lines below (H200, medians; the lab stages'
# p20-p80 spreads are under 1%, so the ratios between them are well above the noise). The eager
# loop is bound by Python and kernel launches, not by the GPU: 42.0 tok/s (13.9% of the bytes-read
# roofline), a 23.8 ms step against 3.31 ms of memory traffic (7.2x), spread over 1,430 GPU
# operations (~17 us each). HF's `generate` with its dynamic cache is in the same regime: its median,
# 50.0 tok/s (16.6%), is a little above the lab's eager loop, but its runs spread widely (p20-p80
# 31.2-51.5 tok/s), so the two are not told apart here. Replaying a CUDA graph makes the CPU's cost
# per token one launch: 148.6 tok/s, 3.54x the eager stage, 49.2% of the roofline. Compiling fuses
# the small elementwise kernels that sat between the matmuls: 196.9 tok/s, 1.32x, 65.2%. The rest
# comes from the matmuls themselves: at batch 1 each is a single pass over a weight matrix, and a
# short pass spends a noticeable share of its time ramping up and down. Concatenating q/k/v and
# gate/up makes fewer, longer cuBLAS passes (`compile + fused`): 213.3 tok/s, 1.08x, 70.6%. The
# Triton kernel is meant to stream the matrices (the lm_head above all) closer to the copy
# bandwidth than cuBLAS's matrix-vector kernel, and in their place it brings another 1.10x:
# 235.4 tok/s, 77.9% of the bytes-read roofline, 83.9% of W / model bytes. Together the two matmul
# changes give 1.20x over the compile stage, in two steps of about the same size; the whole engine
# is 5.6x its eager stage and 4.7x HF `generate`'s median.

# %%
traffic_ms = 1e3 / roofline_tok_s_bytes_read
eager_ms = 1e3 / speeds["lab engine: eager"]["median"]
print(f"[shape twin] eager step {eager_ms:.1f} ms against {traffic_ms:.2f} ms of memory traffic "
      f"({eager_ms / traffic_ms:.1f}x)" + (f"; {n_ops:,} GPU operations, ~{1e3 * eager_ms / n_ops:.0f} us each" if n_ops else ""))
lab_stages = [k for k in speeds if k.startswith("lab")]
for prev, cur in zip(lab_stages, lab_stages[1:]):
    print(f"{cur.removeprefix('lab engine: '):<24} {speeds[cur]['median'] / speeds[prev]['median']:5.2f}x the "
          f"{prev.removeprefix('lab engine: ')} stage, {speeds[cur]['median'] / roofline_tok_s_bytes_read:.1%} of the bytes-read roofline")
print(f"best lab stage / HF generate (dynamic cache): {engine_bs1_tok_s / hf_generate_bs1_tok_s:.1f}x")

# %% [markdown]
# ## 6. When does decoding stop being memory-bound?
#
# A batch of B sequences shares each read of the weights, so tokens/s should grow ~B× for free
# until compute (or the per-sequence KV reads) takes over. The sweep uses the CUDA-graph engine
# with fused projections (cuBLAS matmuls: with B > 1 rows the GEMV kernel hands over to cuBLAS),
# capturing one graph per batch size; it is not compiled, so at batch 1 it is faster than section
# 5's `graph` stage and slower than its compiled ones. The bound is the roofline of notebook 00:
# the slower of the memory bound of exercise 3 and the matmul peak (`roofline.decode_tok_s_bound`).

# %%
swept = Decoder.from_hf(twin).fuse_projections() if has_cuda() else lab
n_sweep = pick(32, 4)
sweep_rows = []
for B in tqdm(pick([1, 4, 16, 64, 256, 512, 1024], [1, 4]), desc="batch sweep"):
    engine = DecodeEngine(swept, batch=B, max_seq_len=ctx + 8, mode=pick("graph", "eager"))
    ids_b = torch.randint(0, tcfg["vocab_size"], (B, prompt_len), device=device)
    s = spread(decode_runs(engine, ids_b, n_sweep, runs=pick(3, 1)))
    step = roofline.decode_step(tcfg, B, ctx, twin_dtype_bytes)
    bound = roofline.decode_tok_s_bound(tcfg, peak_tflops, copy_gbps, B, ctx, twin_dtype_bytes)
    mem_only = B * copy_gbps * 1e9 / step["bytes"]
    sweep_rows.append({"batch": B, "tok/s": s["median"], "p20": s["p20"], "p80": s["p80"], "roofline tok/s": bound,
                       "memory-only bound": mem_only, "% of roofline": s["median"] / bound,
                       "TFLOP/s": s["median"] / B * step["flops"] / 1e12, "FLOP/byte": step["flops"] / step["bytes"],
                       "bound by": "compute" if bound < mem_only * (1 - 1e-9) else "memory"})
    del engine
sweep = pd.DataFrame(sweep_rows)
ridge = roofline.ridge_point(peak_tflops, copy_gbps)
print(f"[shape twin] ridge point {ridge:,.0f} FLOP/byte ({peak_tflops:,.1f} TFLOP/s, {copy_gbps:,.0f} GB/s); "
      f"tok/s: median (p20-p80) of the timed runs")
print(sweep.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

fig = go.Figure()
fig.add_trace(go.Scatter(x=sweep["batch"], y=sweep["tok/s"], mode="lines+markers", name="lab engine (measured)",
                         error_y=dict(type="data", array=sweep["p80"] - sweep["tok/s"],
                                      arrayminus=sweep["tok/s"] - sweep["p20"])))
fig.add_trace(go.Scatter(x=sweep["batch"], y=sweep["roofline tok/s"], mode="lines", name="roofline bound", line_dash="dash"))
fig.add_trace(go.Scatter(x=sweep["batch"], y=sweep["memory-only bound"], mode="lines", name="if it stayed memory-bound", line_dash="dot"))
fig.update_xaxes(type="log", title="batch size")
fig.update_yaxes(type="log", title="tokens/s (all sequences)")
fig.update_layout(title=f"Decode throughput vs batch, {twin_arch} shape twin", height=420)
show(fig)

# %% [markdown]
# While decoding is memory-bound, the measured line climbs almost in step with the bound: B
# sequences ride on the same weight reads (163 tok/s at batch 1, 8,719 at batch 64, about 3.7-3.8x
# per 4x of batch; medians, with p20-p80 spreads under 0.1%), and the share of the bound falls only
# slowly, from 54% to 46%, as matmuls with more rows and the per-sequence attention take longer.
# Decode's arithmetic intensity is ≈ B FLOP/byte in bf16 while the weights dominate the bytes (the
# table's FLOP/byte column: 1.00, 4.00, 15.9, 62.6), and falls below B as the KV reads grow (233 at
# B = 256, 734 at 1,024). The roofline turns where it reaches the ridge point (161 FLOP/byte here),
# between batch 64 and 256; past it the bound is the tensor cores, and the measured line bends with
# it (2.69x from 64 to 256, then 1.21x and 1.09x per doubling), at 48-64% of the 687 TFLOP/s matmul
# peak (skinny matmuls of a few hundred rows, plus attention and norms that do not use the tensor
# cores). The lines below read these off the table. Longer contexts push the turn further out
# (more KV bytes per sequence). Serving systems (notebook 06) live in that region.

# %%
first, last = sweep.iloc[0], sweep.iloc[-1]
compute_bound = sweep[sweep["bound by"] == "compute"]
print(f"[shape twin] batch {int(last['batch'])} decodes {last['tok/s'] / first['tok/s']:.0f}x the tokens/s of batch "
      f"{int(first['batch'])}; share of the roofline {sweep['% of roofline'].min():.0%}-{sweep['% of roofline'].max():.0%}")
if len(compute_bound):
    knee = int(compute_bound["batch"].min())
    print(f"the bound turns compute-bound from batch {knee} on (ridge {ridge:,.0f} FLOP/byte)")
    for (_, lo), (_, hi) in zip(sweep.iterrows(), sweep.iloc[1:].iterrows()):
        if hi["batch"] >= knee:
            print(f"  batch {int(lo['batch'])} -> {int(hi['batch'])}: {hi['tok/s'] / lo['tok/s']:.2f}x the tokens/s, "
                  f"{hi['TFLOP/s']:,.0f} TFLOP/s ({hi['TFLOP/s'] / peak_tflops:.0%} of the matmul peak)")
else:
    print("every batch of this sweep is memory-bound")

# %% [markdown]
# ## 7. The engine on real weights reproduces HF's text
#
# Speed means nothing if the text changes. On the embedded model in fp32, the captured engine
# (the eager kernels replayed from a CUDA graph; the eager loop on a CPU) against HF `generate`:

# %%
engine = DecodeEngine(model, batch=1, max_seq_len=ids.shape[1] + n_new, mode=pick("graph", "eager"))
eng_out = engine.generate(ids, n_new)
hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                     pad_token_id=tok.eos_token_id)
n_hf = hf_out.shape[1]  # HF stops at the end-of-turn token; the engine runs on
same_text = tok.decode(eng_out[0, :n_hf]) == tok.decode(hf_out[0])
print(tok.decode(eng_out[0, ids.shape[1]:n_hf], skip_special_tokens=True))

# %%
# NBVAL_CHECK_OUTPUT
print(f"engine greedy text == HF greedy text: {same_text}")

# %%
if has_cuda():  # fused projections and the GEMV kernel, also in fp32 on real weights (GPU only: not checked by nbval)
    fast = DecodeEngine(Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: GemvLinear(l)),
                        batch=1, max_seq_len=ids.shape[1] + n_new, mode="graph")
    fast_out = fast.generate(ids, n_new)
    print(f"fused + GEMV engine text == HF text: {tok.decode(fast_out[0, :n_hf]) == tok.decode(hf_out[0])}")
    del fast

# %% [markdown]
# ## 8. Results

# %%
metrics = {
    "roofline_tok_s": roofline_tok_s, "roofline_tok_s_bytes_read": roofline_tok_s_bytes_read,
    "engine_bs1_tok_s": engine_bs1_tok_s, "hf_generate_bs1_tok_s": hf_generate_bs1_tok_s,
    "engine_vs_roofline": engine_bs1_tok_s / roofline_tok_s,
    "engine_vs_roofline_bytes_read": engine_bs1_tok_s / roofline_tok_s_bytes_read,
    "bs1_tok_s_by_method": {k: v["median"] for k, v in speeds.items()}, "bs1_tok_s_spread": speeds,
    "copy_gbps": copy_gbps, "matmul_bf16_tflops": peak_tflops, "ceilings_source": ceil["source"],
    "shape_twin": twin_arch, "eager_ops_per_step": n_ops,
    "kv_bytes_predicted": kv_bytes_predicted, "kv_bytes_measured": kv_bytes_measured,
    "kv_config": {"arch": kv_arch, "positions": kv_ctx, "dtype": str(kv_dtype)[6:]},
    "batch_sweep": sweep.to_dict(orient="records"), "step_ms_vs_context": costs.to_dict(orient="records"),
    "cache_logits_rel_err": cache_rel_err, "engine_text_matches_hf": same_text,
}
path = save_results("02_kv_cache", metrics, dtype=twin_dtype, note="tok/s measured on a random-weight shape twin; "
                    "tok/s are medians of repeated runs (spreads in bs1_tok_s_spread and batch_sweep)")
print(path.relative_to(REPO))
