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
# # 07 · Tensor parallelism: one token, several GPUs
#
# At batch 1 a decode step reads every weight once (notebook 02), so a token takes at least
# *weight bytes / memory bandwidth*. One GPU's bandwidth is the limit; several GPUs together have
# more. **Tensor parallelism** splits every layer's weights across W GPUs so that each reads 1/W of
# the bytes for every token, and pays for it with communication: the GPUs add up their partial
# results twice per layer (an *all-reduce*). This notebook
#
# 1. defines the split Megatron-LM uses (column-parallel, then row-parallel, one all-reduce per pair)
#    and has you cut the weights;
# 2. applies it to the lab decoder through its linear-layer seam: attention heads and KV heads divided
#    across ranks (grouped-query attention included), the embedding replicated, the lm_head split by
#    vocabulary;
# 3. checks it on the CPU: 2 and 4 processes joined by `torch.distributed` (gloo), launched with
#    `torchrun` from a cell, against the single-process decoder, logit for logit and token for token;
# 4. builds the cost model (bytes per GPU / bandwidth + all-reduces × latency) with sliders for the GPU
#    count and the model size;
# 5. on a machine with several GPUs, measures batch-1 tok/s of a Qwen2.5-7B and a Llama-3-70B
#    **shape twin** on 1 and 2 GPUs (CUDA graphs around the collectives, and compiled layers), the
#    all-reduce latency alone, and sets measured against predicted.

# %%
import json
import tempfile
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from labutils import configs, tp
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.generate import encode_prompt
from labutils.hardware import spec_sheet
from labutils.models import load_model
from labutils.notebook import setup, show_source, slider
from labutils.results import save_results
from labutils.runtime import pick

device = setup()
GPUS = torch.cuda.device_count()
print(f"GPUs visible: {GPUS}")

# %% [markdown]
# ## 1. The split
#
# Take the MLP, y = down(silu(gate(x)) · up(x)), with x a hidden vector of size d and an FFN of
# size f. Cut **gate** and **up** by their *outputs*: GPU r computes f / W of the FFN's features,
# from the whole x (every GPU holds a copy of x). SwiGLU works feature by feature, so each GPU can
# apply it to its own features without looking at the others'. Cut **down** by its *inputs*, the
# same f / W features: GPU r multiplies its features by its rows of down's matrix and gets a
# **partial** y of full size d. The true y is the sum of the W partials: one all-reduce, after which
# every GPU holds y again and the next layer starts from the same state.
#
# Attention splits the same way, with heads as the unit: q, k, v cut by output (GPU r computes its
# heads' queries, keys and values; attention is per head, so no communication), o_proj cut by input
# (its heads' slice of the concatenated head outputs), then one all-reduce. Two all-reduces per
# layer, each of one hidden vector per token.
#
# In PyTorch an `nn.Linear` stores W as (out_features, in_features) and computes x Wᵀ, so "cut by
# output" keeps a range of W's **rows** (Megatron calls it *column-parallel*, after the columns of
# the math convention y = x A) and "cut by input" keeps a range of W's **columns** (*row-parallel*).

