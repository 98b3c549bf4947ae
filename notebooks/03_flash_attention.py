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
# # 03 · FlashAttention in Triton, from online softmax to a kernel measured against cuDNN
#
# Naive attention (notebook 01) writes the N × N score matrix to memory, reads it back for the
# softmax, writes the probabilities and reads them again to multiply by V. FlashAttention tiles Q,
# K and V through on-chip memory with a running max and sum, so the matrix never exists in memory.
# This notebook
#
# 1. counts the memory traffic of both, including the K/V that every query block reads again
#    (**exercise**: the bytes FlashAttention moves);
# 2. derives the **online softmax** in plain PyTorch and merges partial results exactly
#    (**exercise**: merge two partial softmax states);
# 3. has you write the inner loop of a FlashAttention kernel in Triton (**exercise**), then reads
#    the library's kernel (`labutils/flash_attention.py`): causal and non-causal, GQA without
#    copying K/V, any length;
# 4. checks the library's kernel against a float32 reference on awkward shapes;
# 5. measures it against PyTorch SDPA's FlashAttention-2 and cuDNN backends and naive attention,
#    after a prediction of its ceiling, and reconciles naive attention's traffic model with its time;
# 6. explores block sizes; 7. compares peak memory with the model;
# 8. builds **decode attention** (FlashDecoding: one query over a long KV cache, split along the
#    keys) and plugs it into the lab decoder as an attention backend.

# %%
import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from labutils import flash_attention as fa  # labutils first: without a GPU it selects Triton's interpreter
from labutils.attention import naive_attention
from labutils.bench import time_fn
from labutils.decoder import Decoder
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.generate import encode_prompt, greedy_cached
from labutils.hardware import ceilings, spec_sheet
from labutils.kv_cache import static_caches
from labutils.models import load_model
from labutils.notebook import setup, show_source, slider
from labutils.results import save_results
from labutils.runtime import has_cuda, pick
import triton  # noqa: E402, I001  (after labutils: triton.language's own helpers must be interpreted too)
import triton.language as tl  # noqa: E402

device = setup()
DTYPES = pick([torch.float16, torch.bfloat16], [torch.float32, torch.float16])  # bf16 is wrong in the interpreter
ceil = ceilings()  # copy bandwidth and matmul rate of this device, from notebook 00 of this run when there is one
ridge = ceil["matmul_bf16_tflops"] * 1e12 / (ceil["copy_gbps"] * 1e9)
print(f"ceilings ({ceil['source']}): copy {ceil['copy_gbps']:,.0f} GB/s, dense bf16 matmul "
      f"{ceil['matmul_bf16_tflops']:,.1f} TFLOP/s; ridge point {ridge:,.0f} FLOP/byte")

# %% [markdown]
# ## 1. What each algorithm moves through memory
#
# **Naive attention**, per head, as four separate kernels: S = Q Kᵀ reads Q and K (2Nd values) and
# writes S (N²); the softmax reads S and writes P (2N²); O = P V reads P and V (N² + Nd) and writes O
# (Nd): **4N² + 4Nd** values, if the 1/√d scale is folded into Q. Written the obvious way,
# `softmax(q @ k.T / sqrt(d))`, the scale is a kernel of its own that reads and writes the whole
# matrix once more: **6N² + 4Nd**. The FLOPs are 4N²d either way (two matmuls of 2N²d), so the
# arithmetic intensity is about 4N²d / (2 bytes · 4N²) = d/2 FLOP/byte (d/3 with the separate
# scale) in fp16, whatever N.
#
# **FlashAttention** reads each Q block once and writes each O block once (2Nd values), but a
# program that owns B_r query rows must see *every* key: it streams all of K and V past its block.
# With ⌈N/B_r⌉ query blocks per head, **K and V are read ⌈N/B_r⌉ times**:
#
#     bytes = dtype_bytes · (2Nd + 2Nd · ⌈N/B_r⌉)         (per head)
#
# That is the FlashAttention paper's IO bound, Θ(N²d²/M) for on-chip memory M: the Q tile must fit
# on chip, B_r ≈ M/d, so the re-reads cost 2Nd · N/B_r ≈ 2N²d²/M. The intensity is then
# 4N²d / (2 · 2N²d/B_r) ≈ **B_r FLOP/byte**, independent of N: with B_r = 128, about 128 FLOP/byte.
# The re-reads are what keeps it finite; they usually hit in L2 (one head's K and V at N = 4096 and
# d = 128 are 2 MiB, and the programs of one head run at about the same time), so the traffic from
# HBM lies between the lower bound 4Nd (K and V read once) and the formula above.
#
# **Exercise 1.** Write the formula: the bytes one head of FlashAttention moves when every K/V
# re-read comes from HBM.

