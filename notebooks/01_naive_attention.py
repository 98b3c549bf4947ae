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
# # 01 · Attention and a decoder from scratch, on real weights
#
# This notebook builds the model that the rest of the book speeds up:
#
# 1. **attention** from its definition, softmax(QKᵀ/√d)·V with a causal mask, first as a loop a
#    reader can follow, then vectorised, checked against PyTorch's fused kernel;
# 2. **the lab decoder** (`labutils/decoder.py`): RMSNorm, rotary position embeddings, grouped-query
#    attention and a SwiGLU MLP, the Llama / Qwen2 / Mistral recipe, loaded with the real weights
#    of the embedded model (SmolLM2-135M-Instruct) and checked **logit for logit** against Hugging
#    Face transformers;
# 3. **greedy generation without a cache**, and what it costs: every new token re-runs the whole
#    sequence, so the FLOPs per token grow with the length and the total FLOPs at least
#    quadratically (log-log slope 2.01 to 2.33 between 128 and 8192 tokens for this model). The
#    measured time does not follow at first. On the H200 of this run a step with naive attention
#    costs 22-30 ms at every length from 128 to 2048 tokens: a 135M-parameter model is bound by
#    kernel-launch and Python overhead, so the total time grows about linearly (slope 0.87-1.06).
#    The quadratic term becomes visible only with naive attention, from 4096 tokens (93 ms a step,
#    3.3 times the step at 2048), and dominates at 8192 (352 ms a step, per-step slope 1.92, total
#    slope 2.61 from 4096 to 8192). With PyTorch's fused attention a step stays at 16-19 ms up to
#    8192 tokens (total slope at most 1.05). Section 5 measures this.
#
# The decoder has three narrow seams (attention function, KV cache, linear layers) through which
# the later notebooks plug in their techniques, so there is only ever one model.
#
# You write three functions on the way, each checked by the cell after it: causal attention, the
# rotary position embedding, and the FLOP count of generating without a cache.

# %%
import math

import numpy as np
import pandas as pd
import plotly.express as px
import torch

from labutils import attention, decoder, hardware, roofline
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.generate import encode_prompt, greedy_no_cache
from labutils.models import load_model
from labutils.notebook import setup, show_source, slider
from labutils.results import save_results
from labutils.runtime import default_dtype, pick

device = setup()

# %% [markdown]
# ## 1. Attention, by its definition
#
# For one head, queries Q (T × d), keys K and values V (S × d): each query scores every key,
# the scores become weights through a softmax, and the output is the weighted sum of values:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right) V,
# \qquad M_{ij} = \begin{cases} 0 & j \le \mathrm{pos}(i) \\ -\infty & \text{otherwise}\end{cases}$$
#
# The causal mask M lets a token see only itself and the past. pos(i) is where query i sits in
# the sequence: in a prompt, query i is at position i; when decoding, the few queries are the *last*
# positions of a longer sequence, so the mask must follow `q_pos`, not the row index.
#
# **Exercise 1: causal attention.** Write it for one head, straight from the formula: q (T, d),
# k and v (S, d), q_pos (T,) the position of each query. Masked scores must get no weight at all
# (−∞ before the softmax, not 0). The checks below then use your function as the reference that
# the package's attention and PyTorch's fused kernel must match.

# %%
def causal_attention(q, k, v, q_pos):
    """q (T, d), k/v (S, d), q_pos (T,): softmax(q k^T / sqrt(d) + M) v for one head, (T, d)."""
    ### BEGIN SOLUTION
    d = q.shape[-1]
    scores = q @ k.T / math.sqrt(d)                                           # (T, S)
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # key j visible iff j <= pos(i)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1)                                   # each row sums to 1
    return weights @ v                                                        # (T, d)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("causal_attention", causal_attention);


# %% [markdown]
# The package's version does all heads and queries at once, materialising the T × S score matrix
# (that matrix is what FlashAttention, notebook 03, avoids writing to memory). It also handles
# **grouped-query attention**: several query heads share one key/value head.

# %%
show_source(attention.naive_attention)