# %%
def split_diagram(world: int = 2):
    """The MLP on W GPUs: gate/up cut by output (column-parallel), down by input (row-parallel)."""
    colors = ["#636efa", "#EF553B", "#00cc96", "#ab63fa"]
    fig = go.Figure()

    def box(x0, x1, y0, y1, color, text="", dash=None):
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, fillcolor=color, opacity=0.55,
                      line=dict(color="#444", dash=dash or "solid"))
        if text:
            fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False, font_size=12)

    box(0, 0.4, 0, 4, "#d9d9d9", "x<br>(d)")
    for r in range(world):  # gate / up: d x f, the f outputs cut into W ranges
        w = 4 / world
        box(1, 3, 4 - (r + 1) * w, 4 - r * w, colors[r], f"gate, up<br>outputs {r}/{world}")
        box(3.6, 4.0, 4 - (r + 1) * w, 4 - r * w, colors[r], "h<sub>%d</sub>" % r)
        box(4.6, 6.6, 4 - (r + 1) * w, 4 - r * w, colors[r], f"down<br>inputs {r}/{world}")
        box(7.2, 7.6, 4 - (r + 1) * w + 0.1, 4 - r * w - 0.1, colors[r], "y<sub>%d</sub>" % r, dash="dot")
    box(8.6, 9.0, 0, 4, "#d9d9d9", "y<br>(d)")
    fig.add_annotation(x=8.3, y=4.45, text="all-reduce: y = Σ<sub>r</sub> y<sub>r</sub>", showarrow=False, font_size=12)
    fig.add_annotation(x=2, y=4.45, text="column-parallel: no communication", showarrow=False, font_size=12)
    fig.add_annotation(x=5.6, y=4.45, text="row-parallel: partial sums", showarrow=False, font_size=12)
    fig.add_annotation(x=3.8, y=-0.45, text="h<sub>r</sub> = silu(gate<sub>r</sub> x) · up<sub>r</sub> x, "
                       "f / W features on GPU r", showarrow=False, font_size=12)
    fig.update_xaxes(visible=False, range=[-0.3, 9.3])
    fig.update_yaxes(visible=False, range=[-0.8, 4.8])
    fig.update_layout(title=f"The MLP on {world} GPUs (colour = GPU)", height=330, width=760, plot_bgcolor="white")
    return fig


show(split_diagram(2))

# %% [markdown]
# **Exercise 1.** Cut a weight `W` (out_features, in_features) for rank `rank` of `world`: by output
# (`column_shard`) and by input (`row_shard`). Ranges are contiguous and balanced: when `world` does
# not divide the size, the first ranks get one more (9 heads on 2 GPUs are 5 + 4).

# %%
def column_shard(W, rank, world):
    ### BEGIN SOLUTION
    base, extra = divmod(W.shape[0], world)
    lo = rank * base + min(rank, extra)
    return W[lo:lo + base + (rank < extra)].clone()
    ### END SOLUTION


def row_shard(W, rank, world):
    ### BEGIN SOLUTION
    base, extra = divmod(W.shape[1], world)
    lo = rank * base + min(rank, extra)
    return W[:, lo:lo + base + (rank < extra)].clone()
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("column_shard", column_shard)
check("row_shard", row_shard)

# %% [markdown]
# With your two functions, the split MLP in one process: W partial results, summed (the all-reduce),
# against the whole MLP, in float64 (the sum of partials is the same sum in another order).

# %%
def split_mlp(x, gate, up, down, world):
    """sum over r of down_r(silu(gate_r x) * up_r x): what W GPUs compute, then add up."""
    partials = []
    for r in range(world):
        h = torch.nn.functional.silu(x @ column_shard(gate, r, world).T) * (x @ column_shard(up, r, world).T)  # (f / W,)
        partials.append(h @ row_shard(down, r, world).T)  # (d,): a partial y
    return torch.stack(partials).sum(0)  # the all-reduce


g = torch.Generator().manual_seed(0)
d, f = 48, 130  # f not a multiple of 3 or 4: uneven ranges
x = torch.randn(d, generator=g, dtype=torch.float64)
gate, up, down = (torch.randn(*s, generator=g, dtype=torch.float64) / s[1] ** 0.5 for s in ((f, d), (f, d), (d, f)))
whole = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
for world in (1, 2, 3, 4):
    err = ((split_mlp(x, gate, up, down, world) - whole).norm() / whole.norm()).item()
    print(f"{world} GPUs: |split - whole| / |whole| = {err:.1e}")

# %% [markdown]
# ## 2. The lab decoder, split
#
# `labutils.tp` applies the split to the decoder of notebook 01 without forking it. Each rank builds
# an ordinary `Decoder` whose config holds *its* head counts and FFN width; its q/k/v and gate/up are
# plain `nn.Linear`s holding its rows, and the linear-layer seam (`swap_linears`) replaces o_proj and
# down_proj by a `RowParallelLinear` (partial product, all-reduce, then the bias, added once) and
# the lm_head by a `VocabParallelHead`:

# %%
show_source(tp.RowParallelLinear)
show_source(tp.VocabParallelHead)

# %% [markdown]
# Decisions the package makes (its docstring holds the contract):
#
# - **Heads.** Query heads go to ranks in contiguous, balanced ranges. With grouped-query attention,
#   query head h reads KV head h // (n_head / n_kv_head); each rank holds the KV heads its query heads
#   read, so a KV head read from two ranks is **replicated** on both (always when n_kv_head < W). When
#   a rank's query heads do not divide evenly over its KV heads, that rank stores one KV head per
#   query head, so the attention contract of notebook 01 holds on every rank. Only W > n_head is
#   refused.
# - **Embedding: replicated.** A lookup reads B · T rows, not the table: splitting it saves memory but
#   no time per token.
# - **lm_head: split by vocabulary** (each rank computes its slice of the logits, an all-gather joins
#   them, every rank takes the same argmax). The lm_head is the largest single matrix (Qwen2.5-7B:
#   152,064 × 3,584, 1.1 GB in bf16); replicated, it would be read whole by every GPU.
#
# The embedded model has 9 query heads and 3 KV heads; here is how they fall on 2 and 4 ranks:

# %%
hf32, tok = load_model(dtype=torch.float32, device="cpu")
full = Decoder.from_hf(hf32)
cfg = full.cfg
plan_rows = [{"ranks": w, "rank": s.rank, "query heads": f"{s.heads[0]}..{s.heads[1] - 1}",
              "KV heads held": list(s.kv_heads), "FFN columns": f"{s.ffn[0]}..{s.ffn[1] - 1}",
              "vocab rows": f"{s.vocab[0]}..{s.vocab[1] - 1}",
              "MB read per token (fp32)": tp.rank_bytes(cfg, s, 4) / 1e6} for w in (1, 2, 4) for s in tp.plan(cfg, w)]