# %%
def flash_io_bytes(N, d, block_m, dtype_bytes):
    ### BEGIN SOLUTION
    n_query_blocks = -(-N // block_m)  # ceil: a ragged last block is a program too
    return dtype_bytes * (2 * N * d + 2 * N * d * n_query_blocks)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("flash_io_bytes", flash_io_bytes)

# %%
H, D, BYTES = 32, 128, 2
rows = []
for N in [512, 2048, 8192, 32768]:
    B = 16384 // N if N <= 16384 else 1
    flops = fa.attention_flops(B, H, N, N, D, causal=False)
    naive_b = B * H * BYTES * (6 * N * N + 4 * N * D)  # the separate scale kernel counted
    once_b = fa.flash_attention_bytes(B, H, N, D, BYTES)  # K/V read once (all re-reads hit in L2)
    reread_b = B * H * flash_io_bytes(N, D, 128, BYTES)  # every re-read from HBM, B_r = 128
    rows.append({"N": N, "B": B, "GFLOP": flops / 1e9, "naive GB": naive_b / 1e9, "flash GB (K/V once)": once_b / 1e9,
                 "flash GB (re-read, B_r=128)": reread_b / 1e9, "naive FLOP/B": flops / naive_b,
                 "flash FLOP/B (once)": flops / once_b, "flash FLOP/B (re-read)": flops / reread_b})
traffic = pd.DataFrame(rows)
print(traffic.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
print(f"ridge point of this device: {ridge:,.0f} FLOP/byte")

# %% [markdown]
# Naive attention (d = 128) sits at 37 FLOP/byte at N = 512, rising to d/3 ≈ 43 at N = 32k: about
# a quarter of the ridge point of this device (161 FLOP/byte), so memory-bound; at the copy ceiling
# (4,273 GB/s) 43 FLOP/byte allow at most ~180 TFLOP/s. FlashAttention's intensity lies between
# ~B_r (every K/V re-read from HBM: 102 to 128 FLOP/byte with B_r = 128) and ~N/2 (K and V read
# once: 256 FLOP/byte at N = 512 and more beyond). The lower value is below the ridge at every N,
# the upper one above it from N = 2 × 161 ≈ 320 on: it is L2's reuse of K and V that lets the
# kernel be compute-bound.
#
# ## 2. Online softmax
#
# softmax(s)_j = exp(s_j − m) / Σ exp(s_k − m) needs the row maximum m and the sum before any
# output, which seems to need the whole row. But both can be carried along while the row streams
# past in blocks: keep the running max m and sum l; when a block raises the max to m', rescale what
# was summed so far by exp(m − m'). The output accumulates the same way.

# %%
def online_softmax_state(q, k, v, block: int):
    """One head, no mask: q (T, d), k/v (S, d), keys visited `block` at a time. Returns the state
    (m, l, acc): running max (T,), running sum of exp(s - m) (T,), unnormalised output (T, d)."""
    T, d = q.shape
    m = torch.full((T,), float("-inf"), dtype=q.dtype)  # running max of each row
    l = torch.zeros(T, dtype=q.dtype)  # running sum of exp(s - m)
    acc = torch.zeros(T, d, dtype=q.dtype)  # running, unnormalised output
    for start in range(0, k.shape[0], block):
        s = q @ k[start:start + block].T / math.sqrt(d)  # (T, block)
        m_new = torch.maximum(m, s.max(dim=1).values)
        p = torch.exp(s - m_new[:, None])
        alpha = torch.exp(m - m_new)  # rescales the old sums to the new max
        l = l * alpha + p.sum(dim=1)
        acc = acc * alpha[:, None] + p @ v[start:start + block]
        m = m_new
    return m, l, acc


def online_softmax_attention(q, k, v, block: int):
    m, l, acc = online_softmax_state(q, k, v, block)
    return acc / l[:, None]


torch.manual_seed(0)
q = torch.randn(37, 64, dtype=torch.float64)
k, v = torch.randn(300, 64, dtype=torch.float64), torch.randn(300, 64, dtype=torch.float64)
ref = torch.softmax(q @ k.T / 8, dim=1) @ v
for block in (1, 16, 64, 300):
    err = ((online_softmax_attention(q, k, v, block) - ref).norm() / ref.norm()).item()
    print(f"block {block:>3}: rel err vs softmax {err:.1e}")

# %% [markdown]
# The state (m, l, acc) after any set of keys summarises them completely. Two states computed over
# *different* keys, say two halves of a long cache on two SMs, merge into the state of the union:
# bring both to the common max m = max(m₁, m₂) and add. FlashAttention's inner loop is this merge
# with one side being a single block; FlashDecoding (section 8) merges the results of programs
# that split the keys.
#
# **Exercise 2.** Merge two partial states of the same query rows and return the attention output
# of all their keys together, (T, d). A state that has seen no key yet is m = −inf, l = 0, acc = 0.

# %%
def softmax_merge(m1, l1, acc1, m2, l2, acc2):
    ### BEGIN SOLUTION
    m = torch.maximum(m1, m2)
    w1 = torch.where(torch.isinf(m1), torch.zeros_like(m1), torch.exp(m1 - m))  # an empty state weighs 0
    w2 = torch.where(torch.isinf(m2), torch.zeros_like(m2), torch.exp(m2 - m))
    return (w1[:, None] * acc1 + w2[:, None] * acc2) / (w1 * l1 + w2 * l2)[:, None]
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("softmax_merge", softmax_merge)

# %% [markdown]
# Your merge, used: the two halves of the keys above, each run through the online softmax on its
# own, then merged.

# %%
halves = online_softmax_state(q, k[:123], v[:123], 16), online_softmax_state(q, k[123:], v[123:], 16)
merged = softmax_merge(*halves[0], *halves[1])
print(f"two halves merged: rel err vs softmax over all 300 keys {((merged - ref).norm() / ref.norm()).item():.1e}")

# %% [markdown]
# ## 3. The kernel
#
# One Triton program owns BLOCK_M (= B_r) queries of one head and keeps them in registers; K and V
# stream past in BLOCK_N (= B_c) blocks; each block's scores S_ij = Q_i K_jᵀ live only on chip.

# %%
def tiling_diagram(n_blocks=4, i=1, j=2):
    """Program i's view: its Q block, the K/V block j streaming past, the score tile S_ij and the state."""
    fig = go.Figure()
    u = 1.0  # one block
    x0, y0 = 2.2, 0.0  # the score matrix's corner: rows = queries (downwards), columns = keys

    def rect(x, y, w, h, color, text="", font=11, line="#555"):
        fig.add_shape(type="rect", x0=x, x1=x + w, y0=y, y1=y + h, fillcolor=color, line_color=line, opacity=0.9)
        if text:
            fig.add_annotation(x=x + w / 2, y=y + h / 2, text=text, showarrow=False, font_size=font)

    top = y0 + n_blocks * u
    for r in range(n_blocks):  # S = Q K^T, N x N, as blocks; row i is program i's, tile (i, j) now
        for c in range(n_blocks):
            color = "#f4a6a6" if (r, c) == (i, j) else "#fde2c8" if r == i and c < j else "#f5f5f5"
            rect(x0 + c * u, top - (r + 1) * u, u, u, color, "Sᵢⱼ" if (r, c) == (i, j) else "")
    fig.add_annotation(x=x0 + n_blocks * u / 2, y=y0 - 0.35, showarrow=False, font_size=11,
                       text="S = Q Kᵀ (N × N): never written to memory")
    for r in range(n_blocks):  # Q blocks on the left
        rect(0.6, top - (r + 1) * u, 1.0, u, "#8fd19e" if r == i else "#e8f5e9", "Qᵢ" if r == i else "")
    fig.add_annotation(x=1.1, y=top + 0.3, text="Q (N × d)", showarrow=False, font_size=11)
    for c in range(n_blocks):  # K^T blocks on top
        rect(x0 + c * u, top + 0.25, u, 1.0, "#7fb3e6" if c == j else "#e3f0fb", "Kⱼᵀ" if c == j else "")
    fig.add_annotation(x=x0 + n_blocks * u + 0.55, y=top + 0.75, text="Kᵀ", showarrow=False, font_size=11)
    rect(x0 + n_blocks * u + 0.5, top - (j + 1) * u, 1.0, u, "#7fb3e6", "Vⱼ")
    fig.add_annotation(x=x0 + n_blocks * u + 1.0, y=top + 0.1, text="V (N × d)", showarrow=False, font_size=11)
    xs = x0 + n_blocks * u + 1.9
    lines = ["program i owns Qᵢ (B_r × d), in registers",
             "for j = 0 … ⌈N/B_c⌉ − 1: Kⱼ, Vⱼ stream past (B_c × d)",
             "  Sᵢⱼ = Qᵢ Kⱼᵀ · scale",
             "  m' = max(m, rowmax Sᵢⱼ)",
             "  P = exp(Sᵢⱼ − m')",
             "  l = l · exp(m − m') + rowsum P",
             "  acc = acc · exp(m − m') + P Vⱼ;  m = m'",
             "Oᵢ = acc / l: written once",
             "every program reads all of K and V:",
             "  K, V read ⌈N/B_r⌉ times per head"]
    for n, text in enumerate(lines):
        fig.add_annotation(x=xs, y=top + 0.9 - n * 0.52, text=text, showarrow=False, xanchor="left", font_size=12)
    fig.update_xaxes(visible=False, range=[0.4, xs + 4.6])
    fig.update_yaxes(visible=False, range=[y0 - 0.7, top + 1.5])
    fig.update_layout(title="FlashAttention: tiles of S computed on chip, one query block per program, online softmax",
                      height=380, width=900, plot_bgcolor="white", margin=dict(l=10, r=10, t=50, b=10))
    return fig


show(tiling_diagram())

# %% [markdown]
# **Exercise 3.** Write that loop in Triton. The kernel below is complete except for it: one
# program per (query block, head) of contiguous (H, N, d) tensors, q already loaded, the state
# initialised, the epilogue written. Fill in the loop over key blocks: load K and V rows
# `start .. start + BLOCK_N` (mask the rows ≥ N), compute the scores with `tl.dot`, hide the columns
# ≥ N with −inf, and update m_i, l_i, acc as in the diagram. Keep everything in float32
# (`.to(tl.float32)` after each load, `input_precision="ieee"` in `tl.dot`) so that the check can be
# exact; the library's kernel runs the second product in fp16 on the tensor cores instead. On a
# machine without a GPU it runs in Triton's interpreter, on small tensors, in seconds.

# %%
@triton.jit
def attn_kernel(Q, K, V, O, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head, block = tl.program_id(1), tl.program_id(0)
    base = head * N * D  # (H, N, D) contiguous
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows of this program
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, D], tl.float32)  # unnormalised output
    ### BEGIN SOLUTION
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n  # (BLOCK_N,) key positions
        kv = base + cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv, mask=cols[:, None] < N, other=0.0).to(tl.float32)  # (BLOCK_N, D)
        v = tl.load(V + kv, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(cols[None, :] < N, s, float("-inf"))  # keys past N: no weight at all
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    ### END SOLUTION
    out = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)


