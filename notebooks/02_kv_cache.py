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
# # 02 · The KV cache, and a decode loop at the memory-bandwidth limit
#
# Notebook 01 generated text by re-running the whole sequence for every new token. But the keys
# and values of past tokens never change: a **KV cache** stores them, so each step computes q, k, v
# for one new token and attends over the stored past. This notebook
#
# 1. builds two KV caches (a growing one and a preallocated **static** one) and plugs them into the
#    lab decoder through its cache seam, checking that the text does not change;
# 2. predicts the cache's size from first principles and checks the prediction against the
#    allocator;
# 3. measures what the cache saves as sequences grow;
# 4. builds a **decode engine** that runs at the memory-bandwidth limit: at batch 1 a step must read
#    every weight once, so tokens/s ≤ bandwidth / bytes. On a Qwen2.5-7B **shape twin** (its exact
#    architecture with random weights: right for speed, meaningless for text) we go from Hugging
#    Face `generate` (about 14% of that limit on an H100) to within about 15% of it, one overhead
#    at a time, then sweep the batch size towards the point where decoding stops being
#    memory-bound.

# %%
import time

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from labutils import configs, kv_cache, roofline
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine, hf_decode_tok_s
from labutils.generate import decode_step_ms, encode_prompt, greedy_cached, greedy_no_cache
from labutils.gemv import GemvLinear
from labutils.hardware import copy_bandwidth_gbps, matmul_peak_tflops
from labutils.models import load_model, shape_twin
from labutils.notebook import setup, show_source, slider
from labutils.results import save_results
from labutils.runtime import default_dtype, has_cuda, pick

device = setup()

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
# 5). The **static cache** preallocates `max_seq_len` positions and writes the new keys and values
# in place at `input_pos`. Positions not yet written hold zeros; the causal mask (a key is visible
# iff its position ≤ the query's) already hides them.

# %%
show_source(kv_cache.StaticKVCache.update)
show_source(greedy_cached)

# %% [markdown]
# ## 2. Check: the cache must not change a single token
#
# On the embedded model in fp32: greedy text without a cache (notebook 01's loop), with the
# concatenating cache and with the static cache; and the logits of every cached step against the
# no-cache forward at the same position.

# %%
hf, tok = load_model()  # SmolLM2-135M-Instruct, real weights, fp32
model = Decoder.from_hf(hf)
ids = encode_prompt(tok, "Give me three tips for writing clear code.", device=device)
n_new = pick(48, 24)
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

# %% [markdown]
# ## 3. How big is the cache? Predict, then measure
#
# Per token: 2 (K and V) × n_layer × n_kv_head × head_dim × bytes per value (notebook 00). We
# allocate static caches for the Qwen2.5-7B shape and compare the formula with what the CUDA
# allocator actually handed out (on a CPU smoke run, the buffers' own byte counts).