# %% [markdown]
# Check: your function (applied head by head), the package's vectorised version and PyTorch's
# fused `scaled_dot_product_attention` must agree, on an awkward shape (9 query heads sharing 3 KV
# heads, 37 tokens), and also when the queries are the *last* few positions of a longer sequence
# (as in decoding).

# %%
torch.manual_seed(0)
B, n_head, n_kv_head, T, head_dim = 2, 9, 3, 37, 64
q = torch.randn(B, n_head, T, head_dim, dtype=torch.float64)
k = torch.randn(B, n_kv_head, T, head_dim, dtype=torch.float64)
v = torch.randn(B, n_kv_head, T, head_dim, dtype=torch.float64)
pos = torch.arange(T)
group = n_head // n_kv_head
ref = torch.stack([torch.stack([causal_attention(q[b, h], k[b, h // group], v[b, h // group], pos)
                                for h in range(n_head)]) for b in range(B)])
rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"naive vs yours: rel err {rel(attention.naive_attention(q, k, v, pos), ref):.1e}")
print(f"SDPA  vs yours: rel err {rel(attention.sdpa_attention(q, k, v, pos), ref):.1e}")
last4 = pos[-4:]
print(f"last 4 queries only: rel err {rel(attention.naive_attention(q[:, :, -4:], k, v, last4), ref[:, :, -4:]):.1e}")

# %% [markdown]
# ## 2. The decoder
#
# A decoder block is two residual updates, `x + attn(norm(x))` then `x + mlp(norm(x))`, repeated
# n_layer times between an embedding table and an output projection (the "lm_head"). Three parts
# are worth reading closely.
#
# **RMSNorm** rescales each token's vector to unit root-mean-square, then applies a learned gain:

# %%
show_source(decoder.RMSNorm)

# %% [markdown]
# **Rotary position embeddings (RoPE)** encode position by rotating pairs of query/key coordinates
# by angles proportional to the position; the dot product of a rotated query and key then depends
# only on their *distance*. Positions come in through `input_pos`, which later lets a KV cache
# feed one token at position 517 without recomputing the other 517.
#
# **Exercise 2: RoPE.** Rotate x (T, d) at positions pos (T,). Llama, Qwen2 and Mistral pair
# coordinate i with i + d/2 (the "half-split" layout) and turn pair i by the angle
# pos · θ^(−2i/d), i = 0 … d/2 − 1: (a, b) → (a cos − b sin, b cos + a sin). Low i turn fast
# (a radian per position for i = 0), high i slowly: with θ = 10000 and d = 64 the last pair needs
# about 47,000 positions for a full turn (about 440,000 with this model's θ = 100000).

# %%
def rope(x, pos, theta: float = 10000.0):
    """x (T, d), pos (T,) -> x with pair (x_i, x_{i+d/2}) rotated by pos * theta^(-2i/d)."""
    ### BEGIN SOLUTION
    T, d = x.shape
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)  # (d/2,)
    angles = pos[:, None].to(x.dtype) * inv_freq                     # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    a, b = x[:, : d // 2], x[:, d // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("rope_rotate", rope);

# %% [markdown]
# The package's version (used by the decoder) computes cos and sin once per forward, for all heads,
# with fp32 angles. Against yours, and the property that makes RoPE a *relative* position code: a
# query at position m and a key at n score the same as at m + 1000 and n + 1000.

# %%
show_source(decoder.rope_cos_sin)
show_source(decoder.apply_rope)

# %%
torch.manual_seed(1)
x = torch.randn(6, 64, dtype=torch.float64)
xpos = torch.tensor([0, 1, 2, 17, 300, 517])
cos, sin = decoder.rope_cos_sin(xpos, 64, 10000.0, torch.float64)
print(f"decoder.apply_rope vs yours: rel err {rel(decoder.apply_rope(x, cos, sin), rope(x, xpos)):.1e} "
      f"(the decoder's angles are fp32)")
qv, kv_ = torch.randn(1, 64, dtype=torch.float64), torch.randn(1, 64, dtype=torch.float64)
for m, n in [(5, 2), (1005, 1002), (7005, 7002), (5, 4)]:
    score = (rope(qv, torch.tensor([m])) @ rope(kv_, torch.tensor([n])).T).item()
    print(f"query at {m:>4}, key at {n:>4} (distance {m - n}): score {score:+.6f}")