def my_flash_attention(q, k, v, block_m=16, block_n=16):
    """Non-causal attention of (H, N, d) tensors with attn_kernel: one program per (query block, head)."""
    H, N, d = q.shape
    q, k, v = (t.to(device).contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    try:
        attn_kernel[(triton.cdiv(N, block_m), H)](q, k, v, out, N, 1 / math.sqrt(d), D=d, BLOCK_M=block_m, BLOCK_N=block_n)
    except Exception as e:  # the stub's NotImplementedError arrives wrapped by Triton
        if "NotImplementedError" in f"{e!r} {e}":
            raise NotImplementedError("exercise: attn_kernel") from None
        raise
    return out


# %%
# NBVAL_CHECK_OUTPUT
check("flash_inner_loop", my_flash_attention)

# %% [markdown]
# Your kernel against the library's on one larger problem (the library's in fp16 on a GPU, so the
# difference is the fp16 rounding of P):

# %%
Hm, Nm, dm = pick((8, 1000, 64), (2, 100, 32))
qm, km, vm = (torch.randn(Hm, Nm, dm, device=device, dtype=DTYPES[0]) for _ in range(3))
mine = my_flash_attention(qm, km, vm, *pick((64, 32), (16, 16)))
lib = fa.flash_attention(qm[None], km[None], vm[None], causal=False, kernel="pointer", block=pick((64, 64), (32, 16)))[0]
print(f"your kernel vs flash_attention, H={Hm}, N={Nm}, d={dm}, {str(DTYPES[0])[6:]}: rel err "
      f"{((mine.float() - lib.float()).norm() / lib.float().norm()).item():.1e}")

# %% [markdown]
# The library has two versions of this loop, in the same steps with three refinements: exp2 with
# log2(e) folded into the scale saves a multiply per score; causal programs run the blocks fully
# below the diagonal without any mask and mask only the diagonal block; keys past every query's
# position are never loaded (which is also what a static KV cache needs). The **pointer** kernel
# computes one address per element and works everywhere (any GPU, Triton's interpreter on a CPU,
# explicit query positions `q_pos` for a static KV cache). The **TMA** kernel is the same algorithm
# for Hopper: each tile is fetched by the Tensor Memory Accelerator from a *descriptor* (base,
# shape, strides, tile shape) built once on the host over the 4-d tensor, so the loads cost no
# per-element address arithmetic, rows past the end come back as zeros (no load masks for ragged
# lengths), and Triton pipelines the copies into shared memory `num_stages` tiles ahead. Causal
# programs are also launched longest first, so the short diagonal blocks fill the last wave.
# `flash_attention` takes the TMA kernel for fp16/bf16 on sm_90+ when there is no `q_pos`, the
# pointer kernel otherwise.

# %%
show_source(fa._attn_inner_tma)
show_source(fa._attn_fwd_tma)

# %% [markdown]
# The pointer kernel differs in its loads (`tl.load` of `k_ptrs + cols * stride`, with masks) and
# in taking the causal bounds from `q_pos` when given:

# %%
show_source(fa._attn_inner)

# %% [markdown]
# ## 4. Check against a float32 reference, on awkward shapes

# %%
def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


# Both kernels, each with one fixed tiling (every tiling and every new shape class is a separate
# compile; the interpreter tests in tests/test_flash_attention.py cover other tilings), q passed as a
# transposed view as the decoder passes it, against SDPA in float32. bf16 on one shape only.
checks = []
cases = pick([(torch.float16, (2, 8, 2, 17, 128)), (torch.float16, (2, 32, 8, 1000, 128)),
              (torch.float16, (1, 8, 8, 4097, 64)), (torch.bfloat16, (2, 32, 8, 1000, 128))],
             [(dt, shape) for dt in DTYPES for shape in [(1, 2, 2, 1, 64), (2, 4, 2, 17, 64), (1, 2, 1, 100, 128)]])
kernels = {"tma": pick((128, 64, 2, 4), (32, 16)), "pointer": pick((128, 128, 3, 8), (32, 16))}
for dtype, (B, Hq, Hkv, N, d) in cases:
    for causal in (False, True):
        q = torch.randn(B, N, Hq, d, device=device, dtype=dtype).transpose(1, 2)  # (B, H, N, d) view
        k = torch.randn(B, Hkv, N, d, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, N, d, device=device, dtype=dtype)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)
        for kernel, block in kernels.items():
            if kernel == "tma" and not fa.tma_usable(q, k, v):
                continue  # fp32 on the CPU: the pointer kernel only
            out = fa.flash_attention(q, k, v, causal=causal, kernel=kernel, block=block)
            checks.append({"kernel": kernel, "dtype": str(dtype)[6:], "B": B, "heads q/kv": f"{Hq}/{Hkv}",
                           "N": N, "d": d, "causal": causal, "rel err": rel_err(out, ref)})