print(pd.DataFrame(plan_rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"))

# %% [markdown]
# On 2 ranks, query heads 0-4 read KV heads 0 and 1 and heads 5-8 read KV heads 1 and 2 (3 query heads
# per KV head); neither rank's heads group evenly, so each stores one KV head per query head. On 4
# ranks every rank's heads fall into whole groups: KV head 1 is held by ranks 1 and 2.
#
# ## 3. Check: 2 and 4 processes against one
#
# `tp.launch(command, world, ...)` starts `torchrun --nproc-per-node world -m labutils.tp command` (the
# same command works in a terminal: `python -m labutils.tp check --world 2`) and returns the JSON rank 0
# wrote. Each rank loads the embedded model, keeps its shard, computes the prompt's logits (gathered
# on every rank) and 6 greedy tokens through a `DecodeEngine` with its own KV cache. NCCL between
# GPUs when there are enough of them, gloo between CPU processes otherwise. The reference is the whole
# decoder in this process, fp32; the shards sum their partial products in another order, so the
# logits agree to fp32 rounding, not bit for bit.

# %%
N_NEW = 6
prompt = encode_prompt(tok, "Why is the sky blue? Answer in one sentence.", chat=True)
with torch.no_grad():
    ref_logits = full(prompt)
    ref_tokens = DecodeEngine(full, max_seq_len=prompt.shape[1] + N_NEW + 1).generate(prompt, N_NEW)[0, prompt.shape[1]:].tolist()
backend = "nccl" if GPUS >= 2 else "gloo"
check_worlds = [w for w in (2, 4, 8) if w <= GPUS] if backend == "nccl" else [2, 4]
tmp = Path(tempfile.mkdtemp())
check_rows = []
for world in check_worlds:
    out = tp.launch("check", world, "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--new-tokens", N_NEW,
                    "--save", tmp / f"{world}.pt", "--fuse", "--backend", backend, timeout_s=300)
    got = torch.load(tmp / f"{world}.pt")
    err = ((got["logits"].double() - ref_logits.double()).abs().max() / ref_logits.double().abs().max()).item()
    check_rows.append({"ranks": world, "backend": out["backend"], "logits max|diff|/max|ref|": err,
                       "greedy tokens identical": got["tokens"] == ref_tokens,
                       "ranks agree": out["identical_on_all_ranks"], "launch s": out["launch_seconds"]})
check_df = pd.DataFrame(check_rows)
print(check_df.to_string(index=False, float_format=lambda v: f"{v:.2e}" if v < 1 else f"{v:.1f}"))
print("text:", repr(tok.decode(ref_tokens)))
assert check_df["greedy tokens identical"].all() and (check_df["logits max|diff|/max|ref|"] < 1e-5).all()

# %% [markdown]
# ## 4. The cost model
#
# Per token each GPU reads its bytes (its slice of every projection and of the lm_head, plus the
# replicated parts: norms, one embedding row, replicated KV heads), then waits for 2 · n_layer
# all-reduces (and one all-gather of logits). The reading shrinks as 1/W; the all-reduces do not: their
# count is set by the depth, and their latency (a few microseconds each over NVLink, for a message of
# one hidden vector) barely depends on W or on the message size.
#
# **Exercise 2.** How many all-reduces does one token cost on `world` GPUs? And the predicted time per
# token, with all the weight bytes split evenly (the package counts the replicated parts as well).

# %%
def allreduces_per_token(n_layer, world):
    ### BEGIN SOLUTION
    return 0 if world == 1 else 2 * n_layer
    ### END SOLUTION


def predicted_ms_per_token(weight_bytes, world, copy_gbps, n_layer, allreduce_us):
    ### BEGIN SOLUTION
    read_ms = weight_bytes / world / (copy_gbps * 1e9) * 1e3
    return read_ms + allreduces_per_token(n_layer, world) * allreduce_us * 1e-3
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("allreduces_per_token", allreduces_per_token)
check("predicted_ms_per_token", predicted_ms_per_token)

# %% [markdown]
# The model, for the architectures in `labutils.configs` and W = 1 … 8. Until the GPU measurements
# below replace them, it uses the H200's data-sheet bandwidth and an assumed 10 µs per collective.

# %%
sheet = spec_sheet("H200")
ASSUMED = {"copy_gbps": 0.9 * sheet[0], "allreduce_us": 10.0}  # until measured below
MODELS = ["SmolLM2-135M", "Qwen2.5-7B", "Llama-3-8B", "Llama-3-70B"]


def cost_table(model, copy_gbps, allreduce_us, worlds=(1, 2, 4, 8)):
    c = tp.twin_config(model)
    rows = []
    for w in worlds:
        if w > c.n_head:
            continue
        p = tp.predicted_ms(c, w, copy_gbps, allreduce_us)
        rows.append({"model": model, "GPUs": w, "GB per GPU": p["bytes_per_gpu"] / 1e9, "read ms": p["read_ms"],
                     "collectives ms": p["comm_ms"], "ms per token": p["ms"], "tok/s": p["tok_s"]})
    df = pd.DataFrame(rows)
    df["speedup"] = df["ms per token"].iloc[0] / df["ms per token"]
    df["efficiency"] = df["speedup"] / df["GPUs"]
    return df


def cost_chart(model="Qwen2.5-7B", gpus=2, allreduce_us=ASSUMED["allreduce_us"], copy_gbps=ASSUMED["copy_gbps"]):
    """Predicted time per token on 1-8 GPUs: reading (shrinks as 1/W) and collectives (do not)."""
    df = cost_table(model, copy_gbps, allreduce_us, worlds=range(1, 9))
    row = df[df["GPUs"] == gpus].iloc[0]
    print(f"{model} on {gpus} GPU(s): {row['GB per GPU']:.2f} GB per GPU -> {row['read ms']:.3f} ms reading + "
          f"{row['collectives ms']:.3f} ms collectives = {row['ms per token']:.3f} ms/token, {row['tok/s']:.0f} tok/s, "
          f"speedup {row['speedup']:.2f}x, efficiency {row['efficiency']:.0%}")
    long = df.melt(id_vars="GPUs", value_vars=["read ms", "collectives ms"], var_name="part", value_name="ms")
    fig = px.bar(long, x="GPUs", y="ms", color="part", barmode="stack", height=330,
                 title=f"{model}: predicted ms per token ({copy_gbps:,.0f} GB/s, {allreduce_us:g} µs per collective)")
    fig.add_vline(x=gpus, line_dash="dot")
    show(fig)


cost_chart()

# %%
slider(cost_chart, model=MODELS, gpus=(1, 8, 1, 2), allreduce_us=(1.0, 50.0, 1.0, ASSUMED["allreduce_us"]),
       copy_gbps=(500.0, 8000.0, 100.0, round(ASSUMED["copy_gbps"], -2)))

# %% [markdown]
# The collectives cost about the same for every model of the same depth, so the smaller the model,
# the sooner they dominate: the 135M model would be *slower* on 2 GPUs than on 1, while the 70B model
# keeps most of the gain. At the assumed bandwidth and latency, the predicted efficiency
# (speedup / GPUs):

# %%
pred = pd.concat([cost_table(m, **ASSUMED) for m in MODELS])
print(pred.pivot_table(index="model", columns="GPUs", values="efficiency").to_string(float_format=lambda v: f"{v:.0%}"))

# %% [markdown]
# **Predict first.** With the measured bandwidth and latency below, how much faster will the
# Qwen2.5-7B twin decode on 2 GPUs than on 1 (a ratio)? gpt-fast reported 168.8 / 104.9 = 1.61x for
# Llama-2-7B on 2 A100s.

# %%
my_7b_speedup = None  # your prediction, e.g. 1.6

# %% [markdown]
# ## 5. Measured on GPUs
#
# `tp.benchmark()` runs each measurement in its own `torchrun` launch (one process per GPU, NCCL,
# NVLink multicast off as the machine requires):
#
# 1. a canary: a random SmolLM2-shaped model sharded over all GPUs, the decode step captured in a CUDA
#    graph *with its collectives*, against the whole model (fp32, tokens and logits);
# 2. the all-reduce of one hidden vector (bf16) and the all-gather of a logits slice, alone, replayed
#    64 at a time from a CUDA graph (as they run inside the decode step);
# 3. batch-1 decoding of each **shape twin** (random weights, built shard by shard on each GPU: the
#    70B twin never exists whole) with the decode engine of notebook 02: CUDA graphs, and compiled
#    layers for the 7B (torch.compile traces the functional collectives).
#
# A 70B model does not fit on one GPU in bf16 (141 GB of weights): its 1-GPU time is predicted only,
# and its efficiency is measured against that prediction.

# %%
bench = None
if GPUS >= 2:
    bench = tp.benchmark(budget_s=480)
    summary = bench["summary"]
    print(json.dumps({k: v for k, v in summary.items() if k != "models"}, indent=1))
    for s in bench["skipped"]:
        print("skipped:", s)
else:
    print(f"GPU measurement not run: tensor parallelism needs at least 2 GPUs, this machine has {GPUS}. "
          "The cost model above uses the H200's data sheet and an assumed latency; "
          "scripts/gpu/tp_bench.py runs the measurements on a multi-GPU machine.")

# %%
if bench is not None:
    rows = []
    for model, per_world in summary["models"].items():
        for w, r in per_world.items():
            rows.append({"model": model + " [shape twin]", "GPUs": int(w), "GB per GPU": r["bytes_per_gpu"] / 1e9,
                         "eager tok/s": r.get("eager_tok_s"), "graph tok/s": r.get("graph_tok_s"),
                         "compiled tok/s": r.get("compile_tok_s"),
                         "predicted tok/s": r.get("predicted_tok_s"), "measured / predicted ms": r.get("measured_over_predicted_ms"),
                         "of bytes bound": r.get("fraction_of_bytes_bound"), "speedup": r.get("speedup_vs_1"),
                         "efficiency": r.get("scaling_efficiency"), "1-GPU basis": r.get("one_gpu_basis")})
    measured = pd.DataFrame(rows)
    print(f"{torch.cuda.get_device_name()} x {GPUS}, bf16, batch 1, copy bandwidth {summary['copy_gbps']:,.0f} GB/s")
    print(measured.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    long = measured.melt(id_vars=["model", "GPUs"], var_name="kind", value_name="tok/s",
                         value_vars=["eager tok/s", "graph tok/s", "compiled tok/s", "predicted tok/s"]).dropna()
    long["GPUs"] = long["GPUs"].astype(str)
    fig = px.bar(long, x="GPUs", y="tok/s", color="kind", barmode="group", facet_col="model", height=360,
                 title="Batch-1 decode: measured and predicted (shape twins, bf16)")
    fig.update_yaxes(matches=None)
    show(fig)
    r7 = summary["models"]["Qwen2.5-7B"]
    if "tok_s" in r7.get("2", {}) and "tok_s" in r7.get("1", {}):
        predict("7B twin speedup on 2 GPUs", my_7b_speedup, r7["2"]["speedup_vs_1"], "x")

# %% [markdown]
# ## 6. Where the time goes
#
# The decode step on W GPUs is W copies of notebook 02's step on 1/W of the weights, plus
# 2 · n_layer + 1 collectives that cannot overlap with anything: the next layer needs the sum. So the
# step time has a part that shrinks with W (reading) and a part that does not (the collectives, and the
# replicated reads: norms, embedding row, replicated KV heads). The efficiency on W GPUs is therefore
# set by the ratio of the two: a deep, narrow model with fast GPUs (more layers, fewer bytes per layer,
# higher bandwidth) loses more to the collectives than a wide one. The bar chart of section 4 shows it
# with your numbers; the table above compares it with the measurement.
#
# What would go further: a custom all-reduce for small messages (each GPU reads its peers' vectors over
# NVLink directly in one kernel, as vLLM and SGLang do, instead of NCCL's general ring), fusing the
# all-reduce with the residual add and the next RMSNorm, and at larger batches overlapping the
# communication of one micro-batch with the computation of another.

# %%
if bench is not None:
    r70 = summary["models"]["Llama-3-70B"].get("2", {})
    if "predicted_read_ms" in r70 and "ms" in r70:
        print(f"Llama-3-70B twin on 2 GPUs: {r70['ms']:.2f} ms/token measured, {r70['predicted_read_ms']:.2f} ms to read "
              f"{r70['bytes_per_gpu'] / 1e9:.1f} GB per GPU, {r70['predicted_comm_ms']:.2f} ms of collectives predicted: "
              f"{r70['fraction_of_bytes_bound']:.0%} of the bytes bound")
    r7 = summary["models"]["Qwen2.5-7B"].get("2", {})
    if "ms" in r7 and "predicted_comm_ms" in r7:
        print(f"Qwen2.5-7B twin on 2 GPUs: collectives {r7['predicted_comm_ms']:.2f} of {r7['ms']:.2f} ms/token "
              f"({r7['predicted_comm_ms'] / r7['ms']:.0%}) by the model")

# %% [markdown]
# ## 7. Results

# %%
metrics = {"check": check_df.to_dict(orient="records"), "cost_model_assumed": ASSUMED,
           "predicted_efficiency_assumed": pred[["model", "GPUs", "efficiency", "tok/s"]].to_dict(orient="records")}
extra = {"device_count": GPUS}
if bench is not None:
    metrics.update(summary)
    extra.update(runs=bench["runs"], skipped=bench["skipped"])
path = save_results("07_tensor_parallel", metrics, dtype=pick(torch.bfloat16, torch.float32), **extra)
print(f"wrote {path.parent.name}/{path.name}")  # relative: the same on every machine