# %% [markdown]
# **Attention** projects to queries, keys and values (Qwen2 adds a bias), rotates q and k, asks
# the KV cache seam for all past keys/values (no cache here yet), and calls the attention seam:

# %%
show_source(decoder.Attention.forward)
show_source(decoder.Decoder.forward)

# %% [markdown]
# ## 3. Loaded with real weights, checked against Hugging Face
#
# `load_model()` returns the embedded SmolLM2-135M-Instruct as a transformers model (dequantised
# from its Q4_1 GGUF to fp32). `Decoder.from_hf` builds the lab decoder on the *same* weight
# tensors. We compare logits at every position of a real prompt, in fp32.

# %%
hf, tok = load_model()  # fp32, on the GPU when there is one
model = Decoder.from_hf(hf)
print(model.cfg)
print(f"parameters: {sum(p.numel() for p in model.parameters()):,} "
      f"(HF: {sum(p.numel() for p in hf.parameters()):,}); weights shared: "
      f"{model.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()}")

prompt = "The three most important ideas in computer architecture are"
ids = tok(prompt, return_tensors="pt").input_ids.to(device)
with torch.no_grad():
    ref_logits = hf(ids).logits.float()
    errs, same_argmax = {}, True
    for backend in ("naive", "sdpa"):
        lab_logits = model.set_attention(backend)(ids).float()
        errs[backend] = ((lab_logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        same_argmax &= bool((lab_logits.argmax(-1) == ref_logits.argmax(-1)).all())
decoder_vs_hf_max_rel_err = max(errs.values())
for backend, e in errs.items():
    print(f"{backend:>5} attention: max |lab - HF| / max |HF| = {e:.2e}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"lab decoder == HF transformers (fp32, max rel err <= 1e-4): {decoder_vs_hf_max_rel_err <= 1e-4}")
print(f"same next-token prediction at all {ids.shape[1]} positions: {same_argmax}")

# %% [markdown]
# ## 4. Greedy generation, without a cache
#
# Generation appends the most likely token and runs the model again on the whole, longer sequence.
# The lab loop (`labutils.generate.greedy_no_cache`) against `hf.generate(use_cache=False)`:

# %%
show_source(greedy_no_cache)

# %%
n_new = pick(48, 24)
chat_ids = encode_prompt(tok, "What is the capital of France? Answer in one sentence.", device=device)
model.set_attention("naive")
out = greedy_no_cache(model, chat_ids, n_new, eos_id=tok.eos_token_id)
hf_out = hf.generate(chat_ids, attention_mask=torch.ones_like(chat_ids), max_new_tokens=n_new,
                     do_sample=False, use_cache=False, pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, chat_ids.shape[1]:], skip_special_tokens=True))
n_cmp = min(out.shape[1], hf_out.shape[1])

# %%
# NBVAL_CHECK_OUTPUT
print(f"lab greedy tokens == HF greedy tokens: {torch.equal(out[:, :n_cmp], hf_out[:, :n_cmp])}")

# %% [markdown]
# ## 5. What generating without a cache costs
#
# Without a cache, producing token L + 1 means a forward pass over all L tokens. In that pass the
# linear layers cost 2N FLOPs per token (N weights in matmuls) and causal attention
# 2 · n_layer · d_attn · L² in all (d_attn = n_head · d_head; QKᵀ and PV are 4 · d_attn FLOPs per
# query-key pair, over about L² / 2 pairs): 2NL + 2 · n_layer · d_attn · L² FLOPs, the formula of
# `roofline.prefill`.
#
# **Exercise 3: the bill.** Write the total FLOPs of generating n tokens without a cache: the sum
# of that step cost over L = 1 … n. With a cache (notebook 02) each step runs one new token
# against the cached ones: 2N + 4 · n_layer · d_attn · (L − 1) FLOPs, 2Nn + 2 · n_layer · d_attn ·
# n(n − 1) in all.

# %%
def no_cache_flops(n: int, n_weights: int, n_layer: int, d_attn: int) -> int:
    """FLOPs of generating n tokens without a cache: sum over L = 1..n of 2*N*L + 2*n_layer*d_attn*L^2."""
    ### BEGIN SOLUTION
    return sum(2 * n_weights * L + 2 * n_layer * d_attn * L * L for L in range(1, n + 1))
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("no_cache_flops", no_cache_flops);

# %% [markdown]
# For this model, with its own shapes: the totals with and without a cache, and the log-log slope
# of the no-cache total between successive lengths (1: linear, 2: quadratic, 3: cubic).

# %%
cfg = hf.config.to_dict()
N, n_layer = roofline.linear_params(cfg), cfg["num_hidden_layers"]
d_attn = cfg["num_attention_heads"] * cfg["head_dim"]
max_len = hf.config.max_position_embeddings
lengths = pick([128, 256, 512, 1024, 2048, 4096, 8192], [16, 32, 64, 128])
flop_model = pd.DataFrame({"n": lengths,
                           "no cache (TFLOP)": [no_cache_flops(n, N, n_layer, d_attn) / 1e12 for n in lengths],
                           "with a cache (TFLOP)": [(2 * N * n + 2 * n_layer * d_attn * n * (n - 1)) / 1e12 for n in lengths]})
flop_model["ratio"] = flop_model["no cache (TFLOP)"] / flop_model["with a cache (TFLOP)"]
flop_model["slope (no cache)"] = np.concatenate([[np.nan], np.diff(np.log(flop_model["no cache (TFLOP)"])) / np.diff(np.log(lengths))])
print(f"N = {N:,} weights in matmuls, n_layer = {n_layer}, d_attn = {d_attn}; attention's L^2 term overtakes the "
      f"weights' L term from L = N / (n_layer * d_attn) = {N / (n_layer * d_attn):,.0f}")
print(flop_model.to_string(index=False, float_format=lambda x: f"{x:,.3g}"))

# %% [markdown]
# **Does the time follow the FLOPs?** The time of a step is at least max(bytes / W, FLOPs / P),
# with W and P the ceilings of this device (`hardware.ceilings()`: notebook 00's measurement when
# it ran on this device, else measured now). We time the lab decoder (naive and SDPA attention) in
# the book's working dtype (bf16 on a GPU) and HF's `generate(use_cache=False)` beside it.
#
# **Predict first.** A step at the longest length does the FLOPs printed below times those of a
# step at the shortest. How many times longer will it *take*, with naive attention?

# %%
step_flops = {n: roofline.prefill(cfg, n)["flops"] for n in (lengths[0], lengths[-1])}
print(f"one step at {lengths[-1]} tokens: {step_flops[lengths[-1]] / step_flops[lengths[0]]:,.0f}x the FLOPs "
      f"of one at {lengths[0]}")
my_time_ratio = None  # your prediction: ms(longest) / ms(shortest), naive attention

# %%
dtype = default_dtype()
hf_fast, _ = load_model(dtype=dtype)
fast = Decoder.from_hf(hf_fast)
ceil = hardware.ceilings()
bw, peak = ceil["copy_gbps"], ceil["matmul_bf16_tflops"]
dtype_bytes = torch.finfo(dtype).bits // 8
print(f"ceilings: {bw:,.0f} GB/s, {peak:,.1f} TFLOP/s ({ceil['source']}); dtype {dtype}")


def check_fits(seq_len: int, backend: str):
    """Refuse lengths the model or the memory cannot take, with a message instead of a crash."""
    if not 1 <= seq_len <= max_len:
        raise ValueError(f"seq_len must be in 1..{max_len} (the model's context), got {seq_len}")
    if backend == "naive":  # the (n_head, T, T) score matrix, in fp32 for the softmax, twice
        need = 2 * fast.cfg.n_head * seq_len**2 * 4
        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 8 * 2**30
        if need > 0.8 * free:
            raise MemoryError(f"naive attention at seq_len={seq_len} needs ~{need / 2**30:.1f} GiB for its "
                              f"score matrix; {free / 2**30:.1f} GiB free. Use the 'sdpa' backend.")


@torch.no_grad()
def step_cost(seq_len: int, backend: str = "naive") -> dict:
    """Time one no-cache decode step at length seq_len: a forward over all seq_len tokens (logits of
    the last position only). Random token ids: the time does not depend on them."""
    check_fits(seq_len, backend)
    model = fast.set_attention(backend)
    x = torch.randint(0, cfg["vocab_size"], (1, seq_len), device=device)
    t = time_fn(lambda: model(x, last_only=True), rep_ms=pick(200, 50), min_reps=pick(7, 3))  # >= 7 runs even where a step takes 0.3 s
    pre = roofline.prefill(cfg, seq_len, dtype_bytes)
    bound_ms = 1e3 * max(pre["bytes"] / (bw * 1e9), pre["flops"] / (peak * 1e12))
    return {"seq_len": seq_len, "backend": backend, "ms": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms,
            "roofline_ms": bound_ms}


@torch.no_grad()
def hf_generate_cost(seq_len: int, n: int = 4) -> dict:
    """ms per token of hf.generate(use_cache=False) for n tokens after a seq_len-token prompt."""
    x = torch.randint(0, cfg["vocab_size"], (1, seq_len), device=device)
    gen = lambda: hf_fast.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                   do_sample=False, use_cache=False, pad_token_id=tok.eos_token_id)
    t = time_fn(gen, warmup_ms=0, rep_ms=pick(200, 20), min_reps=pick(5, 2))
    return {"seq_len": seq_len, "backend": "HF generate(use_cache=False)", "ms": t.median_ms / n,
            "p20": t.p20_ms / n, "p80": t.p80_ms / n}