checks = pd.DataFrame(checks)
print(checks.to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
print(f"every shape within 1e-2 of the float32 reference: {bool((checks['rel err'] <= 1e-2).all())}")

# %% [markdown]
# ## 5. Speed against SDPA (FlashAttention-2 and cuDNN backends) and naive attention
#
# B·N = 16k tokens, 32 heads, fp16, FLOPs counted as 4·B·H·N²·d (half for causal). `triton` is
# `flash_attention` as a caller gets it (the TMA kernel, autotuned per length bucket); beside it the
# pointer kernel with one fixed tiling, to show what the descriptors buy.
#
# **The ceiling, predicted.** At the lengths measured here (N ≥ 1024) the kernel has enough
# arithmetic per byte to be compute-bound as long as the K/V re-reads hit in L2 (section 1), so its
# ceiling is the tensor cores' rate minus what the softmax costs.
# Per SM and clock cycle, a Hopper SM (H100, H200) does 2,048 dense fp16/bf16 FMAs on its four
# tensor cores (an A100's SM: 1,024), but only 16 exponentials on its special-function units.
# For one B_r × B_c tile the two matmuls cost 2·B_r·B_c·d FMAs and the softmax B_r·B_c
# exponentials; a kernel that does not overlap the two at all waits for both, one that overlaps
# them with warp specialization (FlashAttention-3, cuDNN) can hide the exponentials behind the
# matmuls. The library's kernel has no warp specialization (FlashAttention-2 style):

# %%
FMA_PER_SM = {9: 2048, 8: 1024}  # dense fp16/bf16 tensor-core FMA per cycle per SM: Hopper, Ampere (A100)
EXP_PER_SM = 16  # exponentials (MUFU.EX2) per cycle per SM
if has_cuda():
    major = torch.cuda.get_device_capability()[0]
    sms, name = torch.cuda.get_device_properties(0).multi_processor_count, torch.cuda.get_device_name()
else:  # no GPU: the figures of an H100 SXM from its data sheet
    major, sms, name = 9, 132, "H100 80GB HBM3"
fma = FMA_PER_SM.get(major, 2048)
sheet = spec_sheet(name)
if sheet:
    print(f"{name}: data sheet {sheet[1]} TFLOP/s = 2 x {sms} SMs x {fma} FMA/cycle x "
          f"{sheet[1] * 1e12 / (2 * sms * fma) / 1e9:.2f} GHz (the clock the sheet's figure implies)")
bound = []
for d in (128, 64):
    br, bc = 128, 64
    mma_cycles = 2 * br * bc * d / fma  # Q K^T and P V of one tile
    exp_cycles = br * bc / EXP_PER_SM
    frac = mma_cycles / (mma_cycles + exp_cycles)
    bound.append({"head_dim": d, "tile": f"{br}x{bc}", "matmul cycles": mma_cycles, "exp cycles": exp_cycles,
                  "no overlap: share of peak": frac,
                  "predicted TFLOP/s (no overlap)": frac * ceil["matmul_bf16_tflops"]})
bound = pd.DataFrame(bound)
print(bound.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))

# %% [markdown]
# (The matmul rate in the last column is the one measured in notebook 00, 687 TFLOP/s, 69% of the
# data sheet's 989: at 2,048 FMA per cycle per SM it corresponds to 1.27 GHz rather than the
# 1.83 GHz the sheet's figure implies; under a full tensor-core load the clock falls below the
# boost clock, and even a large matmul does not keep every tensor core busy on every cycle.)
#
# **Predict first.** What fraction of the measured dense matmul rate will the Triton kernel reach at
# the longest length below, head_dim 128, non-causal? Enter a number between 0 and 1.

# %%
my_triton_share_of_peak = None  # your prediction, e.g. 0.5

# %%
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

REP_MS = 40  # per timing: enough for a stable median of kernels of 0.1-10 ms


def measure(fn, flops):
    """TFLOP/s at the median time, and at the p80 and p20 times (the spread); Nones if it cannot run."""
    try:
        t = time_fn(fn, rep_ms=REP_MS)
    except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that cannot run this shape
        print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        torch.cuda.empty_cache() if has_cuda() else None
        return None, None, None
    return flops / t.median_ms / 1e9, flops / t.p80_ms / 1e9, flops / t.p20_ms / 1e9


