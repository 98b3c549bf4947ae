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
# 3. **greedy generation without a cache**, and what it costs: every new token re-reads the whole
#    sequence, so per-token cost grows with length and the total grows quadratically.
#
# The decoder has three narrow seams (attention function, KV cache, linear layers) through which
# notebooks 02-06 plug in their techniques, so there is only ever one model.

# %%
import math

import pandas as pd
import plotly.express as px
import torch

from labutils import attention, decoder, roofline
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.generate import decode_step_ms, encode_prompt, greedy_no_cache
from labutils.hardware import copy_bandwidth_gbps, matmul_peak_tflops
from labutils.models import load_model
from labutils.notebook import setup, show_source, slider
from labutils.results import load_results, save_results
from labutils.runtime import default_dtype, device_name, pick

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
# The causal mask M lets a token see only itself and the past. Here it is as a loop over queries,
# the slowest and plainest way to write it:

# %%
def attention_loop(q, k, v, q_pos):
    """q (T, d), k/v (S, d), q_pos (T,): one head, one query at a time."""
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        visible = k[: q_pos[i] + 1]  # keys at positions 0 .. pos(i)
        scores = visible @ q[i] / math.sqrt(q.shape[-1])  # (pos(i)+1,)
        weights = torch.softmax(scores, dim=0)  # sums to 1
        out[i] = weights @ v[: q_pos[i] + 1]  # (d,)
    return out


# %% [markdown]
# The package's version does all heads and queries at once, materialising the T × S score matrix
# (that matrix is what FlashAttention, notebook 03, avoids writing to memory). It also handles
# **grouped-query attention**: several query heads share one key/value head.

# %%
show_source(attention.naive_attention)

# %% [markdown]
# Check: the loop, the vectorised version and PyTorch's fused `scaled_dot_product_attention`
# must agree, on an awkward shape (9 query heads sharing 3 KV heads, 37 tokens), and also when the
# queries are the *last* few positions of a longer sequence (as in decoding).

# %%
torch.manual_seed(0)
B, n_head, n_kv_head, T, head_dim = 2, 9, 3, 37, 64
q = torch.randn(B, n_head, T, head_dim, dtype=torch.float64)
k = torch.randn(B, n_kv_head, T, head_dim, dtype=torch.float64)
v = torch.randn(B, n_kv_head, T, head_dim, dtype=torch.float64)
pos = torch.arange(T)
group = n_head // n_kv_head
ref = torch.stack([torch.stack([attention_loop(q[b, h], k[b, h // group], v[b, h // group], pos)
                                for h in range(n_head)]) for b in range(B)])
rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"naive vs loop: rel err {rel(attention.naive_attention(q, k, v, pos), ref):.1e}")
print(f"SDPA  vs loop: rel err {rel(attention.sdpa_attention(q, k, v, pos), ref):.1e}")
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

# %%
show_source(decoder.rope_cos_sin)
show_source(decoder.apply_rope)

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
# Without a cache, producing token n+1 means a forward pass over all n tokens. In that pass the
# linear layers cost 2N FLOPs per token (N weights) and attention 4·n·d per token per layer, so one
# step costs ~2Nn + 2·n_layer·d·n² FLOPs and the whole generation of n tokens O(n²) token-passes:
# the work the KV cache of notebook 02 removes.
#
# **Prediction.** The time of a step is at least max(bytes / W, FLOPs / P), with W and P measured
# in notebook 00 (read back from its results; measured again if that notebook has not run). We
# time the lab decoder (naive and SDPA attention) in the book's working dtype (bf16 on a GPU) and
# HF's `generate(use_cache=False)` beside it.

# %%
dtype = default_dtype()
hf_fast, _ = load_model(dtype=dtype)
fast = Decoder.from_hf(hf_fast)
ceilings = load_results("00_roofline")
if ceilings is None or ceilings["device"] != device_name():
    bw, peak = copy_bandwidth_gbps()["gbps"], matmul_peak_tflops(torch.bfloat16)[0]
else:
    bw, peak = ceilings["metrics"]["copy_gbps"], ceilings["metrics"]["matmul_bf16_tflops"]
cfg = hf.config.to_dict()
dtype_bytes = torch.finfo(dtype).bits // 8
print(f"ceilings: {bw:,.0f} GB/s, {peak:,.1f} TFLOP/s; dtype {dtype}")
max_len = hf.config.max_position_embeddings


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
    """Time one no-cache decode step at length seq_len: a forward over all seq_len tokens."""
    check_fits(seq_len, backend)
    ms = decode_step_ms(fast.set_attention(backend), seq_len, rep_ms=pick(300, 50))
    pre = roofline.prefill(cfg, seq_len, dtype_bytes)
    bound_ms = 1e3 * max(pre["bytes"] / (bw * 1e9), pre["flops"] / (peak * 1e12))
    return {"seq_len": seq_len, "backend": backend, "ms": ms, "roofline_ms": bound_ms}


@torch.no_grad()
def hf_generate_cost(seq_len: int, n: int = 4) -> float:
    """ms per token of hf.generate(use_cache=False) for n tokens after a seq_len-token prompt."""
    x = torch.randint(0, cfg["vocab_size"], (1, seq_len), device=device)
    gen = lambda: hf_fast.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                   do_sample=False, use_cache=False, pad_token_id=tok.eos_token_id)
    return time_fn(gen, warmup_ms=0, rep_ms=pick(300, 20), min_reps=2).median_ms / n


