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
# # 06 · Serving many requests: paged KV cache, continuous batching, prefix caching
#
# Notebooks 02-05 made one sequence fast. A server faces something else: many requests at once,
# of lengths it does not know in advance, arriving while others are half done. Two resources decide
# how many tokens per second it can produce: **memory for the KV cache** (how many sequences fit
# at once) and **the schedule** (whether every forward is full of useful rows). This notebook
# builds, on the lab decoder, the pieces that vLLM made standard, and measures each against what
# came before it:
#
# 1. why a contiguous KV reservation per request wastes most of its memory, and how **paging** (a
#    block pool and a block table per sequence) cuts the waste to under one block per sequence;
# 2. the paged attention kernel, checked against a reference, and the **block size chosen by
#    measurement**;
# 3. **continuous batching** (iteration-level scheduling: admit and retire requests at every step,
#    chunked prefill mixed with decodes, preemption by recompute), checked: every request's greedy
#    output equals the same request run alone, on real weights, with everything switched on;
# 4. **CUDA graphs** for the decode steps, at bucketed batch sizes;
# 5. throughput and latency on one trace: continuous batching against **static batching** (the
#    lab decoder, fixed padded batches), **HF `generate`** (padded batches) and **vLLM**;
# 6. **prefix caching**: the time to first token with a shared 1k-token system prompt, cold and warm;
# 7. a live **OpenAI-compatible server** over the engine, queried with the official `openai` client.
#
# Speeds come from a **shape twin** of Qwen2.5-7B (its exact architecture, random weights: the
# speed is the real model's, the text is noise). Correctness and the server use the embedded
# SmolLM2-135M-Instruct with its real weights.

# %%
import json
import os
import subprocess
import sys
import time

import openai
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from labutils import configs
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.models import load_model, shape_twin
from labutils.notebook import setup, show_source, slider
from labutils.paged_attention import paged_decode, paged_decode_ref
from labutils.paged_cache import BlockPool, BlockTable
from labutils.results import REPO, save_results
from labutils.runtime import has_cuda, pick
from labutils.scheduler import ContinuousEngine
from labutils.serve import make_server
from labutils.serving import Request, SequentialEngine, StaticBatchEngine, run_to_completion
from labutils.trace import (Lengths, TraceSpec, format_metrics, make_trace, replay_all_at_once, replay_engine,
                            replay_hf_generate, replay_server, serving_metrics)

device = setup()
GPU = has_cuda()
FULL = GPU and pick(True, False)  # the full sizes: a GPU, not a smoke run

# %% [markdown]
# ## 1. The memory problem
#
# A sequence's KV cache grows by one position per token, and a server does not know how long a
# request will run. Before paging, a server reserved one contiguous region per request, large
# enough for the longest sequence it allows (`max_seq_len`), when the request was admitted. Most of
# that region is empty most of the time: a request that has read a 300-token prompt and written 20
# tokens holds 320 positions of a 1,536-position reservation. The vLLM paper measured 20-38% of KV
# memory holding real tokens in such systems.
#
# The **KV utilization** of a cache is the share of the positions it has allocated that hold a
# live token's keys and values. The trace this notebook serves (its full size on the GPU):

# %%
twin_arch = "Qwen2.5-7B"
arch = configs.arch(twin_arch)
SPEC = TraceSpec(n=256, rate=None, prompt_len=Lengths("uniform", 64, 1024), output_len=Lengths("uniform", 32, 512),
                 prompts="random", seed=0)
MAX_LEN = SPEC.prompt_len.hi + SPEC.output_len.hi
kv_bytes_per_token = 2 * arch["num_hidden_layers"] * arch["num_key_value_heads"] * arch["head_dim"] * 2  # K, V in bf16
print(f"trace: {SPEC.describe()}")
print(f"{twin_arch}: {kv_bytes_per_token / 1024:.0f} KiB of KV per token; a contiguous reservation of "
      f"max_seq_len = {MAX_LEN} positions is {MAX_LEN * kv_bytes_per_token / 2**20:.0f} MiB per request")

# %% [markdown]
# **Predict first.** All 256 requests are admitted at once, each with a contiguous reservation of
# 1,536 positions. Averaged over the run, what share of the reserved positions holds a live token?
# (Each request's live length grows from its prompt length to prompt + output; prompts average 544
# tokens and outputs 272. Longer requests stay longer.) Write your guess; section 5 measures it.

# %%
my_contiguous_utilization = None  # e.g. 0.4

# %% [markdown]
# **Exercise 1.** Paging hands out memory in blocks of `block_size` positions, one more block
# whenever a sequence's last block is full. Given the current lengths of the sequences, what share
# of the allocated slots holds tokens?