def sdpa_with(backend, q, k, v, causal):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def naive(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v as written: matmul, scale, (mask,) softmax, matmul kernels."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


NAIVE_MAX_N = 4096  # beyond: 16k x 16k scores are 512 MiB per head, 16 GiB for 32 heads, per copy
records = []
lengths = pick([1024, 4096, 16384], [64])
for d in pick([128, 64], [64]):
    for causal in (False, True):
        for N in lengths:
            B, Hh = pick(16384, 128) // N, pick(32, 2)
            q, k, v = (torch.randn(B, Hh, N, d, device=device, dtype=DTYPES[0]) for _ in range(3))
            flops = fa.attention_flops(B, Hh, N, N, d, causal)
            runs = {"triton": lambda: fa.flash_attention(q, k, v, causal=causal),
                    "triton_pointer": lambda: fa.flash_attention(q, k, v, causal=causal, kernel="pointer",
                                                                 block=kernels["pointer"])}
            if has_cuda():
                runs["sdpa_flash"] = lambda: sdpa_with(SDPBackend.FLASH_ATTENTION, q, k, v, causal)
                runs["sdpa_cudnn"] = lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)
            if N <= NAIVE_MAX_N:
                runs["naive"] = lambda: naive(q, k, v, causal)
            for kernel, fn in runs.items():
                med, lo, hi = measure(fn, flops)
                records.append({"N": N, "causal": causal, "head_dim": d, "dtype": str(DTYPES[0])[6:], "kernel": kernel,
                                "tflops": med, "tflops_p20": lo, "tflops_p80": hi})
            del q, k, v
perf = pd.DataFrame(records).dropna(subset=["tflops"])
table = perf.assign(cell=[f"{m:,.3g} ({lo:,.3g}-{hi:,.3g})" for m, lo, hi in
                          zip(perf.tflops, perf.tflops_p20, perf.tflops_p80)])
print("TFLOP/s, median (p20-p80 of the times)")
print(table.pivot_table(index=["head_dim", "causal", "N"], columns="kernel", values="cell", aggfunc="first")
      .to_string())