lengths = pick([128, 256, 512, 1024, 2048, 4096, 8192], [16, 32, 64, 128])
rows = []
for n in lengths:
    for backend in ("naive", "sdpa"):
        rows.append(step_cost(n, backend))
    if n + 4 <= max_len:
        rows.append({"seq_len": n, "backend": "HF generate(use_cache=False)", "ms": hf_generate_cost(n)})
cost = pd.DataFrame(rows)
print(cost.pivot(index="seq_len", columns="backend", values="ms").to_string(float_format=lambda x: f"{x:,.2f}"))

# %%
pred = cost[cost.backend == "naive"].set_index("seq_len")
print("lab decoder (naive attention): measured vs roofline bound per step")
print(pd.DataFrame({"measured ms": pred["ms"], "roofline ms": pred["roofline_ms"],
                    "bound / measured": pred["roofline_ms"] / pred["ms"]}).to_string(float_format=lambda x: f"{x:,.3f}"))
fig = px.line(cost, x="seq_len", y="ms", color="backend", markers=True, log_x=True, log_y=True,
              title=f"One decode step without a KV cache, {hf.config.name_or_path.split('/')[-1]} ({str(dtype)[6:]})",
              labels={"ms": "ms per new token", "seq_len": "sequence length"})
fig.show()

# %% [markdown]
# **The total.** Generating n tokens without a cache sums the step costs over lengths 1 .. n.
# Integrating the measured curve (trapezoids between the measured lengths) and fitting the slope
# of log(total) against log(n) shows how the bill grows: a slope of 2 is O(n²), and naive attention
# pushes it towards 3 at long lengths.

# %%
import numpy as np

for backend in ("naive", "sdpa"):
    c = cost[cost.backend == backend].sort_values("seq_len")
    n_arr, ms_arr = c.seq_len.to_numpy(float), c.ms.to_numpy()
    total_s = np.concatenate([[n_arr[0] * ms_arr[0]], n_arr[0] * ms_arr[0]
                              + np.cumsum(np.diff(n_arr) * (ms_arr[1:] + ms_arr[:-1]) / 2)]) / 1e3
    slope = np.diff(np.log(total_s)) / np.diff(np.log(n_arr))
    print(f"{backend:>5}: total seconds to generate n tokens without a cache: "
          + ", ".join(f"n={int(n)}: {t:,.2f}" for n, t in zip(n_arr, total_s)))
    print(f"       log-log slope between successive lengths: " + ", ".join(f"{x:.2f}" for x in slope))

# %% [markdown]
# Reading the plot: at short lengths a step costs the same at any length: 30 layers of small
# kernels are bound by **launch overhead**, far above the roofline bound of reading 0.27 GB of
# weights (notebook 02 removes that overhead with CUDA graphs). As the sequence grows the step
# cost rises with the work, and at thousands of tokens the naive score matrix (n_head × n × n)
# dominates: per-token cost grows ~n², so generating n tokens costs ~n³ for naive attention and
# even the ideal is O(n²) token-passes. The KV cache makes each step touch one new token.
#
# The slider reruns the same measurement at any length (lengths the model or memory cannot take
# are refused with a message).

# %%
def cost_at(seq_len: int = 256, backend: str = "naive"):
    try:
        r = step_cost(seq_len, backend)
    except (ValueError, MemoryError) as e:
        print(e)
        return
    passes = seq_len * (seq_len + 1) // 2
    print(f"seq_len {seq_len}: {r['ms']:.2f} ms for the next token (roofline bound {r['roofline_ms']:.3f} ms); "
          f"generating all {seq_len} tokens without a cache processes {passes:,} token positions, with one: {seq_len:,}")


cost_at(pick(1024, 64))
slider(cost_at, seq_len=(16, max_len, 16, pick(1024, 64)))

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
    "timing_dtype": str(dtype).removeprefix("torch."),
}
print(save_results("01_naive_attention", metrics, dtype=dtype, model=hf.config.name_or_path))