rows = []
for n in lengths:
    for backend in ("naive", "sdpa"):
        rows.append(step_cost(n, backend))
    if n + 4 <= max_len:
        rows.append(hf_generate_cost(n))
cost = pd.DataFrame(rows)
cost["median (p20-p80) ms"] = [f"{r.ms:,.2f} ({r.p20:,.2f}-{r.p80:,.2f})" for r in cost.itertuples()]
print(cost.pivot(index="seq_len", columns="backend", values="median (p20-p80) ms").to_string())

# %%
pred = cost[cost.backend == "naive"].set_index("seq_len")
predict("naive step, ms(longest) / ms(shortest)", my_time_ratio, pred["ms"].iloc[-1] / pred["ms"].iloc[0], "x")
print("lab decoder (naive attention): measured vs roofline bound per step")
print(pd.DataFrame({"measured ms": pred["ms"], "roofline ms": pred["roofline_ms"],
                    "bound / measured": pred["roofline_ms"] / pred["ms"]}).to_string(float_format=lambda x: f"{x:,.3f}"))
cost["+"], cost["-"] = cost["p80"] - cost["ms"], cost["ms"] - cost["p20"]
fig = px.line(cost, x="seq_len", y="ms", color="backend", markers=True, log_x=True, log_y=True,
              error_y="+", error_y_minus="-", height=420,
              title=f"One decode step without a KV cache, {hf.config.name_or_path.split('/')[-1]} ({str(dtype)[6:]})",
              labels={"ms": "ms per new token (median, p20-p80)", "seq_len": "sequence length"})