# %%
# The Triton kernel against the two library kernels at d = 128, fp16, N >= 4096: the lowest ratio
# of its TFLOP/s to theirs over those lengths.
wide = perf.pivot_table(index=["head_dim", "causal", "N"], columns="kernel", values="tflops").reset_index()
big = wide[(wide.N >= 4096) & (wide.head_dim == 128)]
ratio = big.dropna(subset=["sdpa_cudnn", "sdpa_flash"]) if "sdpa_cudnn" in big else big.iloc[:0]
if len(ratio):
    ratio = ratio.assign(vs_cudnn=ratio.triton / ratio.sdpa_cudnn, vs_flash=ratio.triton / ratio.sdpa_flash)
    print(ratio[["N", "causal", "triton", "sdpa_cudnn", "sdpa_flash", "vs_cudnn", "vs_flash"]]
          .to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
nc, ca = (ratio[~ratio.causal], ratio[ratio.causal]) if len(ratio) else (ratio, ratio)
fwd_ratios = {"fwd_vs_cudnn_min": nc.vs_cudnn.min(), "fwd_vs_flash_min": nc.vs_flash.min(),
              "fwd_causal_vs_cudnn_min": ca.vs_cudnn.min()} if len(ratio) else {}
for key, what in (("fwd_vs_cudnn_min", "Triton / cuDNN, non-causal"), ("fwd_vs_flash_min", "Triton / SDPA's FlashAttention-2, non-causal"),
                  ("fwd_causal_vs_cudnn_min", "Triton / cuDNN, causal")):
    if key in fwd_ratios:
        print(f"{what}, lowest over N >= 4096: {fwd_ratios[key]:.2f}x")

# %%
d_top = int(wide.head_dim.max())  # 128 (in a smoke run, the only head_dim measured)
top = wide[(wide.head_dim == d_top) & ~wide.causal & (wide.N == max(lengths))].iloc[0]
share = top.triton / ceil["matmul_bf16_tflops"]
predict(f"Triton kernel / matmul peak (d={d_top}, N={max(lengths)}, non-causal)", my_triton_share_of_peak, share)
print(f"predicted without overlap: {bound.iloc[0]['no overlap: share of peak']:.2f} of the peak (d=128), "
      f"{bound.iloc[1]['no overlap: share of peak']:.2f} (d=64)")
for d in sorted(wide.head_dim.unique(), reverse=True):
    w = wide[(wide.head_dim == d) & ~wide.causal & (wide.N == max(lengths))].iloc[0]
    line = f"d={d}, N={max(lengths)}, non-causal: triton {w.triton:,.1f} TFLOP/s = {w.triton / ceil['matmul_bf16_tflops']:.0%} of the matmul peak"
    if "sdpa_cudnn" in w and pd.notna(w.sdpa_cudnn):
        line += f"; cuDNN {w.sdpa_cudnn / ceil['matmul_bf16_tflops']:.0%}; SDPA flash {w.sdpa_flash / ceil['matmul_bf16_tflops']:.0%}"
    print(line)
tma_gain = (wide.triton / wide.triton_pointer - 1)
print(f"TMA kernel over the pointer kernel: {tma_gain.min():+.0%} to {tma_gain.max():+.0%} across the table "
      f"(largest at N={int(wide.loc[tma_gain.idxmax(), 'N'])})")

# %% [markdown]
# **Reading the table.** At N = 16k, non-causal, the Triton kernel reaches 535 TFLOP/s at head_dim
# 128 (p20-p80 533-539), 78% of the measured matmul rate, and 401 TFLOP/s at head_dim 64 (388-414),
# 58%: above the "no overlap" shares of 67% and 50%, so some of the exponentials already run while
# the tensor cores work (the matmuls are issued asynchronously, and at head_dim 128 the chosen tiling
# needs ~96 KiB of shared memory, so two programs fit on one SM and one program's softmax can run
# during the other's matmuls). cuDNN goes further, 670 and 463 TFLOP/s (644-672 and 455-467; 98% and
# 67% of the matmul rate): at head_dim 128 it hides almost all of the softmax behind the matmuls, by
# overlapping the softmax of one tile with the tensor-core work of another on purpose (warp
# specialization with producer/consumer warp groups, as in FlashAttention-3). The kernel can be
# compiled with Triton's `warp_specialize` (the `WARP_SPEC` flag), but none of the autotuner's
# configurations turns it on (section 6 prints `WARP_SPEC: False` for every choice), so what is
# measured here is the kernel without it. SDPA's FlashAttention-2 backend reaches 338 and 303 TFLOP/s
# there (49% and 44%), and no more than 338 at any length.
#
# Against the two SDPA backends at head_dim 128 and N ≥ 4096 (the ratio table above), the Triton
# kernel is 1.51× to 1.60× SDPA's FlashAttention-2 and 0.78× to 0.93× cuDNN. Non-causal, the ratio to
# cuDNN hardly moves with length (0.79 at N = 4096, 0.80 at N = 16k: both kernels gain about as much
# from the longer rows); causal, it rises from 0.78 at N = 4096 to 0.93 at N = 16k, where cuDNN's
# causal rate falls further below its non-causal one (552 against 670 TFLOP/s) than Triton's (515
# against 535). At head_dim 64 and N ≥ 4096 it is 0.73× to 0.86× cuDNN.
#
# The TMA kernel, as a caller gets it, is ahead of the pointer kernel only at head_dim 128 from
# N = 4096 on (+9% to +19%, and equal at N = 4096 causal) and at head_dim 64, N = 16k, non-causal
# (+6%). It is behind at every N = 1024 (−6% to −26%, the most at head_dim 64, causal), at head_dim
# 64 and N = 4096 (−11% non-causal, −18% causal), and about equal at head_dim 64, N = 16k, causal.
# The pointer kernel's fixed tiling (128 × 128, 3 stages, 8 warps, set in section 4) is one of the
# autotuner's candidates too, but the autotuner kept other tilings (section 6): either the
# descriptors do not pay at that tiling either, or the autotuner's own timings picked a slower
# one; this table does not tell which. Where the Triton kernel loses further:
#
# - **short sequences** (N = 1024 with B = 16): each program has only a few key blocks to stream,
#   so the fixed costs (loading Q, the epilogue, the masked diagonal block when causal) weigh more:
#   at head_dim 128 it runs at 298 TFLOP/s non-causal (p20-p80 259-304) and 197 causal (144-255) at
#   N = 1024, against 535 and 515 at N = 16k. Here it falls behind SDPA's FlashAttention-2 as well
#   (324 and 257 TFLOP/s), and at head_dim 64 too (207 and 129 against 290 and 215);
# - **head_dim 64**: half the matmul work per score, the same softmax work per score, so the
#   exponentials weigh twice as much (the prediction drops from 2/3 to 1/2 of the peak) and every
#   kernel drops, cuDNN too (at N = 16k non-causal: Triton 535 → 401, cuDNN 670 → 463, SDPA
#   FlashAttention-2 338 → 303 TFLOP/s). At N = 4096 causal, Triton (268, p20-p80 233-281) is no
#   faster than SDPA's FlashAttention-2 (281, 278-283);
# - **naive attention** is memory-bound (section 1): 132 TFLOP/s at N = 1024 (127-135) and 98 at
#   N = 4096 (head_dim 128, non-causal), under the 168 and 179 TFLOP/s that its 6N² traffic allows at
#   the copy ceiling. Causally masked it runs the full matrix plus a masking pass and then throws half
#   the work away (31 and 27 TFLOP/s). It is left out at N = 16k, where each copy of the scores of the
#   32 heads is 16 GiB (section 7 runs it once for its memory: 32 GiB extra at the peak).
#
# **Naive attention: which traffic model is right?** Section 1 counted 4N² or 6N² matrix values;
# at the copy bandwidth these predict 265 and 179 TFLOP/s at N = 4096, head_dim 128, but the table
# measured 98. Timing each of its kernels alone shows where the time goes:

# %%
Nn, dn = pick(4096, 64), 128
Bn, Hn = pick(16384, 128) // Nn, pick(32, 2)
q, k, v = (torch.randn(Bn, Hn, Nn, dn, device=device, dtype=DTYPES[0]) for _ in range(3))
s = q @ k.transpose(-2, -1)
s2 = s / math.sqrt(dn)
p = torch.softmax(s2, -1)
el, mat, vec = q.element_size(), Bn * Hn * Nn * Nn, Bn * Hn * Nn * dn  # bytes/value, values of S, of Q
stages = [("S = Q K^T", lambda: q @ k.transpose(-2, -1), (2 * vec + mat) * el),
          ("S / sqrt(d)", lambda: s / math.sqrt(dn), 2 * mat * el),
          ("softmax", lambda: torch.softmax(s2, -1), 2 * mat * el),
          ("O = P V", lambda: p @ v, (mat + 2 * vec) * el)]
rows = []
for name, fn, nbytes in stages:
    t = time_fn(fn, rep_ms=REP_MS)
    rows.append({"kernel": name, "MB moved": nbytes / 1e6, "ms": t.median_ms, "p20-p80 ms": f"{t.p20_ms:.3f}-{t.p80_ms:.3f}",
                 "GB/s": nbytes / t.median_ms / 1e6, "of copy BW": nbytes / t.median_ms / 1e6 / ceil["copy_gbps"],
                 "model ms (at copy BW)": nbytes / (ceil["copy_gbps"] * 1e6)})
t_all = time_fn(lambda: naive(q, k, v, False), rep_ms=REP_MS)
stage_df = pd.DataFrame(rows)
print(stage_df.to_string(index=False, float_format=lambda x: f"{x:,.3f}"))
fl = fa.attention_flops(Bn, Hn, Nn, Nn, dn, False)
model4 = (4 * mat + 4 * vec) * el / (ceil["copy_gbps"] * 1e6)  # ms, scale folded into Q
model6 = stage_df["model ms (at copy BW)"].sum()
print(f"N={Nn}, d={dn}: naive end to end {t_all.median_ms:.3f} ms (p20-p80 {t_all.p20_ms:.3f}-{t_all.p80_ms:.3f}) "
      f"= {fl / t_all.median_ms / 1e9:,.1f} TFLOP/s; its kernels timed alone sum to {stage_df.ms.sum():.3f} ms")
print(f"traffic models at the copy ceiling: 4N^2 (scale folded) {model4:.3f} ms = {fl / model4 / 1e9:,.1f} TFLOP/s; "
      f"6N^2 (as written) {model6:.3f} ms = {fl / model6 / 1e9:,.1f} TFLOP/s; "
      f"measured / 6N^2 model = {t_all.median_ms / model6:.2f}x the time")
del q, k, v, s, s2, p

# %% [markdown]
# The 4N² model is the wrong count for this code: the scale is a kernel of its own, and each of the
# four kernels moves its matrix through HBM once or twice. With the 6N² count the model predicts
# 6.16 ms and the measurement takes 11.23 ms (p20-p80 11.20-11.27), 1.82× as long; the kernels timed
# alone add up to 11.24 ms, the same, so the gap is how far each kernel falls short of the copy
# bandwidth (the "of copy BW" column). The scale runs at the copy ceiling (1.005), O = P V at 0.93
# and S = Q Kᵀ at 0.76 of it, but the softmax moves its 8.6 GB at 1,284 GB/s, 0.30 of the
# ceiling: 6.69 ms where the model allows 2.01, which is 4.7 of the 5.1 ms of the gap. Per-kernel
# bytes over per-kernel time is the model that holds; a single intensity for the whole computation
# only bounds it.

# %%
fig = px.line(perf, x="N", y="tflops", color="kernel", line_dash="causal", facet_col="head_dim", markers=True,
              log_x=True, error_y=perf.tflops_p80 - perf.tflops, error_y_minus=perf.tflops - perf.tflops_p20,
              labels={"tflops": "TFLOP/s"}, title="Attention forward, B·N = 16k tokens, 32 heads (bars: p20-p80; dotted: measured matmul peak)")
fig.add_hline(y=ceil["matmul_bf16_tflops"], line_dash="dot", line_color="grey")
show(fig)

# %% [markdown]
# ## 6. Block sizes
#
# What bounds the tiles on Hopper (H100, H200): a program's Q tile (BLOCK_M × d) stays on chip for
# its whole life, and the pipeline keeps `num_stages` K and V tiles (BLOCK_N × d each) in flight in
# shared memory, at most 227 KiB per block; the fp32 accumulator (BLOCK_M × d) and the score tile
# (BLOCK_M × BLOCK_N) live in the registers of `num_warps` warps (at most 255 registers a thread).
# Hopper's wgmma instructions want 64 rows per warp group, so BLOCK_M is 64 or 128 with 4 or 8 warps.
# BLOCK_M is also B_r of section 1: a larger one means fewer re-reads of K and V. Within those
# limits the autotuner tries a handful of tilings (`fa._TMA_CONFIGS`, picked from a wider sweep;
# each is a separate compile) and keeps the fastest per (length bucket, head_dim, causal). What it
# chose in this run:

# %%
for key, cfg in fa._attn_fwd_tma_tuned.cache.items():
    print(key, "->", cfg)


def smem_bytes(block_m, block_n, d, stages, dtype_bytes=2):
    """Shared memory a configuration needs, roughly: the Q tile plus `stages` K and V tiles."""
    return (block_m * d + stages * 2 * block_n * d) * dtype_bytes


SLIDER_HEADS = pick(8, 1)  # the interpreter runs every program in Python: a CPU gets a small problem (N <= 256)


def try_blocks(seq_len: int = 4096, block_m: int = 128, block_n: int = 64, stages: int = 2, warps: int = 4):
    d, limit = 128, 227 * 1024  # Hopper gives a block up to 227 KiB of shared memory
    if any(b & (b - 1) or b < 16 for b in (block_m, block_n)) or warps not in (4, 8):
        print(f"BLOCK_M={block_m}, BLOCK_N={block_n}, warps={warps}: blocks must be powers of two >= 16 "
              "(tile shapes of tl.dot and TMA), warps 4 or 8")
        return
    need = smem_bytes(block_m, block_n, d, stages)
    if need > limit:
        print(f"BLOCK_M={block_m}, BLOCK_N={block_n}, {stages} stages: ~{need / 1024:.0f} KiB of shared memory, "
              f"more than the {limit // 1024} KiB a block may use: this configuration does not fit")
        return
    qq, kk, vv = (torch.randn(1, SLIDER_HEADS, seq_len, d, device=device, dtype=DTYPES[0]) for _ in range(3))
    block = (block_m, block_n, stages, warps) if has_cuda() else (block_m, block_n)
    try:
        t = time_fn(lambda: fa.flash_attention(qq, kk, vv, causal=True, block=block), warmup_ms=pick(25, 0),
                    rep_ms=pick(40, 0), min_reps=pick(3, 1))  # on a CPU: two calls, a few seconds at most
    except Exception as e:  # noqa: BLE001  (registers or shared memory: tell the reader, do not crash)
        print(f"BLOCK_M={block_m}, BLOCK_N={block_n}, {stages} stages, {warps} warps did not run: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return
    kv_reads = -(-seq_len // block_m)
    print(f"N={seq_len}, {SLIDER_HEADS} heads, BLOCK_M={block_m}, BLOCK_N={block_n}, {stages} stages, {warps} warps: "
          f"{t.median_ms:.3f} ms (p20-p80 {t.p20_ms:.3f}-{t.p80_ms:.3f}), "
          f"{fa.attention_flops(1, SLIDER_HEADS, seq_len, seq_len, d, True) / t.median_ms / 1e9:,.1f} TFLOP/s "
          f"(~{need / 1024:.0f} KiB smem; K/V read by {kv_reads} query blocks)")


try_blocks(pick(4096, 64), pick(128, 32), pick(64, 16))
try_blocks(pick(4096, 64), 256, 256, 4)  # too big: a message, not a crash
slider(try_blocks, seq_len=(64, pick(16384, 256), 64, pick(4096, 64)), block_m=(16, 256, 16, pick(128, 32)),
       block_n=(16, 256, 16, pick(64, 16)), stages=(1, 5, 1, 2), warps=(4, 8, 4, 4))

# %% [markdown]
# The default call uses the tiling the autotuner chose for causal N = 4096 at head_dim 128
# (128 × 64, 2 stages, 4 warps) and reaches 133 TFLOP/s at the median, with a wide spread (p20-p80
# of the times 0.226-0.411 ms, 84 to 152 TFLOP/s), against 396 for the same shape class in
# section 5. The problem is 16 times smaller: one sequence of 8 heads gives 256 programs for 132 SMs
# (two fit on an SM at this tiling, so all of them start at once), too few to even out the unequal
# lengths of causal rows, and the call lasts as long as the longest rows; section 5 ran 4 sequences
# of 32 heads.
#
# ## 7. Memory: the matrix that is never written
#
# The naive forward keeps two N × N matrices alive at once (the scores while the scaled copy is
# made, then the scaled copy while the softmax writes the probabilities): 2 · 2 bytes · H · N²
# extra. The fused kernel allocates only its output. The measured peaks below agree: naive attention
# takes the model's 0.125, 2 and 32 GiB plus its output (0.008, 0.031 and 0.125 GiB), the Triton
# kernel exactly its output.

# %%
mem = []
if has_cuda():
    for N in [1024, 4096, 16384]:
        q, k, v = (torch.randn(1, 32, N, 128, device=device, dtype=torch.float16) for _ in range(3))
        for name, fn in [("naive", lambda: naive(q, k, v, False)),
                         ("flash (Triton)", lambda: fa.flash_attention(q, k, v, causal=False))]:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                fn()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            except torch.OutOfMemoryError:
                peak = None
            mem.append({"N": N, "kernel": name, "peak extra GiB": None if peak is None else peak / 2**30,
                        "model GiB": (32 * N * N * (2 + 2) if name == "naive" else 32 * N * 128 * 2) / 2**30})
        del q, k, v
    mem = pd.DataFrame(mem)
    print(mem.to_string(index=False, float_format=lambda x: f"{x:,.3f}"))
else:
    print("peak-memory measurement needs a GPU (the CPU allocator keeps no statistics)")

# %% [markdown]
# ## 8. Decode attention (FlashDecoding)
#
# At decode time each sequence has one query and a long cache. One program per (batch, head) would
# leave most SMs idle, so `flash_decode` splits the keys into chunks handled by separate programs
# (each taking all the query heads that share one KV head) and merges their partial results
# exactly through their log-sum-exps: your `softmax_merge` with the state (lse, 1, o), since a
# normalised output o with log-sum-exp lse is the state m = lse, l = 1, acc = o. Here is that
# merge on two halves of the keys computed by the library's kernel:

# %%
Hs, Ns, ds = pick(8, 2), pick(2048, 64), 64
qs, ks, vs = (torch.randn(1, Hs, n, ds, device=device, dtype=DTYPES[0]) for n in (4, Ns, Ns))
blk = pick((64, 64), (16, 16))
parts = [fa.flash_attention(qs, ks[:, :, sl], vs[:, :, sl], causal=False, return_lse=True, kernel="pointer", block=blk)
         for sl in (slice(0, Ns // 3), slice(Ns // 3, Ns))]  # (out (1, H, 4, d), lse (1, H, 4)) of each part
(o1, lse1), (o2, lse2) = [(o[0].reshape(-1, ds).float(), lse[0].reshape(-1)) for o, lse in parts]
merged = softmax_merge(lse1, torch.ones_like(lse1), o1, lse2, torch.ones_like(lse2), o2).reshape(Hs, 4, ds)
whole = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float())[0]
print(f"two key ranges merged with softmax_merge: rel err vs attention over all {Ns} keys {rel_err(merged, whole):.1e}")

# %% [markdown]
# Decode attention's speed is a bandwidth question: K and V are read once, so its ceiling is the
# copy bandwidth. Measured on a Qwen2.5-7B-like layer (28 query heads over 4 KV heads, head_dim 128),
# 4 sequences of 32k cached tokens in a full run:

# %%
show_source(fa.flash_decode)

Bd, S = pick(4, 2), pick(32768, 256)
qd = torch.randn(Bd, 28, 1, 128, device=device, dtype=DTYPES[0])
kd = torch.randn(Bd, 4, S, 128, device=device, dtype=DTYPES[0])
vd = torch.randn_like(kd)
lens = torch.tensor([[S - 1], [S // 3]] + [[S - 1]] * (Bd - 2), device=device)
ref = naive_attention(qd.float(), kd.float(), vd.float(), lens)  # the float32 reference of notebook 01
dec_err = rel_err(fa.flash_decode(qd, kd, vd, lens), ref)
full = torch.full((Bd, 1), S - 1, device=device)
t = time_fn(lambda: fa.flash_decode(qd, kd, vd, full))
splits = fa.default_num_splits(Bd, 4, S, qd.device)
dec_gbps = (kd.nbytes + vd.nbytes) / t.median_ms / 1e6
print(f"decode: rel err {dec_err:.1e}; {t.median_ms * 1e3:.1f} us (p20-p80 {t.p20_ms * 1e3:.1f}-{t.p80_ms * 1e3:.1f}) for "
      f"{Bd} x {S:,} cached tokens, {Bd * 4 * splits} programs ({splits} splits): {dec_gbps:,.0f} GB/s "
      f"= {dec_gbps / ceil['copy_gbps']:.0%} of the copy ceiling ({ceil['copy_gbps']:,.0f} GB/s)")

# %% [markdown]
# The 268 MB of K and V take 82.1 µs at the median (p20-p80 81.2-83.4 µs): 3,269 GB/s, 77% of the
# copy ceiling (75% to 77% across that spread). At this size a call is short enough for fixed costs
# to weigh: the second (merge) kernel and the start and the tail of a grid of 272 short programs
# (17 splits of about 1,900 keys each), each reading one chunk.
#
# Plugged into the lab decoder through its attention seam, with a static cache: the greedy text
# of the embedded model must not change.

# %%
hf, tok = load_model()
model = Decoder.from_hf(hf)
ids = encode_prompt(tok, "Name the planets of the solar system.", device=device)
n_new = pick(24, 4)  # a CPU runs every decode step of every layer through the interpreter
ref_ids = greedy_cached(model.set_attention("sdpa"), ids, n_new, static_caches(model, 1, ids.shape[1] + n_new))
flash_ids = greedy_cached(model.set_attention("flash"), ids, n_new, static_caches(model, 1, ids.shape[1] + n_new))
print(tok.decode(flash_ids[0, ids.shape[1]:], skip_special_tokens=True))

# %%
# NBVAL_CHECK_OUTPUT
print(f"greedy text with the flash backend == with SDPA: {torch.equal(ref_ids, flash_ids)}")
print(f"decode attention within 1e-2 of the float32 reference: {dec_err <= 1e-2}")

# %% [markdown]
# ## 9. Results

# %%
metrics = {"attn_fwd": perf.astype(object).where(perf.notna(), None).to_dict(orient="records"),
           "naive_stages": stage_df.to_dict(orient="records"), "correctness": checks.to_dict(orient="records"),
           "decode_rel_err": dec_err, "decode_gbps": dec_gbps, "decode_us_p20_p80": [t.p20_ms * 1e3, t.p80_ms * 1e3],
           "copy_gbps": ceil["copy_gbps"], "matmul_tflops": ceil["matmul_bf16_tflops"], "ceilings_source": ceil["source"],
           "triton_share_of_matmul_peak": share, **fwd_ratios,
           "fwd_configs": {str(k): str(v) for k, v in fa._attn_fwd_tma_tuned.cache.items()}}
path = save_results("03_flash_attention", metrics, dtype=DTYPES[0])
print(f"wrote {path.parent.name}/{path.name}")  # relative: the same on every machine