# %%
kv_arch = pick("Qwen2.5-7B", "SmolLM2-135M")
kv_ctx = pick(32768, 1024)
cfg = configs.arch(kv_arch)
kv_dtype = default_dtype()
kv_bytes_predicted = roofline.kv_cache_bytes(cfg, kv_ctx, batch=1, dtype_bytes=torch.finfo(kv_dtype).bits // 8)
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
print(f"{kv_arch}, batch 1, {kv_ctx:,} positions, {kv_dtype}: predicted {kv_bytes_predicted / 2**20:,.1f} MiB, "
      f"measured {kv_bytes_measured / 2**20:,.1f} MiB, ratio {kv_bytes_measured / kv_bytes_predicted:.4f}")

# %% [markdown]
# The same formula for the models people deploy, at their full context, in bf16; the last columns
# show what grouped-query attention saves (the same model with one KV head per query head) and what
# a smaller dtype would.

# %%
rows = []
for name, ctx in [("Llama-2-7B", 4096), ("Llama-2-70B", 4096), ("Llama-3-8B", 131072),
                  ("Qwen2.5-7B", 32768), ("Mistral-7B", 32768)]:
    c = configs.arch(name)
    mha = dict(c, num_key_value_heads=c["num_attention_heads"])
    rows.append({"model": name + (" (Llama-3.1 context)" if ctx == 131072 else ""), "context": ctx,
                 "q / kv heads": f"{c['num_attention_heads']} / {c['num_key_value_heads']}",
                 "KiB/token": roofline.kv_bytes_per_token(c, 2) / 2**10,
                 "GiB/sequence bf16": roofline.kv_cache_bytes(c, ctx, 1, 2) / 2**30,
                 "GiB if MHA": roofline.kv_cache_bytes(mha, ctx, 1, 2) / 2**30,
                 "GiB fp32": roofline.kv_cache_bytes(c, ctx, 1, 4) / 2**30,
                 "GiB fp8": roofline.kv_cache_bytes(c, ctx, 1, 1) / 2**30,
                 "weights GiB bf16": configs.param_count(c) * 2 / 2**30})
print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %% [markdown]
# One Llama-3-8B sequence at 128k tokens holds 16 GiB of cache, as much as the model; without GQA it
# would be 64 GiB. Llama-2-70B's 8 KV heads make its cache smaller than Llama-2-7B's.
#
# ## 4. What the cache saves
#
# Without a cache, the step that produces token n+1 runs all n tokens through the model; with
# one, it runs one token and reads n cached keys/values. We time single steps of both as the
# context grows, with `decode_step_ms` (also used by notebook 01), on the model whose speed this
# notebook is after: on a GPU the **Qwen2.5-7B shape twin** in bf16 (its exact architecture with
# random weights: time depends on shapes, not on values; it is the model of sections 5 and 6), on
# a CPU the embedded model's shape in fp32 at small sizes.

# %%
show_source(decode_step_ms)

# %%
twin_arch = pick("Qwen2.5-7B", "SmolLM2-135M")
twin_dtype = pick(torch.bfloat16, torch.float32)
twin = shape_twin(twin_arch, dtype=twin_dtype)  # random weights: speed only
tcfg = configs.arch(twin_arch)
lab = Decoder.from_hf(twin)
max_len = lab.cfg.max_seq_len


def step_costs(n: int) -> dict:
    """ms of the step after a context of n tokens, without and with a static KV cache [shape twin]."""
    return {"context n": n, "no cache": decode_step_ms(lab, n, rep_ms=pick(200, 30)),
            "static KV cache": decode_step_ms(lab, n, cached=True, rep_ms=pick(200, 30))}


lengths = pick([64, 256, 1024, 2048, 4096, 8192, 16384], [16, 64, 128])
costs = pd.DataFrame([step_costs(n) for n in tqdm(lengths, desc="step costs")])
costs["no cache / cache"] = costs["no cache"] / costs["static KV cache"]
print(f"{twin_arch} shape twin, {str(twin_dtype)[6:]}, eager decoder, ms per step:")
print(costs.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
long = costs.drop(columns="no cache / cache").melt(id_vars="context n", var_name="method", value_name="ms")
px.line(long, x="context n", y="ms", color="method", markers=True, log_x=True, log_y=True,
        title=f"One decode step after n tokens, {twin_arch} shape twin ({str(twin_dtype)[6:]})",
        labels={"ms": "ms per new token", "context n": "context n (tokens)"}).show()

# %% [markdown]
# Generating n tokens costs n(n+1)/2 token passes without a cache and n with one: O(n²) against
# O(n) in the linear layers (attention over the cache still grows with n, but that is a read of
# n·56 KiB per step on this shape, small next to 15 GB of weights until n reaches tens of thousands).
#
# **Reading the table.** With the cache the step costs about the same, ~21 ms, at every context
# length: in this eager loop it is bound by launching ~1,400 small kernels from Python (counted in
# section 5, which brings the same step down to ~5.6 ms), not by the weights or the cache. Without
# the cache the step grows with n once the n-token forward's ~2·7.6e9·n FLOPs outweigh that fixed
# cost: from ~1k tokens on the H100, up to ~25× the cached step at 16k tokens, and a generation
# of n tokens pays that growing price at every step. Below ~1k tokens the uncached step is even a
# little cheaper here: both are launch-bound, and the cached step launches two more kernels per
# layer (the cache writes). Eager timings of a launch-bound GPU also move with the CPU's mood (the
# slider's single measurement below can differ from the table's by 2×); section 5's captured steps
# do not. On a 135M-parameter model the H100 cannot show the O(n²) cost at all (notebook 01: both
# sit at ~20-35 ms), which is why this section uses the 7B shape.

# %%
def compare_at(seq_len: int = 512):
    try:
        r = step_costs(seq_len)
    except ValueError as e:
        print(e)
        return
    print(f"context {seq_len}: {r['no cache']:.2f} ms without a cache, {r['static KV cache']:.2f} ms with one "
          f"({r['no cache'] / r['static KV cache']:.1f}x) [shape twin]; to generate {seq_len} tokens: "
          f"{seq_len * (seq_len + 1) // 2:,} token passes without, {seq_len:,} with")


compare_at(pick(512, 64))
slider(compare_at, seq_len=(16, max_len, 16, pick(512, 64)))

# %% [markdown]
# ## 5. A decode engine at the bandwidth limit
#
# **Prediction.** At batch 1 each step reads every weight that takes part in a matmul (all layers
# and the lm_head; of the embedding table only one row) plus the KV cache. On the Qwen2.5-7B shape
# that is 14.1 GB in bf16, so at the copy bandwidth W measured below no loop can exceed
# W / 14.1 GB tokens/s. (A looser convention divides W by the whole model, 15.2 GB including the
# embedding table; we print both ratios.)
#
# The engine removes what stands between a Python loop and that limit, in stages:
#
# | stage | what it removes |
# |---|---|
# | `eager` | the dynamic cache (static cache: no allocation, fixed shapes) |
# | `graph` | the ~1,400 kernel launches Python makes per token (counted below): the step is captured once in a CUDA graph and replayed |
# | `compile` | small kernels: Inductor fuses norms, RoPE, SwiGLU and residuals |
# | `+ fused + GEMV` | short matmuls: q/k/v and gate/up concatenated into single passes, and a Triton matrix-vector kernel (`labutils/gemv.py`) through the linear-layer seam |
#
# All of them run in this same process, after HF transformers' `generate`, with the bandwidth
# measured first.

# %%
show_source(DecodeEngine._step)
show_source(DecodeEngine._capture)

# %%
copy_gbps = copy_bandwidth_gbps()["gbps"]
prompt_len, n_decode = 32, pick(128, 8)
ctx = prompt_len + n_decode
bytes_read = roofline.decode_step(tcfg, 1, ctx, torch.finfo(twin_dtype).bits // 8)["bytes"]
model_bytes = configs.param_count(tcfg) * torch.finfo(twin_dtype).bits // 8
roofline_tok_s_bytes_read = copy_gbps * 1e9 / bytes_read
roofline_tok_s = copy_gbps * 1e9 / model_bytes
print(f"{twin_arch} shape twin ({twin_dtype}): bytes read per step {bytes_read / 1e9:.2f} GB, model {model_bytes / 1e9:.2f} GB")
print(f"copy bandwidth {copy_gbps:,.0f} GB/s -> roofline {roofline_tok_s_bytes_read:,.1f} tok/s (bytes read), "
      f"{roofline_tok_s:,.1f} tok/s (model bytes)")
twin_ids = torch.randint(0, tcfg["vocab_size"], (1, prompt_len), device=device)

# %%
speeds = {}


def record(name, tok_s):
    speeds[name] = tok_s
    print(f"{name:<36} {tok_s:8.1f} tok/s   {tok_s / roofline_tok_s_bytes_read:6.1%} of bytes-read roofline   "
          f"{tok_s / roofline_tok_s:6.1%} of model-bytes roofline   [shape twin]")


record("HF generate (dynamic cache)", hf_decode_tok_s(twin, twin_ids, n=pick(64, 8)))
if has_cuda():
    try:  # transformers compiles the forward itself when the cache is static
        record("HF generate (static cache + compile)",
               hf_decode_tok_s(twin, twin_ids, n=64, static_cache_len=prompt_len + 64))
    except Exception as e:  # noqa: BLE001  (report and go on: this baseline is optional)
        print(f"HF static cache + compile did not run: {type(e).__name__}: {str(e)[:200]}")
    torch._dynamo.reset()

if has_cuda():  # how many GPU operations does one eager step launch?
    from torch.profiler import ProfilerActivity, profile

    probe = DecodeEngine(lab, batch=1, max_seq_len=ctx + 8, mode="eager")
    probe.prefill(twin_ids)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        probe.decode(1)
        torch.cuda.synchronize()
    n_ops = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"one eager decode step launches {n_ops:,} GPU operations ({n_ops / tcfg['num_hidden_layers']:.0f} per layer)")
    del probe
for mode in pick(["eager", "graph", "compile"], ["eager"]):
    t0 = time.perf_counter()
    engine = DecodeEngine(lab, batch=1, max_seq_len=ctx + 8, mode=mode)
    record(f"lab engine: {mode}", engine.decode_tok_s(twin_ids, n_decode))
    del engine
    torch._dynamo.reset()
if has_cuda():
    final = Decoder.from_hf(twin).fuse_projections().swap_linears(lambda name, lin: GemvLinear(lin))
    engine = DecodeEngine(final, batch=1, max_seq_len=ctx + 8, mode="compile")
    record("lab engine: compile + fused + GEMV", engine.decode_tok_s(twin_ids, n_decode))
    del engine, final
    torch._dynamo.reset()
    torch.cuda.empty_cache()
engine_bs1_tok_s = max(v for k, v in speeds.items() if k.startswith("lab"))
hf_generate_bs1_tok_s = speeds["HF generate (dynamic cache)"]

# %%
sp = pd.DataFrame({"method": list(speeds), "tok/s": list(speeds.values())})
fig = px.bar(sp, x="tok/s", y="method", orientation="h", text_auto=".0f",
             title=f"Batch-1 decode, {twin_arch} shape twin ({str(twin_dtype)[6:]}), one run on {torch.cuda.get_device_name() if has_cuda() else 'CPU'}")
fig.add_vline(x=roofline_tok_s_bytes_read, line_dash="dash", annotation_text="roofline (bytes read)")
fig.add_vline(x=roofline_tok_s, line_dash="dot", annotation_text="W / model bytes")
fig.update_layout(height=380, yaxis={"categoryorder": "total ascending"})
fig.show()

# %% [markdown]
# What each stage bought, read off the bars: the eager loop is bound by Python and kernel
# launches, not by the GPU (its step takes several times the 4.7 ms of memory traffic); so is HF's
# `generate` with its default dynamic cache. Given a static cache, transformers compiles its own
# forward and captures CUDA graphs too, and lands close to the lab's `compile` stage; the rest of
# the gap is what follows. Replaying
# a CUDA graph makes the CPU's cost per token one launch. Compiling fuses the small elementwise
# kernels that sat between the matmuls. The last few percent come from the matmuls themselves:
# at batch 1 each is a single pass over a weight matrix, and a pass of 25-140 MB spends a
# noticeable share of its time ramping up and down; concatenating q/k/v and gate/up makes fewer,
# longer passes, and the Triton kernel streams the large ones (the lm_head above all) closer to
# the copy bandwidth than cuBLAS's matrix-vector kernel does.
#
# ## 6. When does decoding stop being memory-bound?
#
# A batch of B sequences shares each read of the weights, so tokens/s should grow ~B× for free
# until compute (or the per-sequence KV reads) takes over. The sweep uses the CUDA-graph engine
# with fused projections (cuBLAS matmuls: with B > 1 rows the GEMV kernel hands over to cuBLAS),
# capturing one graph per batch size.

# %%
peak = matmul_peak_tflops(torch.bfloat16)[0] if has_cuda() else matmul_peak_tflops(torch.float32)[0]
swept = Decoder.from_hf(twin).fuse_projections() if has_cuda() else lab
sweep_rows = []
for B in tqdm(pick([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], [1, 4]), desc="batch sweep"):
    engine = DecodeEngine(swept, batch=B, max_seq_len=ctx + 8, mode=pick("graph", "eager"))
    ids_b = torch.randint(0, tcfg["vocab_size"], (B, prompt_len), device=device)
    tok_s = engine.decode_tok_s(ids_b, pick(64, 4), repeats=2)
    step = roofline.decode_step(tcfg, B, ctx, torch.finfo(twin_dtype).bits // 8)
    bound = roofline.decode_tok_s_bound(tcfg, peak, copy_gbps, B, ctx, torch.finfo(twin_dtype).bits // 8)
    mem_only = B * copy_gbps * 1e9 / step["bytes"]
    sweep_rows.append({"batch": B, "tok/s": tok_s, "roofline tok/s": bound, "memory-only bound": mem_only,
                       "% of roofline": tok_s / bound, "TFLOP/s": tok_s / B * step["flops"] / 1e12,
                       "FLOP/byte": step["flops"] / step["bytes"],
                       "bound by": "compute" if bound < mem_only * (1 - 1e-9) else "memory"})
    del engine
sweep = pd.DataFrame(sweep_rows)
print(f"[shape twin] ridge point {peak * 1e12 / (copy_gbps * 1e9):,.0f} FLOP/byte ({peak:,.1f} TFLOP/s, {copy_gbps:,.0f} GB/s)")
print(sweep.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

fig = go.Figure()
fig.add_trace(go.Scatter(x=sweep["batch"], y=sweep["tok/s"], mode="lines+markers", name="lab engine (measured)"))
fig.add_trace(go.Scatter(x=sweep["batch"], y=sweep["roofline tok/s"], mode="lines", name="roofline bound", line_dash="dash"))
fig.add_trace(go.Scatter(x=sweep["batch"], y=sweep["memory-only bound"], mode="lines", name="if it stayed memory-bound", line_dash="dot"))
fig.update_xaxes(type="log", title="batch size")
fig.update_yaxes(type="log", title="tokens/s (all sequences)")
fig.update_layout(title=f"Decode throughput vs batch, {twin_arch} shape twin", height=420)
fig.show()

# %% [markdown]
# The measured line climbs almost in step with the memory bound up to B = 256: 256 sequences decode
# ~160× as many tokens per second as one, because they ride on the same weight reads (the share of
# the bound falls slowly, ~61% → ~46%, as matmuls with more rows and the per-sequence attention
# take longer). Decode's arithmetic intensity is ≈ B FLOP/byte in bf16, so the roofline turns
# where B reaches the ridge point, ~240 FLOP/byte on this H100 (printed above): from B = 512 the
# bound is the tensor cores, and the measured line bends with it: doubling the batch from 256 to
# 512 buys 1.3×, from 512 to 1024 only 1.1×, at ~390-430 TFLOP/s (55-60% of the measured matmul
# peak: skinny matmuls of 512-1024 rows, plus attention and norms that do not use the tensor cores).
# Longer contexts push the turn further out (more KV bytes per sequence). Serving systems
# (notebook 06) live in that region.
#
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
if has_cuda():  # the fastest configuration, also in fp32 on real weights (not checked by nbval: GPU only)
    full_engine = DecodeEngine(Decoder.from_hf(hf).fuse_projections().swap_linears(lambda n, l: GemvLinear(l)),
                               batch=1, max_seq_len=ids.shape[1] + n_new, mode="compile")
    fast_out = full_engine.generate(ids, n_new)
    print(f"compile + fused + GEMV engine text == HF text: {tok.decode(fast_out[0, :n_hf]) == tok.decode(hf_out[0])}")
    del full_engine
    torch._dynamo.reset()

# %% [markdown]
# ## 8. Results

# %%
metrics = {
    "roofline_tok_s": roofline_tok_s, "roofline_tok_s_bytes_read": roofline_tok_s_bytes_read,
    "engine_bs1_tok_s": engine_bs1_tok_s, "hf_generate_bs1_tok_s": hf_generate_bs1_tok_s,
    "engine_vs_roofline": engine_bs1_tok_s / roofline_tok_s,
    "engine_vs_roofline_bytes_read": engine_bs1_tok_s / roofline_tok_s_bytes_read,
    "bs1_tok_s_by_method": speeds, "copy_gbps": copy_gbps, "shape_twin": twin_arch,
    "kv_bytes_predicted": kv_bytes_predicted, "kv_bytes_measured": kv_bytes_measured,
    "kv_config": {"arch": kv_arch, "positions": kv_ctx, "dtype": str(kv_dtype)[6:]},
    "batch_sweep": sweep.to_dict(orient="records"), "step_ms_vs_context": costs.to_dict(orient="records"),
    "cache_logits_rel_err": cache_rel_err, "engine_text_matches_hf": same_text,
}
print(save_results("02_kv_cache", metrics, dtype=twin_dtype, note="tok/s measured on a random-weight shape twin"))