show(fig)

# %% [markdown]
# **The total.** Generating n tokens without a cache sums the step costs over lengths 1 … n.
# Integrating the measured curve (trapezoids between the measured lengths) and taking the slope of
# log(total) against log(n) shows how the bill grows, beside the same slope of the FLOP model
# (exercise 3) and the per-step slopes. If a step's time grew as n^a over the whole range, the
# total would grow as n^(a+1). Between two measured lengths where the step grows with the length,
# the total's slope stays below the step's plus one, because the total still holds all the
# cheaper, shorter steps (naive, 4096 to 8192 tokens: step 1.92, total 2.61, below 2.92); where the
# step gets shorter, the total's slope is above the step's plus one (naive, 128 to 256 tokens:
# step −0.40, total 0.91).

# %%
slopes = {}
for backend in ("naive", "sdpa"):
    c = cost[cost.backend == backend].sort_values("seq_len")
    n_arr, ms_arr = c.seq_len.to_numpy(float), c.ms.to_numpy()
    total_s = np.concatenate([[n_arr[0] * ms_arr[0]], n_arr[0] * ms_arr[0]
                              + np.cumsum(np.diff(n_arr) * (ms_arr[1:] + ms_arr[:-1]) / 2)]) / 1e3
    slopes[backend] = {"step": np.diff(np.log(ms_arr)) / np.diff(np.log(n_arr)),
                       "total": np.diff(np.log(total_s)) / np.diff(np.log(n_arr))}
    print(f"{backend:>5}: seconds to generate n tokens without a cache: "
          + ", ".join(f"n={int(n)}: {t:,.2f}" for n, t in zip(n_arr, total_s)))
    print(f"       slope of the total: " + ", ".join(f"{x:.2f}" for x in slopes[backend]["total"]))
    print(f"       slope of one step:  " + ", ".join(f"{x:.2f}" for x in slopes[backend]["step"]))