# %%
def paged_kv_utilization(lengths, block_size):
    ### BEGIN SOLUTION
    allocated = sum(-(-L // block_size) for L in lengths) * block_size
    return sum(lengths) / allocated if allocated else 1.0
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("paged_kv_utilization", paged_kv_utilization)

# %% [markdown]
# Only a sequence's last block is partly empty, so the waste is under `block_size` positions per
# sequence, whatever `max_seq_len` is. The slider shows the utilization of the trace's sequences
# at the end of their lives (prompt + output) for each block size, beside a contiguous
# reservation of `max_seq_len`.

# %%
trace_lengths = [len(r.prompt) + r.max_tokens for r in make_trace(SPEC, vocab_size=arch["vocab_size"])]


def block_waste(block_size=16):
    """Paged utilization of the trace's final lengths at ``block_size``, vs a max_seq_len reservation."""
    paged = paged_kv_utilization(trace_lengths, block_size)
    contiguous = sum(trace_lengths) / (len(trace_lengths) * MAX_LEN)
    print(f"block_size {block_size:4d}: paged {paged:.1%} of allocated slots hold tokens "
          f"(waste {1 - paged:.2%}); contiguous reservation of {MAX_LEN}: {contiguous:.1%}")
    return paged


block_waste(16)
slider(block_waste, block_size=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])

# %% [markdown]
# ## 2. The paged KV cache
#
# `BlockPool` holds every layer's keys and values in one tensor of `num_blocks` blocks of
# `block_size` positions, with a free list and reference counts. A `BlockTable` per sequence maps
# its logical blocks (positions 0..15, 16..31, ...) to physical blocks anywhere in the pool; token
# `i` lives in slot `blocks[i // block_size] * block_size + i % block_size`. Below, three sequences
# in a pool of 12 blocks of 4: A and B share an 8-token system prompt, whose two full blocks B
# found in the prefix cache instead of computing them (section 6); C is unrelated.

# %%
pool = BlockPool(n_layer=1, num_blocks=12, block_size=4, n_kv_head=1, head_dim=16)
system = [101, 102, 103, 104, 105, 106, 107, 108]
seqs = {"A": system + [1, 2, 3], "B": system + [7, 8, 9, 10, 11], "C": [50, 51, 52, 53, 54, 55]}
tables = {}
for name, ids in seqs.items():
    t = BlockTable(pool)
    cached = t.use_cached_prefix(ids)
    t.append_slots(len(ids) - cached, ids[cached:])
    tables[name] = t
    print(f"{name}: {len(ids)} tokens, {cached} from the prefix cache -> {t}")


def block_table_diagram(tables, pool):
    """Each sequence's logical blocks (left) pointing at physical blocks of the pool (right)."""
    colors = {"A": "#7fb3e6", "B": "#8fd19e", "C": "#f4c27f"}
    fig = go.Figure()
    owners = {}
    for name, t in tables.items():
        for b in t.blocks:
            owners.setdefault(b, []).append(name)
    for b in range(pool.num_blocks):  # the pool, one column
        who = owners.get(b, [])
        color = "#c9b3e6" if len(who) > 1 else colors[who[0]] if who else "#f0f0f0"
        fig.add_shape(type="rect", x0=6, x1=7.6, y0=-b - 0.9, y1=-b, fillcolor=color, line_color="#555")
        label = f"block {b}: " + ("+".join(who) + f" ({pool.fill[b]}/{pool.block_size})" if who else "free")
        fig.add_annotation(x=6.8, y=-b - 0.45, text=label, showarrow=False, font_size=11)
    y = 0
    for name, t in tables.items():
        for i, b in enumerate(t.blocks):
            n = min(pool.block_size, t.num_tokens - i * pool.block_size)
            fig.add_shape(type="rect", x0=1, x1=2.6, y0=y - 0.9, y1=y, fillcolor=colors[name], line_color="#555")
            fig.add_annotation(x=1.8, y=y - 0.45, text=f"{name}[{i}]: pos {i * 4}-{i * 4 + n - 1}", showarrow=False,
                               font_size=11)
            fig.add_annotation(x=6, y=-b - 0.45, ax=2.6, ay=y - 0.45, xref="x", yref="y", axref="x", ayref="y",
                               showarrow=True, arrowhead=2, arrowcolor="#777", text="")
            y -= 1
        y -= 0.5
    fig.add_annotation(x=1.8, y=0.6, text="block tables (logical blocks)", showarrow=False, font_size=13)
    fig.add_annotation(x=6.8, y=0.6, text="block pool (physical blocks)", showarrow=False, font_size=13)
    fig.update_xaxes(visible=False, range=[0.5, 8.2])
    fig.update_yaxes(visible=False, range=[-pool.num_blocks - 0.5, 1.1])
    fig.update_layout(title="Paged KV cache: block tables map logical blocks to physical ones (purple: shared)",
                      height=520, width=760, plot_bgcolor="white")
    return fig


show(block_table_diagram(tables, pool))
for t in tables.values():
    t.release()

# %% [markdown]
# **Exercise 2.** Allocate the slots for `n` new tokens of a sequence that already holds
# `num_tokens` positions in `blocks`: take new blocks from the front of `free` when needed, and
# return the new block list and the slot of each new token. (The package's version, below, also
# keys every block that becomes full for the prefix cache.)

# %%
def append_slots(blocks, num_tokens, n, free, block_size):
    ### BEGIN SOLUTION
    blocks, free = list(blocks), list(free)
    while len(blocks) * block_size < num_tokens + n:
        blocks.append(free.pop(0))
    slots = [blocks[p // block_size] * block_size + p % block_size for p in range(num_tokens, num_tokens + n)]
    return blocks, slots
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("append_slots", append_slots)

# %%
show_source(BlockTable.append_slots)

# %% [markdown]
# ## 3. Attention over pages
#
# A decode step of B sequences reads each one's keys and values from its own blocks. The Triton
# kernel `paged_decode` is notebook 03's split-KV decode (FlashDecoding) with one change: the
# address of position `n` comes from the block table, `page = block_table[b, n // block_size]`.
# A program takes one KV head of one sequence and a range of whole pages; the GQA query heads
# sharing that KV head are the rows of its tile, so each byte of K and V is read once.
# Check against the torch reference (gather the pages, naive attention), on ragged lengths and
# shuffled pages:

# %%
def random_pages(B, lengths, n_kv_head, head_dim, block_size, dtype, n_head=None, seed=0):
    """Random K/V pages for sequences of ``lengths`` in a shuffled pool, their block tables, and q."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-L // block_size) for L in lengths]
    num_blocks = sum(pages) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k = torch.randn(num_blocks, n_kv_head, block_size, head_dim, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, n_kv_head, block_size, head_dim, generator=g).to(device, dtype)
    tables = torch.zeros(B, max(pages), dtype=torch.int32)
    i = 0
    for b, p in enumerate(pages):
        tables[b, :p] = torch.tensor(perm[i:i + p], dtype=torch.int32)
        i += p
    q = torch.randn(B, n_head or 4 * n_kv_head, head_dim, generator=g).to(device, dtype)
    return q, k, v, tables.to(device), torch.tensor(lengths, dtype=torch.int32, device=device)


check_dtype = torch.float16 if GPU else torch.float32
q, kc, vc, bt, lens = random_pages(5, [1, 17, 64, 100, 33], n_kv_head=2, head_dim=64, block_size=16,
                                   dtype=check_dtype)
out, ref = paged_decode(q, kc, vc, bt, lens), paged_decode_ref(q, kc, vc, bt, lens)
rel = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
print(f"paged_decode vs the reference, {check_dtype}: max|diff|/max|ref| = {rel:.1e}")
assert rel < (2e-3 if check_dtype == torch.float16 else 1e-5)

# %% [markdown]
# ### The block size, by measurement
#
# Small blocks waste less memory (section 1) but give the kernel short tiles and many table
# lookups; large blocks read long contiguous runs but waste up to a block per sequence and make
# prefix sharing coarser (only full blocks are shared). Time the decode kernel on the 7B twin's
# attention shape (28 query heads over 4 KV heads, head_dim 128, bf16), 64 sequences of 1,024
# positions, for each block size, in GB/s of K and V read; the block size is the smallest within
# 5% of the fastest.

# %%
def time_block_sizes(sizes=(8, 16, 32, 64, 128), B=64, L=1024):
    rows = []
    for bs in sizes:
        q, kc, vc, bt, lens = random_pages(B, [L] * B, n_kv_head=arch["num_key_value_heads"], head_dim=arch["head_dim"],
                                           block_size=bs, dtype=torch.bfloat16, n_head=arch["num_attention_heads"])
        ms = time_fn(lambda: paged_decode(q, kc, vc, bt, lens), rep_ms=100).median_ms
        kv_bytes = 2 * B * L * arch["num_key_value_heads"] * arch["head_dim"] * 2
        rows.append({"block_size": bs, "us": ms * 1e3, "GB/s": kv_bytes / ms / 1e6,
                     "trace utilization": paged_kv_utilization(trace_lengths, bs)})
    return pd.DataFrame(rows)


if GPU:
    bs_df = time_block_sizes()
    best = bs_df["us"].min()
    BLOCK_SIZE = int(bs_df[bs_df["us"] <= 1.05 * best]["block_size"].min())
    print(bs_df.to_string(index=False, float_format=lambda x: f"{x:,.3f}"))
    show(px.bar(bs_df, x="block_size", y="GB/s", text_auto=".0f", height=340,
                title=f"paged_decode: {twin_arch} attention shape, 64 x 1024 positions, bf16"))
else:
    bs_df, BLOCK_SIZE = None, 16
    print("the kernel is not timed on a CPU (Triton's interpreter); block size 16")
print(f"block size: {BLOCK_SIZE}")

# %% [markdown]
# ## 4. Continuous batching
#
# A static batch runs a fixed set of requests until the longest is done; a request that arrives
# meanwhile waits, and rows of finished requests keep computing nothing useful. Orca's
# **iteration-level scheduling** chooses the batch anew at every step. `ContinuousEngine.step()`:
#
# 1. running sequences, oldest first, get their next tokens: one for a decoding sequence, a chunk
#    of the prompt for one still prefilling (**chunked prefill**: a long prompt no longer stalls the
#    others' decodes), within a budget of new tokens per step. When the pool has no block for them,
#    the **newest** running sequence is **preempted**: its blocks are freed, and it goes back to the
#    front of the queue with its generated tokens appended to its prompt (its KV is recomputed
#    later; the prefix cache often keeps most of it);
# 2. waiting requests are admitted, first come first served, while the budget and the blocks allow;
# 3. one forward over all the new tokens, flattened as one ragged row, paged attention per sequence;
#    each sequence whose tokens are all in the cache draws its next one; those at their limit
#    retire, and their blocks go back to the pool.

# %%
show_source(ContinuousEngine._schedule)

# %% [markdown]
# ### Correctness: every request as if it ran alone
#
# Greedy decoding is deterministic, so batching must not change any token. On the embedded model
# with real weights (fp32), with paging, continuous batching, chunked prefill, prefix caching (a
# shared system prompt) and a pool too small for all requests at once (preemption) switched on,
# every request's output is compared with the same request run alone through the batch-1 engine.
# Decode-only steps run padded to their bucket (section 4b; captured as CUDA graphs on a GPU).

# %%
hf32, tok = load_model(dtype=torch.float32, device=device)
m32 = Decoder.from_hf(hf32)
system_prompt = tok("You are a careful assistant. Answer briefly, in plain words, and never invent facts. ").input_ids
chk_spec = TraceSpec(n=pick(24, 3), rate=None, prompt_len=pick(Lengths("uniform", 16, 200), Lengths("uniform", 6, 14)),
                     output_len=pick(Lengths("uniform", 8, 64), Lengths("uniform", 8, 12)), prompts="text", seed=1)
chk_trace = make_trace(chk_spec, tok)
chk_requests = [Request(f"c{r.index}", (system_prompt if r.index % 2 == 0 else []) + r.prompt, r.max_tokens)
                for r in chk_trace]
demand = sum(len(r.prompt) + r.max_tokens for r in chk_requests)
chk_blocks = max(-(-max(len(r.prompt) + r.max_tokens for r in chk_requests) // 8) + 1, demand // 8 // 3)  # ~1/3 of it
engine = ContinuousEngine(m32, num_blocks=chk_blocks, block_size=8, max_batch=pick(16, 3),
                          max_num_batched_tokens=pick(128, 16), max_seq_len=pick(512, 64),
                          graphs="auto" if GPU else "bucketed")
engine.capture()
together = run_to_completion(engine, chk_requests)
alone = {r.id: run_to_completion(SequentialEngine(m32, pick(512, 64)), [r])[r.id] for r in tqdm(chk_requests, desc="alone")}
mismatch = [r.id for r in chk_requests if together[r.id] != alone[r.id]]
st = engine.stats()
outputs_match_alone = not mismatch
print(f"{len(chk_requests)} requests, {demand} KV positions of demand in a pool of {chk_blocks} blocks of 8: "
      f"{st['preemptions']} preemptions, {st['prefix_cached_tokens']} prompt tokens from the prefix cache, "
      f"{st['mixed_steps']} steps mixing prefill chunks and decodes, {st['graph_steps']} padded decode steps")
print(f"every output equals the request alone: {outputs_match_alone}")
for rid in mismatch:  # checked again after the results are saved
    a, b = together[rid], alone[rid]
    i = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
    print(f"  {rid}: first difference at output token {i}: {a[i]} batched vs {b[i]} alone")
assert st["preemptions"] > 0 and st["prefix_cached_tokens"] > 0, "the run was meant to preempt and hit the prefix cache"

# %% [markdown]
# ### 4b. CUDA graphs for the decode steps
#
# A decode step of a 7B model launches over a thousand kernels; at small batches the launches, not
# the GPU, set the pace (notebook 02). A CUDA graph replays a recorded step with one launch, but
# only for the exact shapes and buffers it recorded. Continuous batching changes the batch at
# every step, so, as vLLM does, the engine records one graph per **bucket** of batch sizes (1, 2,
# 4, 8, ..., max_batch), pads each decode-only step to the next bucket, and copies its inputs into
# fixed buffers. The padding rows read and write a reserved padding block, never a sequence's.
# Steps with a prefill chunk run eagerly.
#
# **Exercise 3.** Which bucket does a decode step of `n` sequences run in?

# %%
def decode_bucket(n, max_batch):
    ### BEGIN SOLUTION
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("decode_bucket", decode_bucket)

# %%
show_source(ContinuousEngine._decode_step)

# %% [markdown]
# ## 5. Throughput and latency on one trace
#
# The trace of section 1 (256 requests, all arriving at t = 0: the offline, maximum-throughput
# case) through four systems on the same GPU, the Qwen2.5-7B shape twin in bf16:
#
# - **lab continuous**: `ContinuousEngine` (paged KV, continuous batching, chunked prefill, CUDA
#   graphs for decode steps), a KV pool of 40 GiB;
# - **lab static**: `StaticBatchEngine`, fixed batches of 64 padded requests, each batch run to its
#   longest output, a contiguous KV reservation of 64 x max_seq_len, its decode step a CUDA graph;
# - **HF generate**: transformers' `generate`, batches of 16, left padding (on the first 32 requests:
#   at its speed the whole trace would take many minutes);
# - **vLLM** 0.22's offline `LLM.generate` (`scripts/gpu/vllm_trace.py`, run first in a separate
#   process on the same GPU, with the memory vLLM gives itself; `$LAB_VLLM_PYTHONPATH`, if set, is
#   where that process finds vLLM).
#
# On a CPU every size shrinks to a few short requests on a 2-layer model of the embedded model's
# shape, and vLLM is not run: the numbers there only show that the code runs.

# %%
VLLM_JSON = REPO / "build" / "vllm_trace.json"
vllm_result = None
if FULL:
    VLLM_JSON.unlink(missing_ok=True)
    t0 = time.perf_counter()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if os.environ.get("LAB_VLLM_PYTHONPATH"):  # where vLLM is installed, for this subprocess only
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["LAB_VLLM_PYTHONPATH"], env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu" / "vllm_trace.py"), "--twin", twin_arch,
                           "--n", str(SPEC.n), "--out", str(VLLM_JSON)], capture_output=True, text=True, timeout=900,
                          env=env)
    print(f"vLLM run: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s")
    if VLLM_JSON.is_file():
        vllm_result = json.loads(VLLM_JSON.read_text())
        print({k: v for k, v in vllm_result.items() if k not in ("per_request_ttft_ms", "traceback")})
    else:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
else:
    print("vLLM was not run: " + ("a smoke run" if GPU else "no GPU on this machine"))

# %%
if FULL:
    hf7 = shape_twin(twin_arch, dtype=torch.bfloat16)
else:  # a 2-layer model of the embedded model's shape: no longer a twin, just something that runs
    twin_arch = "SmolLM2-135M"
    hf7 = shape_twin(twin_arch, dtype=torch.float32, device=device, num_hidden_layers=2)
m7 = Decoder.from_hf(hf7)
spec = SPEC if FULL else TraceSpec(n=6, rate=None, prompt_len=Lengths("uniform", 8, 40),
                                  output_len=Lengths("uniform", 4, 12), prompts="random", seed=0)
max_len = spec.prompt_len.hi + spec.output_len.hi
trace = make_trace(spec, vocab_size=m7.cfg.vocab_size)
warm_trace = make_trace(TraceSpec(n=8, rate=None, prompt_len=Lengths("uniform", 8, min(64, spec.prompt_len.hi)),
                                  output_len=Lengths("uniform", 2, min(8, spec.output_len.hi)), prompts="random",
                                  seed=99),
                        vocab_size=m7.cfg.vocab_size)
kv_per_pos = BlockPool.for_model(m7, 1, BLOCK_SIZE).bytes_per_block() // BLOCK_SIZE
num_blocks = pick(int(40 * 2**30 // (kv_per_pos * BLOCK_SIZE)), 4 * spec.n * -(-max_len // BLOCK_SIZE))
STATIC_BATCH, HF_BATCH, HF_N = pick(64, 2), pick(16, 2), pick(32, 4)
print(f"{twin_arch} shape twin ({m7.dtype}); trace: {spec.describe()}; pool {num_blocks} blocks of {BLOCK_SIZE} "
      f"({num_blocks * BLOCK_SIZE * kv_per_pos / 2**30:.1f} GiB)")


def run_continuous(**kw):
    """The trace through a fresh ContinuousEngine (after a warm-up trace and, on a GPU, every bucket's graph)."""
    e = ContinuousEngine(m7, **{"num_blocks": num_blocks, "block_size": BLOCK_SIZE, "max_batch": pick(256, 4),
                                "max_num_batched_tokens": pick(4096, 64), "max_seq_len": max_len, **kw})
    e.capture()
    replay_all_at_once(e, warm_trace)
    e.reset_kv_samples()
    m = serving_metrics(*replay_all_at_once(e, trace), engine=e)
    return m, e


results = {}
results["lab_continuous"], cont_engine = run_continuous()
print("lab continuous:", format_metrics(results["lab_continuous"]), sep="\n")

# %%
static = StaticBatchEngine(m7, max_batch=STATIC_BATCH, max_seq_len=max_len)
replay_all_at_once(static, warm_trace[:STATIC_BATCH])
before = static.stats()
results["lab_static"] = serving_metrics(*replay_all_at_once(static, trace), engine=static)
print("lab static:", format_metrics(results["lab_static"]), sep="\n")
static_stats = {k: v - before[k] for k, v in static.stats().items()}  # this trace's counts, without the warm-up
print(f"rows of the decode steps that produced a wanted token: {static_stats['useful_row_steps'] / static_stats['row_steps']:.1%}; "
      f"prefill tokens computed / prompt tokens: {static_stats['padded_prefill_tokens'] / static_stats['prompt_tokens']:.2f}")
del static

# %%
replay_hf_generate(hf7, warm_trace[:2], batch_size=2)
results["hf_generate"] = serving_metrics(*replay_hf_generate(hf7, trace[:HF_N], batch_size=HF_BATCH))
print(f"HF generate (first {HF_N} requests, batches of {HF_BATCH}):", format_metrics(results["hf_generate"]), sep="\n")

# %%
if vllm_result and vllm_result.get("ok"):
    results["vllm"] = {"output_tok_s": vllm_result["output_tok_s"], "duration_s": vllm_result["duration_s"],
                       **{k: vllm_result.get(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")}}
rows = [{"system": name, "output tok/s": m["output_tok_s"], "TTFT p50 (ms)": m.get("ttft_p50_ms"),
         "TTFT p99 (ms)": m.get("ttft_p99_ms"), "TPOT p50 (ms)": m.get("tpot_p50_ms"), "TPOT p99 (ms)": m.get("tpot_p99_ms")}
        for name, m in results.items()]
tput = pd.DataFrame(rows)
cont = results["lab_continuous"]["output_tok_s"]
tput["continuous / this"] = cont / tput["output tok/s"]
print(f"[shape twin: {twin_arch}]")
print(tput.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
show(px.bar(tput, x="system", y="output tok/s", text_auto=".4s", height=360,
            title=f"Output tok/s on one trace, {twin_arch} shape twin ({len(trace)} requests)"))

# %% [markdown]
# Where the static engine loses: its decode steps compute a row for every slot of the batch until
# the longest output is done (the share of useful rows is printed above: with outputs uniform in
# 32..512, about half), and its prefill computes every prompt padded to the batch's longest.
# HF `generate` adds to that an eager step launched from Python and a cache that grows by
# concatenation. The continuous engine's steps hold only live sequences, and new ones take the
# places of finished ones at once.
#
# ### KV utilization, measured
#
# The continuous engine sampled, every few steps, the positions its running sequences held against
# the slots of their blocks, and what contiguous reservations would have held:

# %%
kv = cont_engine.kv_summary()
kv_utilization = kv["paged"]
print(f"paged: {kv['paged']:.2%} of allocated slots hold live tokens (averaged over {kv['samples']} samples)")
print(f"contiguous reservation of max_seq_len = {max_len}: {kv['contiguous_max_len']:.1%}; "
      f"of each request's prompt + max_tokens: {kv['contiguous_request_len']:.1%}")
predict("contiguous max-length reservation, share holding live tokens", my_contiguous_utilization,
        kv["contiguous_max_len"])
show(px.bar(pd.DataFrame({"KV layout": ["paged", "contiguous, prompt + max_tokens", f"contiguous, max_seq_len {max_len}"],
                          "utilization": [kv["paged"], kv["contiguous_request_len"], kv["contiguous_max_len"]]}),
            x="KV layout", y="utilization", text_auto=".1%", height=340, range_y=[0, 1],
            title="Share of reserved KV positions holding live tokens, averaged over the run"))
del cont_engine

# %% [markdown]
# ### CUDA graphs: what they buy
#
# The first 64 requests of the trace with the decode steps eager and as graphs (GPU only):

# %%
if GPU:
    sub = trace[:64]
    graph_rows = []
    for mode in ("off", "graph"):
        e = ContinuousEngine(m7, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_batch=256,
                             max_num_batched_tokens=4096, max_seq_len=max_len, graphs=mode)
        e.capture()
        replay_all_at_once(e, warm_trace)
        m = serving_metrics(*replay_all_at_once(e, sub))
        graph_rows.append({"decode steps": mode, "output tok/s": m["output_tok_s"], "TPOT p50 (ms)": m["tpot_p50_ms"]})
        del e
    graphs_df = pd.DataFrame(graph_rows)
    print(graphs_df.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
else:
    graphs_df = None
    print("CUDA graphs need a GPU; on the CPU the padded decode steps ran eagerly (section 4)")

# %% [markdown]
# ### Throughput against latency
#
# With requests arriving as a Poisson process, the rate and the batch limit trade throughput for
# latency: more sequences per step raise tok/s until the GPU's arithmetic is the limit, while
# each sequence's time per token grows with the batch it shares. `serve_at` replays a trace at an
# arrival rate through the continuous engine; the slider moves the rate and `max_batch`.

# %%
def serve_at(rate=8.0, max_batch=64, n=pick(64, 3)):
    s = TraceSpec(n=n, rate=rate, prompt_len=spec.prompt_len, output_len=spec.output_len, prompts="random", seed=3)
    e = ContinuousEngine(m7, num_blocks=min(num_blocks, pick(16384, num_blocks)), block_size=BLOCK_SIZE,
                         max_batch=max_batch, max_num_batched_tokens=pick(4096, 64), max_seq_len=max_len)
    e.capture()
    m = serving_metrics(*replay_engine(e, make_trace(s, vocab_size=m7.cfg.vocab_size)))
    print(f"rate {rate:g} req/s, max_batch {max_batch}: {m['output_tok_s']:,.0f} tok/s, TTFT p50 {m['ttft_p50_ms']:,.0f} ms "
          f"p99 {m['ttft_p99_ms']:,.0f} ms, TPOT p50 {m['tpot_p50_ms']:,.1f} ms p99 {m['tpot_p99_ms']:,.1f} ms")
    return {"rate": rate, "max_batch": max_batch, **{k: m[k] for k in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
                                                                       "tpot_p50_ms", "tpot_p99_ms")}}


rate_df = pd.DataFrame([serve_at(rate=r, max_batch=b) for r in pick((4.0, 16.0, 64.0), (50.0,))
                        for b in pick((16, 256), (2,))])
print(rate_df.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
show(px.line(rate_df, x="output_tok_s", y="tpot_p50_ms", color="max_batch", markers=True, hover_data=["rate"],
             height=360, title=f"Time per output token vs throughput, {twin_arch} shape twin (points: arrival rates)"))
slider(serve_at, rate=(1.0, 64.0, 1.0, 8.0), max_batch=[1, 2, 4, 8, 16, 32, 64, 128, 256])

# %% [markdown]
# ## 6. Prefix caching
#
# Chat requests start with the same system prompt. Its keys and values are the same in every
# request (they depend only on the tokens before them), so a server can keep them. The pool keys
# each **full** block by a hash of its tokens and of everything before it (a chain: two blocks
# match only if their whole prefixes do), counts references, and keeps blocks nobody uses in an
# LRU list until their space is needed. A new request takes the longest run of cached blocks of its
# prompt and computes only the rest.
#
# **Exercise 4.** How many of a prompt's tokens can come from the cache, given the prompts whose
# blocks are cached? (Mind the last token.)

# %%
def reusable_prefix(prompt, cached, block_size):
    ### BEGIN SOLUTION
    best = 0
    for c in cached:
        k = 0
        while k < min(len(prompt), len(c)) and prompt[k] == c[k]:
            k += 1
        best = max(best, k)
    return min(best // block_size, (len(prompt) - 1) // block_size) * block_size
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("reusable_prefix", reusable_prefix)

# %% [markdown]
# The time to first token of a request with a 1,024-token system prompt and a 64-token question,
# cold (a system prompt never seen) and warm (the previous request had the same system prompt),
# each request alone in the engine, on the 7B shape twin:

# %%
def ttft_cold_warm(sys_len=pick(1024, 64), user_len=pick(64, 8), pairs=pick(8, 2)):
    g = torch.Generator().manual_seed(7)
    V = m7.cfg.vocab_size
    e = ContinuousEngine(m7, num_blocks=pick(4096, 64), block_size=BLOCK_SIZE, max_seq_len=sys_len + user_len + 8)
    e.capture()
    rows = []
    for i in range(pairs + 1):  # the first pair warms up
        sys_ids = torch.randint(0, V, (sys_len,), generator=g).tolist()
        for kind in ("cold", "warm"):
            r = Request(f"{i}{kind}", sys_ids + torch.randint(0, V, (user_len,), generator=g).tolist(), 1)
            cached_before = e.prompt_tokens_cached
            out = None
            e.add(r)
            while e.has_unfinished():
                for o in e.step():
                    out = o
            if i:
                rows.append({"pair": i, "kind": kind, "ttft_ms": out.timing.ttft * 1e3,
                             "cached_tokens": e.prompt_tokens_cached - cached_before})
    return pd.DataFrame(rows)


pc = ttft_cold_warm()
med = pc.groupby("kind")[["ttft_ms", "cached_tokens"]].median()
prefix_cache_ttft_speedup = float(med.loc["cold", "ttft_ms"] / med.loc["warm", "ttft_ms"])
print(med.to_string(float_format=lambda x: f"{x:,.1f}"))
print(f"TTFT cold / warm = {prefix_cache_ttft_speedup:.2f} [shape twin: {twin_arch}]")
show(px.strip(pc, x="kind", y="ttft_ms", height=320, title="Time to first token, shared system prompt: cold vs warm"))

# %% [markdown]
# The warm request computes only its question's 64 tokens (a system prompt whose length is not a
# multiple of the block size would also recompute its last, partial block): a forward of 64 tokens,
# which costs little more than reading the weights once, instead of 1,088 tokens through every
# layer. The ratio approaches the ratio of the work, bounded by the cost of a short forward.
#
# ## 7. A server
#
# `python -m labutils.serve` puts the engine behind an OpenAI-compatible HTTP API
# (`/v1/completions` and `/v1/chat/completions`, streaming as server-sent events). Here it runs in
# this process on the embedded model (real weights, so the text means something), and the official
# `openai` client talks to it:

# %%
srv_engine = ContinuousEngine(m32, num_blocks=pick(512, 64), block_size=16, max_seq_len=pick(1024, 128),
                              decode="triton" if GPU else "torch")  # the torch path: Triton's interpreter is slow
srv_engine.capture()  # the decode graphs, before the server's engine thread starts (none on a CPU)
with make_server(srv_engine, tok, "SmolLM2-135M-Instruct", aliases=("embedded",)) as srv:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
    r = client.completions.create(model="embedded", prompt="The three primary colours are", max_tokens=pick(24, 6),
                                  temperature=0)
    print("completion:", repr(r.choices[0].text), r.usage)
    stream = client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "Name a planet."}],
                                            max_tokens=pick(24, 6), temperature=0, stream=True)
    print("chat, streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    srv_spec = TraceSpec(n=pick(32, 3), rate=pick(8.0, 20.0), prompt_len=Lengths("uniform", 16, pick(256, 24)),
                         output_len=Lengths("uniform", 4, pick(64, 6)), prompts="text", seed=2)
    records, duration = replay_server(srv.url, make_trace(srv_spec, tok))
    server_metrics = serving_metrics(records, duration)
    print(f"load generator: {srv_spec.describe()}")
    print(format_metrics(server_metrics))

# %% [markdown]
# ## 8. Against vLLM
#
# vLLM ran the same 256 requests (same seed, same lengths, token-id prompts, greedy, EOS ignored)
# on the same shape twin, with its own memory budget (85% of the GPU), its CUDA graphs and its
# prefix cache on. vLLM's scheduler is written in Python too; its forward uses FlashAttention's
# paged kernels and fused custom ops.

# %%
if "vllm" in results:
    ratio = results["lab_continuous"]["output_tok_s"] / results["vllm"]["output_tok_s"]
    print(f"lab continuous {results['lab_continuous']['output_tok_s']:,.0f} tok/s, vLLM {vllm_result['vllm_version']} "
          f"{results['vllm']['output_tok_s']:,.0f} tok/s: lab / vLLM = {ratio:.2f} [shape twin: {twin_arch}]")
    print(f"vLLM: import {vllm_result['import_s']:.0f} s, engine start {vllm_result['engine_start_s']:.0f} s, "
          f"all output lengths exact: {vllm_result['all_lengths_exact']}")
else:
    ratio = None
    why = vllm_result.get("error") if vllm_result else "no GPU on this machine" if not GPU else \
        "a smoke run" if not FULL else "no result file"
    print(f"vLLM was not run or failed: {why}")

# %% [markdown]
# ## 9. Results

# %%
def lat(m):
    return {k: m.get(f"{k}_ms") for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")}


metrics = {
    "throughput_tok_s": {"lab_continuous": results["lab_continuous"]["output_tok_s"],
                         "lab_static": results["lab_static"]["output_tok_s"],
                         "hf_generate": results["hf_generate"]["output_tok_s"],
                         "vllm": results["vllm"]["output_tok_s"] if "vllm" in results else None},
    "kv_utilization": kv_utilization,
    "kv_utilization_contiguous": kv["contiguous_max_len"], "kv_utilization_contiguous_request": kv["contiguous_request_len"],
    "prefix_cache_ttft_speedup": prefix_cache_ttft_speedup,
    "prefix_cache_ttft_ms": {k: float(v) for k, v in med["ttft_ms"].items()},
    "outputs_match_alone": outputs_match_alone,
    "latency_ms": {name: lat(m) for name, m in results.items()},
    "continuous_vs_static": cont / results["lab_static"]["output_tok_s"],
    "continuous_vs_hf": cont / results["hf_generate"]["output_tok_s"],
    "continuous_vs_vllm": ratio,
    "block_size": BLOCK_SIZE, "block_size_sweep": None if bs_df is None else bs_df.to_dict(orient="records"),
    "cuda_graphs": None if graphs_df is None else graphs_df.to_dict(orient="records"),
    "rate_sweep": rate_df.to_dict(orient="records"),
    "server": {k: server_metrics[k] for k in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")},
    "trace": spec.describe(), "hf_generate_requests": HF_N, "static_batch": STATIC_BATCH, "shape_twin": twin_arch,
    "engine_stats": {k: v for k, v in results["lab_continuous"]["engine_stats"].items()},
    "vllm": None if not vllm_result else {k: v for k, v in vllm_result.items() if k not in ("per_request_ttft_ms", "traceback")},
}
path = save_results("06_serving", metrics, dtype=torch.bfloat16 if FULL else torch.float32)
print(f"wrote {path.parent.name}/{path.name}")  # relative: the same on every machine
print({k: metrics[k] for k in ("throughput_tok_s", "kv_utilization", "prefix_cache_ttft_speedup", "outputs_match_alone")})
assert outputs_match_alone, f"batched greedy outputs differ from the requests alone: {mismatch}"