print(f"FLOP model, slope of the total: " + ", ".join(f"{x:.2f}" for x in flop_model["slope (no cache)"].iloc[1:]))

sd = cost[cost.backend == "sdpa"].set_index("seq_len")
print(f"\nsdpa: a step costs between {sd.ms.min():.2f} and {sd.ms.max():.2f} ms over lengths {lengths[0]} to {lengths[-1]}, "
      f"while its roofline bound grows from {sd.roofline_ms.iloc[0]:.3f} to {sd.roofline_ms.iloc[-1]:.3f} ms: "
      f"{'flat, so bound by overhead throughout' if sd.ms.max() < 1.5 * sd.ms.min() else f'not flat (max / min {sd.ms.max() / sd.ms.min():.1f}x): see the table'}; "
      f"measured slope of the total {slopes['sdpa']['total'][-1]:.2f} between the two longest lengths.")
grow = pred["ms"].iloc[-1] / pred["ms"].iloc[-2]
print(f"naive: the step grows {grow:.1f}x from {lengths[-2]} to {lengths[-1]} tokens (per-step slope "
      f"{slopes['naive']['step'][-1]:.2f}; 2 is the n_head x n x n score matrix alone), total slope "
      f"{slopes['naive']['total'][-1]:.2f} between them.")

# %% [markdown]
# Reading the numbers (H200, bf16; medians, with their p20-p80 spread in the table above). From 128
# to 2048 tokens a naive step takes 22.5-29.7 ms, an SDPA step 16.1-18.6 ms and HF's
# `generate(use_cache=False)` 19.2-20.9 ms per token (128 to 4096; at 8192 the context has no room
# for 4 more tokens), while the roofline bound of a step grows from 0.06 to 1.0 ms (bound / measured
# 0.002 to 0.04). Where the step time barely changes with the length, a step is bound by
# **overhead**, not by the work: 30 layers of small kernels, each launched from Python, cost a fixed
# time far above the roofline bound of the step (notebook 02 removes most of it with CUDA graphs).
# The SDPA step stays within 16.1-19.3 ms at all lengths (per-step slopes −0.21 to 0.18), and the
# naive step's slopes from 256 to 2048 tokens are 0.07 to 0.16, while a step's FLOPs grow with a
# slope between 1 and 2. Both lab backends are slower at 128 tokens than at 256 (naive 29.7 against
# 22.5 ms, SDPA 18.6 against 16.1 ms, beyond the p20-p80 spread), which no count of the work
# explains; it makes the first per-step slopes negative. Generating n tokens then costs about n
# times that constant: a measured total slope of 0.87-1.06 (naive, up to 2048 tokens) and
# 0.93-1.05 (SDPA, up to 8192), although the FLOPs grow with slope 2.01-2.33.
#
# The work shows in the time only once a step's share of it exceeds the overhead. On a model this
# small that happens only with naive attention, whose fp32 score matrix (n_head × n × n: 9 × 8192²
# ≈ 6.0 × 10⁸ values, 2.4 GB per layer at 8192 tokens) is written and read several times per
# layer. Its step rises slowly from 256 to 2048 tokens (22.5 to 28.0 ms, more than the timing spread
# at either end), then steeply: 93 ms at 4096 (3.3 times the 2048 step, per-step slope 1.74) and
# 352 ms at 8192 (slope 1.92, close to the 2 of the score matrix alone), and the total's slope
# climbs to 1.73 and then 2.61. The quadratic term thus becomes visible from 4096 tokens, where the
# step grows by 65 ms over the 2048 step, more than twice that whole step, and dominates at 8192,
# where a step takes 11.9 times as long as at 128 (15.7 times the fastest step, at 256) for 129
# times the FLOPs. Between 4096 and 8192 the measured total even grows faster than the FLOP model's
# (slope 2.61 against 2.33): the naive step's time there is mostly the n² traffic of the score
# matrix, while a step's FLOPs still hold the weights' linear 2NL term (attention's L² term
# overtakes it only from L = 7,782), so they grow with a slope of about 1.4, not 1.92. (From 2048
# tokens on, the naive step's p20-p80 spread is under 0.4% of its median; below that it reaches
# 13%, at 1024.) Even at 8192 tokens the roofline bound, 6.6 ms, is 1.9% of the measured step: it
# counts the step's FLOPs at the bf16 peak and the bytes of weights and KV, not the traffic of the
# materialised score matrix nor the fp32 matmuls of naive attention, which is where that step's
# time goes (FlashAttention, notebook 03, keeps the matrix on chip). A larger model, or a batch of
# sequences, would make every step's work larger than its overhead, and then the no-cache bill
# would grow as the FLOP model says; that is not measured here. The KV cache makes each step touch
# one new token.
#
# The slider reruns the same measurement at any length (lengths the model or memory cannot take
# are refused with a message; without a GPU the slider stops at 512 tokens).

# %%
def cost_at(seq_len: int = 256, backend: str = "naive"):
    try:
        r = step_cost(seq_len, backend)
    except (ValueError, MemoryError) as e:
        print(e)
        return
    passes = seq_len * (seq_len + 1) // 2
    print(f"seq_len {seq_len}: {r['ms']:.2f} ms (p20-p80 {r['p20']:.2f}-{r['p80']:.2f}) for the next token "
          f"(roofline bound {r['roofline_ms']:.3f} ms); generating all {seq_len} tokens without a cache processes "
          f"{passes:,} token positions, with one: {seq_len:,}")


cost_at(pick(1024, 64))
slider(cost_at, seq_len=(16, pick(max_len, 512), 16, pick(1024, 64)))

# %% [markdown]
# ## 6. Results

# %%
naive = cost[cost.backend == "naive"].set_index("seq_len")["ms"]
metrics = {
    "decoder_vs_hf_max_rel_err": decoder_vs_hf_max_rel_err,
    "decoder_vs_hf_rel_err_by_backend": errs,
    "greedy_matches_hf": bool(torch.equal(out[:, :n_cmp], hf_out[:, :n_cmp])),
    "no_cache_ms_per_token": {str(k): v for k, v in naive.items()},
    "no_cache_ms_per_token_sdpa": {str(k): v for k, v in cost[cost.backend == "sdpa"].set_index("seq_len")["ms"].items()},
    "hf_generate_no_cache_ms_per_token": {str(k): v for k, v in cost[cost.backend.str.startswith("HF")].set_index("seq_len")["ms"].items()},
    "no_cache_ms_p20_p80": {b: {str(r.seq_len): [r.p20, r.p80] for r in cost[cost.backend == b].itertuples()}
                            for b in cost.backend.unique()},
    "no_cache_total_slopes": {b: [float(x) for x in v["total"]] for b, v in slopes.items()},
    "flop_model_total_slopes": [float(x) for x in flop_model["slope (no cache)"].iloc[1:]],
    "ceilings": ceil,
    "timing_dtype": str(dtype).removeprefix("torch."),
}
path = save_results("01_naive_attention", metrics, dtype=dtype, model=hf.config.name_or_path)
print(f"wrote {path.parent.name}/{path.name}")  # relative: the same on every machine
