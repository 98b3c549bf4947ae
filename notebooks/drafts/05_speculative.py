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
# # 05 · Speculative decoding: several tokens for the price of one
#
# At batch 1 a decode step reads every weight to emit one token (notebook 02), and the matmuls
# are far from their arithmetic limit: multiplying the same weights by 5 rows instead of 1 costs
# little more than reading them. **Speculative decoding** spends that idle arithmetic: a cheap
# *drafter* guesses the next k tokens, the *target* model scores all k + 1 positions in one forward
# with its KV cache, and a rejection rule keeps a prefix of the guesses, so that the output is
# distributed **exactly** as the target's own sampling would be (greedy: token for token the same).
# This notebook
#
# 1. states the rule and has you write it;
# 2. builds the algorithm from scratch on the lab decoder (rollback in a static cache is free);
# 3. shows that it is lossless: identical greedy text, and a chi-square test of sampled tokens with
#    a wrong rule as the negative control;
# 4. builds three drafters and measures how often the embedded model accepts them, on three tasks:
#    prompt lookup (no model), an EAGLE-style draft head trained here on the target's own features,
#    and an early-exit draft (the target's first layers);
# 5. derives the speedup model, measures what verification costs on a Qwen2.5-7B **shape twin**,
#    and brings it close to the cost of one token;
# 6. measures end to end on the GPU against the plain lab engine and HF `generate`'s prompt lookup,
#    predicts the speedup at 7B scale, and finds where speculation stops paying (batch size,
#    temperature).
#
# Real weights (acceptance, text) come from the embedded SmolLM2-135M-Instruct. Speeds at 7B scale
# come from a **shape twin** (the exact architecture, random weights): it has no meaningful
# acceptance, so its speedups are *predicted* from its measured costs and the real acceptance.

# %%
import time

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from labutils import configs, draft_head, spec_checks
from labutils.data import TASKS, speculative_tasks
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine, compile_layers
from labutils.bench import time_fn
from labutils.exercises import check, predict
from labutils.figures import show
from labutils.gemv import SmallMLinear
from labutils.generate import encode_prompt
from labutils.models import load_model, shape_twin
from labutils.notebook import setup, show_source, slider
from labutils.results import save_results
from labutils.runtime import has_cuda, pick
from labutils.speculative import (ModelDrafter, NGramDrafter, SpeculativeDecoder, accept_drafts, expected_tokens,
                                  plain_speed, predicted_speedup, sample, sampling_probs, spec_speed, verify_ms)

device = setup()
torch._dynamo.config.recompile_limit = 64  # one compiled round per k and drafter
GPU = has_cuda()

# %% [markdown]
# ## 1. The rule
#
# A round starts from the committed text x_0 … x_{L-1}. The drafter proposes d_1 … d_k, drawing
# d_i from its distribution q_i; the target computes its own distributions p_1 … p_{k+1} at the
# same positions in **one** forward (the last committed token and the k drafts are its input).
# Then, left to right:
#
# - keep d_i with probability **min(1, p_i(d_i) / q_i(d_i))**;
# - at the first rejection, draw the target's token from the **residual** norm(max(0, p_i − q_i))
#   and end the round;
# - if all k are kept, draw a **bonus** token from p_{k+1}.
#
# Every round emits between 1 and k + 1 tokens. Why the output follows p exactly: token t comes out
# of position i either as an accepted draft, with probability q(t) · min(1, p(t)/q(t)) = min(q(t), p(t)),
# or from the residual after a rejection, with probability (1 − Σ_s min(p(s), q(s))) ·
# max(0, p(t) − q(t)) / Σ_s max(0, p(s) − q(s)) = max(0, p(t) − q(t)), because the two sums are the
# same number. The two add up to p(t). Greedy decoding is the case where p and q are one-hot: a
# draft is kept iff it is the target's argmax.

# %%
def round_diagram():
    """One round with k = 5: three drafts kept, the fourth rejected and replaced, the fifth never looked at."""
    fig = go.Figure()
    cells = [("x<sub>L-1</sub>", "#d9d9d9", "committed"), ("d<sub>1</sub>", "#8fd19e", "kept"),
             ("d<sub>2</sub>", "#8fd19e", "kept"), ("d<sub>3</sub>", "#8fd19e", "kept"),
             ("d<sub>4</sub>", "#f4a6a6", "rejected"), ("d<sub>5</sub>", "#f0f0f0", "not examined")]
    for i, (label, color, what) in enumerate(cells):
        fig.add_shape(type="rect", x0=i, x1=i + 0.9, y0=1, y1=1.8, fillcolor=color, line_color="#555")
        fig.add_annotation(x=i + 0.45, y=1.4, text=label, showarrow=False, font_size=16)
        fig.add_annotation(x=i + 0.45, y=0.85, text=what, showarrow=False, font_size=11)
    fig.add_shape(type="rect", x0=4, x1=4.9, y0=-0.4, y1=0.4, fillcolor="#7fb3e6", line_color="#555")
    fig.add_annotation(x=4.45, y=0, text="y ~ residual", showarrow=False, font_size=12)
    fig.add_annotation(x=2.95, y=2.25, showarrow=False, font_size=12,
                       text="one target forward over the 6 positions gives p<sub>1</sub> … p<sub>6</sub>")
    fig.add_annotation(x=1.9, y=-0.2, showarrow=False, font_size=12,
                       text="emitted this round: d<sub>1</sub> d<sub>2</sub> d<sub>3</sub> y (4 tokens)")
    fig.update_xaxes(visible=False, range=[-0.2, 6.1])
    fig.update_yaxes(visible=False, range=[-0.7, 2.5])
    fig.update_layout(title="A speculative round (k = 5)", height=300, width=720, plot_bgcolor="white")
    return fig


show(round_diagram())

# %% [markdown]
# **Exercise 1.** Write the acceptance test for one draft token and the residual distribution. `p` and
# `q` are probability vectors over the vocabulary, `token` the draft, `u` a uniform random number.

# %%
def accept_rule(p, q, token, u):
    ### BEGIN SOLUTION
    return bool(u < min(1.0, p[token].item() / q[token].item()))
    ### END SOLUTION


def residual(p, q):
    ### BEGIN SOLUTION
    r = (p - q).clamp(min=0)
    return r / r.sum()
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("accept_rule", accept_rule)
check("residual", residual)

# %% [markdown]
# The package's version works on all k positions at once and never leaves the GPU (no `if` on a
# tensor): the number of leading accepts is a cumulative product, the residual row is picked with an
# index tensor, and sampling is an exponential race (argmax of p / E with E ~ Exp(1) is distributed
# as p) instead of `torch.multinomial`, which would synchronize with the host.

# %%
show_source(accept_drafts)
show_source(sampling_probs)

# %% [markdown]
# ## 2. The algorithm on the lab decoder
#
# One round, from Python: the drafter proposes, the target verifies the last committed token and the
# m ≤ k drafts at positions L−1 … L−1+m in one forward through its static KV cache, the rule accepts.
#
# **Rollback is free.** The verification wrote keys and values for every draft, also the rejected
# ones. In a static cache they sit at positions past the new end of the text: no query attends to
# them (the causal mask lets position i see keys ≤ i), and the next round writes its own tokens at
# those positions before any query could read them. Nothing is copied or erased.

# %%
show_source(SpeculativeDecoder._host_round)

# %% [markdown]
# ## 3. Lossless, shown
#
# ### Greedy: the same text, token for token
#
# On the embedded model in fp32, the plain decode engine of notebook 02 against speculative
# decoding with every drafter and k = 1 … 8, on one prompt of each task. (In bf16 the two can part
# ways after a near-tie: verifying k + 1 rows runs other matmul kernels than decoding one, with other
# rounding, and an argmax between two logits closer than bf16's resolution can flip. That is
# floating point, not the algorithm; fp32 leaves no such ties here.)

# %%
hf32, tok = load_model(dtype=torch.float32, device=device)
m32 = Decoder.from_hf(hf32)
tasks = speculative_tasks(tok, per_task=pick(2, 1), device=device)
for name, prompts in tasks.items():
    print(f"{name}: prompts of {[p.shape[1] for p in prompts]} tokens; the first one's end:")
    print("   ", repr(tok.decode(prompts[0][0, -60:])))

# %% [markdown]
# The drafters (their details in section 4): prompt lookup, the early-exit draft (the first 8 of
# the target's 30 layers, sharing their weights), and the EAGLE-style draft head, trained here on
# text the target generates (a few minutes on a GPU, cached; a tiny version on a CPU).

# %%
hf, _ = load_model(dtype=pick(torch.bfloat16, torch.float32), device=device)
model = Decoder.from_hf(hf)  # the target of the speed measurements (bf16 on a GPU)
t0 = time.perf_counter()
head = draft_head.train_draft_head(model, tok)
print(f"draft head: {'loaded from cache' if head.from_cache else 'trained'} in {time.perf_counter() - t0:.0f} s")
head32 = draft_head.DraftHead(m32, device=device)  # the same weights, in fp32 for the identity check
head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
head32 = head32.eval().requires_grad_(False)


def drafters_for(target, head, fast=GPU):
    """The three drafters for ``target``; ``fast``: the prompt lookup compiled (for the timed runs)."""
    return {"prompt lookup": NGramDrafter(3, compile=fast),
            "draft head": draft_head.HeadDrafter(head),
            "early exit": ModelDrafter(target.first_layers(8), "early exit")}


N_CHECK = pick(64, 12)
plain32 = DecodeEngine(m32, batch=1, max_seq_len=1024, mode=pick("graph", "eager"))
identity = []
for task, prompts in tasks.items():
    ids = prompts[0]
    ref = plain32.generate(ids, N_CHECK)[0].tolist()
    for name, drafter in drafters_for(m32, head32, fast=False).items():
        for k in pick(range(1, 9), [1, 4]):
            spec = SpeculativeDecoder(m32, drafter, k=k, graph=GPU)
            out = spec.generate_on_device(ids, N_CHECK)[0].tolist()
            identity.append({"task": task, "drafter": name, "k": k, "identical": out == ref,
                             "first difference": next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)})
identity = pd.DataFrame(identity)
greedy_identical = bool(identity["identical"].all())
print(identity.pivot_table(index=["task", "drafter"], columns="k", values="identical", aggfunc="all").to_string())
del plain32

# %%
# NBVAL_CHECK_OUTPUT
print(f"greedy speculative text == plain engine text for every task, drafter and k: {greedy_identical}")

# %% [markdown]
# ### Sampling: the tokens follow the target's distribution
#
# A test that can fail: draw many rounds and compare the emitted tokens' frequencies with the
# target's probabilities (Pearson's chi-square; bins with fewer than 5 expected counts pooled). Two
# problems: a toy whose target and drafter are random Markov chains over 6 tokens, where we test the
# joint law of the first **two** emitted tokens (it involves acceptance, the residual, the bonus token
# and the boundary between rounds), and the embedded model's next-token distribution after fixed
# prefixes (temperature 1, top-p 0.95), with drafts from the same model at temperature 2 (a drafter
# that is wrong in a known way). The **negative control** is a classic bug: after a rejection, draw
# from p instead of the residual. Tokens the drafter likes then come out too often, and the same test
# must reject it.

# %%
show_source(spec_checks.resample_from_p)

# %%
g = torch.Generator().manual_seed(0)
P, Q = spec_checks.random_chain(6, 3.0, g), spec_checks.random_chain(6, 3.0, g)
n_toy, n_model = pick(8000, 2000), pick(5000, 2000)
chi2 = {"toy chain, 2 tokens, k=3": spec_checks.markov_joint(P, Q, 0, 3, n_toy, generator=g)}
negative = {"toy chain, 2 tokens, k=3": spec_checks.markov_joint(P, Q, 0, 3, n_toy, accept=spec_checks.resample_from_p,
                                                                 generator=g)}
prefixes = ["Name a color.", "Write one word that rhymes with cat.", "The capital of France is"][: pick(3, 1)]
for text in prefixes:
    ids = encode_prompt(tok, text, device=device)
    with torch.no_grad():
        logits = m32(ids)[0, -1].cpu()
    p, q = sampling_probs(logits, 1.0, 0.95), sampling_probs(logits, 2.0, 0.95)
    chi2[f"next token after {text!r}"] = spec_checks.first_token(p, q, n_model, generator=g)
    negative[f"next token after {text!r}"] = spec_checks.first_token(p, q, n_model, accept=spec_checks.resample_from_p,
                                                                     generator=g)
table = pd.DataFrame([{"problem": name, "samples": r["n"], "bins - 1": r["df"], "rule": rule,
                       "chi2": r["statistic"], "p-value": r["p_value"]}
                      for rule, res in [("correct", chi2), ("wrong (p after a rejection)", negative)]
                      for name, r in res.items()])
print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
chi2_p_values = {name: r["p_value"] for name, r in chi2.items()}
negative_control_p = max(r["p_value"] for r in negative.values())

# %%
# NBVAL_CHECK_OUTPUT
print(f"correct rule: every p-value >= 0.001: {min(chi2_p_values.values()) >= 1e-3}")
print(f"wrong rule: every p-value < 1e-6 (rejected): {negative_control_p < 1e-6}")

# %% [markdown]
# A p-value is the probability of a deviation at least this large if the tokens did follow p: the
# correct rule's values are unremarkable; the wrong rule's are astronomically small, from the same
# number of samples. The toy's counts against the law they should follow:

# %%
toy = chi2["toy chain, 2 tokens, k=3"]
fig = go.Figure([go.Bar(x=[f"{a}{b}" for a in range(6) for b in range(6)], y=toy["counts"].flatten().tolist(),
                        name="speculative (correct rule)"),
                 go.Bar(x=[f"{a}{b}" for a in range(6) for b in range(6)],
                        y=negative["toy chain, 2 tokens, k=3"]["counts"].flatten().tolist(), name="wrong rule"),
                 go.Scatter(x=[f"{a}{b}" for a in range(6) for b in range(6)],
                            y=(toy["expected"] * toy["n"]).flatten().tolist(), mode="markers",
                            name="target's law × samples", marker_symbol="line-ew-open", marker_size=12)])
fig.update_layout(title="First two tokens after token 0: counts vs the target's joint law (toy chains)",
                  xaxis_title="token pair", yaxis_title="count", height=380, barmode="group")
show(fig)

# %% [markdown]
# ## 4. Drafters, and how often the target accepts them
#
# **Prompt lookup** needs no model: find the most recent earlier occurrence of the last few tokens
# and propose what followed it. It shines where the output copies its input.
#
# **Exercise 2.** Write it: return up to k tokens that followed the most recent earlier occurrence
# of the last n tokens (not the suffix itself), or [] if there is none.

# %%
def ngram_propose(tokens, k, n):
    ### BEGIN SOLUTION
    if n > len(tokens) or n <= 0:
        return []
    suffix = tokens[-n:]
    for start in range(len(tokens) - n - 1, -1, -1):
        if tokens[start : start + n] == suffix:
            return tokens[start + n : start + n + k]
    return []
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("ngram_propose", ngram_propose)

# %% [markdown]
# **A draft head** (EAGLE, Li et al. 2024) drafts with *one* decoder layer instead of a whole model.
# It reads the target's final hidden state f_j and the next token x_{j+1}, predicts the target's next
# hidden state, and lets the target's own lm_head turn the prediction into a token distribution.
# Hidden states are easier to predict than tokens, and the lm_head comes for free. It is trained
# in this notebook, on continuations the target itself samples from prompts cut from the calibration
# text (the evaluation text stays held out), with the loss smooth-L1(f̂, f) + 0.1 · cross-entropy to
# the target's distribution.
#
# **Early exit** runs the target's first 8 of 30 layers and its lm_head: a draft model for free,
# untrained (LayerSkip trains the model so that early layers predict well; this one was not).
#
# A **separate small model** (Qwen2.5-0.5B for Qwen2.5-7B) is the classic drafter; no such pair is
# installed here (the embedded model is the smallest model at hand), so it appears only through its
# measured *cost* in section 6, on shape twins.

# %%
show_source(draft_head.DraftHead.forward)
print(f"draft head: {sum(p.numel() for p in head.parameters()):,} parameters of its own "
      f"(the target: {sum(p.numel() for p in model.parameters()):,}, whose embedding and lm_head it shares); "
      f"trained on {getattr(head, 'n_tokens', 'cached')} tokens")
if getattr(head, "losses", None):
    show(px.line(y=head.losses, labels={"x": "step", "y": "loss"}, title="Draft head training loss",
                 height=300, log_y=True))

# %% [markdown]
# **Predict first.** Which task will prompt lookup do best on, and roughly what acceptance rate
# (fraction of examined drafts kept) do you expect there at k = 4? Enter a number between 0 and 1.

# %%
my_prompt_lookup_acceptance = None  # your prediction, e.g. 0.5

# %% [markdown]
# Acceptance is measured in greedy mode (temperature 0, the mode of the speed measurements) on the
# target the speeds are measured on, with on-device rounds, over all prompts of each task, `N_NEW`
# new tokens each. On a GPU that target is the bf16 model as the timed runs use it: its projections
# fused, its linear layers `SmallMLinear` (one read of the weights for up to 16 rows), notebook 03's
# Triton attention, its layers compiled. Section 6 measures why: verifying k + 1 tokens must cost
# about as much as decoding one. (The early-exit draft accepts so little that it is swept only to k = 2,
# the draft head to k = 8.) On a GPU the first prompt of each task is also timed here; section 7
# shows those speeds.

# %%
N_NEW = pick(128, 16)
KS = pick([1, 2, 4, 8, 16], [1, 4])
KS_OF = {"prompt lookup": KS, "draft head": [k for k in KS if k <= 8], "early exit": [k for k in KS if k <= 2]}
PREFILL_BUCKET = 64  # prompts padded to a multiple of 64 tokens, their forward replayed from a CUDA graph
if GPU:
    model.fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)).set_attention("flash")
    compile_layers(model, dynamic=True)  # the target's layers compiled once for every T (regional)


def new_spec(drafter, k, temperature=0.0, top_p=1.0):
    """Speculative decoding on the target as the speed runs use it (graphed rounds on a GPU)."""
    return SpeculativeDecoder(model, drafter, k=k, graph=GPU, compile_glue=GPU, temperature=temperature, top_p=top_p,
                              prefill_bucket=PREFILL_BUCKET)


def run_spec(drafter, k, ids, n=N_NEW, temperature=0.0, top_p=1.0, timed=GPU):
    """Speculative decoding of ids: (speeds or None, stats, output); speeds (``spec_speed``): tokens/s
    with the prefill and without it, the median of 5 timed calls (and the slowest and fastest)."""
    spec = new_spec(drafter, k, temperature, top_p)
    speeds = spec_speed(spec, ids, n) if timed else None
    out = spec.generate_on_device(ids, n)
    return speeds, spec.stats, out


rows, timed_rows = [], []
for name, drafter in drafters_for(model, head).items():
    for task, prompts in tasks.items():
        for k in tqdm(KS_OF[name], desc=f"{name}, {task}"):
            acc = exm = emitted = rounds = 0
            for i, ids in enumerate(prompts):
                speeds, s, _ = run_spec(drafter, k, ids, timed=GPU and i == 0)
                acc, exm, emitted, rounds = acc + s.accepted, exm + s.examined, emitted + s.emitted, rounds + s.rounds
                if i == 0:  # the prompt of the speed table (section 7)
                    timed_rows.append({"task": task, "method": name, "k": k, **(speeds or {}),
                                       "acceptance": s.acceptance, "tokens per round": s.emitted / max(s.rounds, 1)})
            rows.append({"drafter": name, "task": task, "k": k, "acceptance": acc / max(exm, 1),
                         "tokens per round": emitted / max(rounds, 1)})
accept_df = pd.DataFrame(rows)
print(accept_df.pivot_table(index=["drafter", "task"], columns="k", values="acceptance").to_string(float_format=lambda x: f"{x:.2f}"))

# %%
k_pl = 4 if 4 in KS else KS[-1]
pl = accept_df.query("drafter == 'prompt lookup' and k == @k_pl").set_index("task")["acceptance"]
print(f"prompt lookup at k = {k_pl} accepts most on {pl.idxmax()!r}")
predict("prompt lookup acceptance, best task", my_prompt_lookup_acceptance, float(pl.max()))

# %%
fig = px.line(accept_df, x="k", y="acceptance", color="drafter", facet_col="task", markers=True,
              title="Acceptance rate by drafter, task and k (embedded model, greedy)", height=360)
show(fig)

# %% [markdown]
# ## 5. The speedup model
#
# If each draft is accepted with probability a, independently, a round emits 1 + a + a² + … + a^k
# tokens on average (the first rejection ends it; the target always adds one token).
#
# **Exercise 3.** Write the expected number of tokens per round.

# %%
def my_expected_tokens(a, k):
    ### BEGIN SOLUTION
    return float(k + 1) if a == 1 else (1 - a ** (k + 1)) / (1 - a)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
check("expected_tokens", my_expected_tokens)

# %% [markdown]
# A round costs k draft steps of c target steps each and one verification of k + 1 tokens, which
# costs v(k + 1) target steps (ideally 1). Plain decoding emits one token per target step, so
#
#   **speedup = (1 − a^(k+1)) / (1 − a) / (k · c + v(k + 1))**.
#
# The measured acceptance and tokens per round against the formula (with the acceptance measured at
# each k: real drafts are not independent, so the fit is not exact):

# %%
accept_df["predicted tokens per round"] = [expected_tokens(a, k) for a, k in zip(accept_df["acceptance"], accept_df["k"])]
print(accept_df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))


def speedup_curves(a: float = 0.7, c: float = 0.05, v: float = 1.1):
    """Predicted speedup against k for acceptance a, draft cost c and verification cost v (in target steps)."""
    ks = list(range(1, 17))
    fig = go.Figure()
    for aa in sorted({0.5, 0.7, 0.9, a}):
        fig.add_trace(go.Scatter(x=ks, y=[predicted_speedup(aa, k, c, v) for k in ks], mode="lines",
                                 name=f"a = {aa:.2f}", line_width=3 if aa == a else 1.5))
    fig.add_hline(y=1, line_dash="dot")
    fig.update_layout(title=f"Predicted speedup, draft cost c = {c:.3f}, verification v = {v:.2f} target steps",
                      xaxis_title="k (drafts per round)", yaxis_title="speedup over plain decoding", height=360)
    show(fig)


speedup_curves()
slider(speedup_curves, a=(0.0, 0.99, 0.01, 0.7), c=(0.0, 0.5, 0.01, 0.05), v=(1.0, 2.0, 0.05, 1.1))

# %% [markdown]
# The curves say when speculation pays: a cheap drafter (small c) with high acceptance wants a large
# k; an expensive one (a separate model at c = 0.2-0.3) peaks at k = 2-4 and barely pays below
# a ≈ 0.6. Verification that costs more than one step (v > 1) lowers every curve by the same factor.
#
# ## 6. Verification near the cost of one token
#
# **Predict first.** On the Qwen2.5-7B shape twin, one decode step reads ~15 GB of weights. How much
# longer than a 1-token forward will a 5-token forward take (a ratio, e.g. 1.5)?

# %%
my_verify_ratio = None  # your prediction

# %% [markdown]
# We time one forward of T = 1 … 17 new tokens after 256 cached positions, replayed from a CUDA
# graph, four ways: the decoder with nn.Linear (cuBLAS), with `SmallMLinear` (the Triton GEMV at one
# row, at 2-16 rows a tensor-core kernel that reads each weight tile once for all rows, past 16
# cuBLAS again; `labutils/gemv.py`), the same with the layers compiled (Inductor fuses the norms, RoPE and
# SwiGLU around the matmuls), and that with notebook 03's attention kernels: FlashDecoding for one
# token, and for the k + 1 tokens of a verification the same split of the keys with the query heads
# times the tokens as the rows of each tile, every row masked at its own position
# (`flash_decode_rows`; the causal forward kernel would walk the whole cache in one program per
# head). [shape twin: speed only]

# %%
show_source(SmallMLinear)
twin_arch = pick("Qwen2.5-7B", "SmolLM2-135M")
twin_dtype = pick(torch.bfloat16, torch.float32)
SMALL = pick({}, dict(num_hidden_layers=2, vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_attention_heads=2, num_key_value_heads=1))  # a smoke run (CPU): a tiny stand-in
twin = shape_twin(twin_arch, dtype=twin_dtype, **SMALL)  # random weights: speed only
Ts = pick([1, 2, 3, 5, 9, 13, 17], [1, 2, 5])
variants = {"cuBLAS": Decoder.from_hf(twin).fuse_projections()}
variants["SmallMLinear"] = Decoder.from_hf(twin).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l))
if GPU:
    variants["SmallMLinear + compiled layers"] = compile_layers(
        Decoder.from_hf(twin).fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)), dynamic=True)
    variants["SmallMLinear + compiled + flash attention"] = compile_layers(
        Decoder.from_hf(twin, attention="flash").fuse_projections().swap_linears(lambda n, l: SmallMLinear(l)),
        dynamic=True)
verify_rows = []
for vname, vmodel in variants.items():
    for T in tqdm(Ts, desc=vname):
        t = verify_ms(vmodel, T, rep_ms=pick(100, 20))
        verify_rows.append({"linear layers": vname, "T": T, "ms": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms})
verify_df = pd.DataFrame(verify_rows)
verify_df["/ T=1"] = verify_df["ms"] / verify_df.groupby("linear layers")["ms"].transform("first")
print(f"{twin_arch} shape twin, {str(twin_dtype)[6:]}, one forward of T tokens after 256 cached positions:")
print(verify_df.pivot_table(index="T", columns="linear layers", values=["ms", "/ T=1"]).to_string(float_format=lambda x: f"{x:.3f}"))

# %%
best_variant = verify_df.groupby("linear layers")["ms"].first().idxmin()  # the fastest 1-token forward
vb = verify_df[verify_df["linear layers"] == best_variant].set_index("T")
verify_cost_ratio = {int(T): float(r) for T, r in vb["/ T=1"].items()}
step_ms_7b = float(vb.loc[1, "ms"])
print(f"fastest: {best_variant}; ms(5) / ms(1) = {verify_cost_ratio.get(5, float('nan')):.3f}")
predict("verification ratio ms(5) / ms(1)", my_verify_ratio, verify_cost_ratio.get(5, verify_cost_ratio[max(verify_cost_ratio)]))
fig = go.Figure()
for vname, d in verify_df.groupby("linear layers", sort=False):
    fig.add_trace(go.Scatter(x=d["T"], y=d["ms"], mode="lines+markers", name=vname,
                             error_y=dict(type="data", symmetric=False, array=(d["p80"] - d["ms"]).tolist(),
                                          arrayminus=(d["ms"] - d["p20"]).tolist())))
fig.update_layout(title=f"One forward of T tokens, {twin_arch} shape twin (median, p20-p80)", height=380,
                  xaxis_title="T (tokens verified in one forward)", yaxis_title="ms", yaxis_rangemode="tozero")
show(fig)

# %% [markdown]
# The embedded model asks the same question differently. Its weights are 0.27 GB, read in well under
# 0.1 ms: a step is bound by launches and kernel latency, not bytes, and what T rows cost depends on
# which kernels run. The target as loaded (cuBLAS, SDPA with a mask) against the target of the speed
# runs (`SmallMLinear`, notebook 03's attention), both with compiled layers:

# %%
base_model = Decoder.from_hf(hf)  # cuBLAS and SDPA: notebook 02's decoder
if GPU:
    compile_layers(base_model, dynamic=True)
fast_label = pick("SmallMLinear + flash attention", "the same (CPU)")
small_rows = []
for vname, vmodel in {"cuBLAS + SDPA": base_model, fast_label: model}.items():
    for T in pick([1, 2, 5, 9, 17], [1, 5]):
        t = verify_ms(vmodel, T, rep_ms=pick(100, 20))
        small_rows.append({"layers": vname, "T": T, "ms": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms})
small_df = pd.DataFrame(small_rows)
small_df["/ T=1"] = small_df["ms"] / small_df.groupby("layers")["ms"].transform("first")
print("embedded model, compiled layers, one forward of T tokens after 256 cached positions (median; p20-p80):")
print(small_df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
r9 = small_df[small_df["T"] == small_df["T"].max()].set_index("layers")["/ T=1"]
print(f"T = {small_df['T'].max()} costs {r9['cuBLAS + SDPA']:.2f}x one token with cuBLAS + SDPA, "
      f"{r9[fast_label]:.2f}x with {fast_label}")

# %% [markdown]
# ## 7. End to end on the embedded model
#
# Tokens per second of the plain lab engine and of speculative decoding with each drafter and k, on
# every task (greedy; `N_NEW` new tokens), two ways from the same timed calls: **with the prefill**
# (the whole call: the prompt's forward, then N_NEW − 1 decoded tokens) and **decode only** (the
# N_NEW − 1 tokens after the prompt's forward and its first token, notebook 02's measure). The
# prefill is the same work in both methods, so it dilutes the speedup of a short answer. Speculative
# rounds run on the device, each one CUDA-graph replay (draft, verify, accept, commit), on the target
# of section 4 (timed there). Python replays them in batches and reads the text's length between
# batches (a host sync); each batch is the fewest rounds that could finish the answer,
# ⌈tokens left / (k + 1)⌉, so no round runs after the answer is complete, whatever the acceptance does
# (`rounds_until_end`). Every speed is the median of five timed calls after a warm-up, with the
# slowest (min) and fastest (max) call beside it.
# The plain engine runs two ways, and each speedup is against the faster of them on that task: graph
# replay over the same compiled layers as speculation, and notebook 02's engine with the whole step
# compiled. The library baseline in the same run is HF `generate` with and without
# `prompt_lookup_num_tokens=10` (`bench.time_fn`: the median of three calls after a warm-up call,
# which is several times slower; p20-p80 beside it).
#
# Both methods run the prompt's forward the same way. Launched from Python, it costs a model this
# small far more CPU time than GPU time: a few hundred kernel launches for a forward the GPU finishes
# in about a millisecond. So the prompt is padded to a multiple of `PREFILL_BUCKET` tokens (the pad
# tokens come after every real one, so the causal mask hides them, and decoding overwrites them) and
# its forward is replayed from one CUDA graph per padded length (`prefill_bucket`, in
# `labutils.cuda_graphs`), in the plain engines and in speculative decoding alike.

# %%
plain_kw = dict(batch=1, max_seq_len=1024, prefill_bucket=PREFILL_BUCKET)  # the prefill as speculation runs it
plain_engines = {"graph, same layers as speculation": DecodeEngine(model, mode=pick("graph", "eager"), **plain_kw)}
if GPU:
    plain_engines["compile (whole step)"] = DecodeEngine(Decoder.from_hf(hf), mode="compile", **plain_kw)
speed_rows = []
for task, prompts in tasks.items():
    for ename, e in plain_engines.items():
        v = plain_speed(e, prompts[0], N_NEW, repeats=pick(5, 1))
        speed_rows.append({"task": task, "method": f"plain: {ename}", "k": 0, "tok/s": v["tok_s"],
                           "min": v["tok_s_min"], "max": v["tok_s_max"], "decode tok/s": v["decode_tok_s"]})
for r in timed_rows:
    speed_rows.append({**{key: val for key, val in r.items() if not key.startswith(("tok_s", "decode_tok_s"))},
                       "tok/s": r.get("tok_s", float("nan")), "min": r.get("tok_s_min", float("nan")),
                       "max": r.get("tok_s_max", float("nan")), "decode tok/s": r.get("decode_tok_s", float("nan"))})
speed = pd.DataFrame(speed_rows)
plain_best = speed[speed["k"] == 0].groupby("task")["tok/s"].max()
plain_best_decode = speed[speed["k"] == 0].groupby("task")["decode tok/s"].max()
speed["speedup"] = speed["tok/s"] / speed["task"].map(plain_best)
speed["decode speedup"] = speed["decode tok/s"] / speed["task"].map(plain_best_decode)
prefill_ms = {task: 1e3 * (N_NEW / r["tok/s"] - (N_NEW - 1) / r["decode tok/s"])
              for task, r in speed[speed["method"] == "plain: graph, same layers as speculation"].set_index("task").iterrows()}
print(speed.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
print("prefill and first token, plain engine over the same layers (ms):", {t: round(v, 2) for t, v in prefill_ms.items()})

# %%
hf_forwards = [0]
count_forwards = hf.model.register_forward_pre_hook(lambda *args: hf_forwards.__setitem__(0, hf_forwards[0] + 1))
hf_rows, texts = [], {}
for task, prompts in tasks.items():
    ids = prompts[0]
    texts[(task, "lab plain")] = plain_engines["graph, same layers as speculation"].generate(ids, N_NEW)[0].tolist()
    for plk in (None, 10):
        method = "plain" if plk is None else f"prompt lookup {plk}"
        kw = {} if plk is None else {"prompt_lookup_num_tokens": plk}

        def gen():
            hf_forwards[0] = 0
            texts[(task, f"HF {method}")] = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                pad_token_id=tok.eos_token_id, **kw)[0].tolist()

        t = time_fn(gen, warmup_ms=0, rep_ms=0, min_reps=pick(3, 1))  # the first call warms up (it is several times slower)
        hf_rows.append({"task": task, "HF generate": method, "tok/s": N_NEW / t.median_ms * 1e3,
                        "p20": N_NEW / t.p80_ms * 1e3, "p80": N_NEW / t.p20_ms * 1e3,
                        "tokens per forward": N_NEW / hf_forwards[0]})  # forwards of the last call, prefill included
count_forwards.remove()
hf_df = pd.DataFrame(hf_rows)
hf_plain = hf_df[hf_df["HF generate"] == "plain"].set_index("task")["tok/s"]
hf_df["speedup over HF plain"] = hf_df["tok/s"] / hf_df["task"].map(hf_plain)
print(hf_df.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))


def parted(a: list[int], b: list[int], start: int) -> str:
    """Where two greedy outputs of the same prompt (start tokens) part: the first new token that
    differs, counted from 0, or "identical"."""
    diff = [i for i in range(start, min(len(a), len(b))) if a[i] != b[i]]
    return f"at new token {diff[0] - start}" if diff else "identical"


same_text = pd.DataFrame([{"task": task,
                           "HF plain vs lab plain": parted(texts[(task, "HF plain")], texts[(task, "lab plain")], n),
                           "HF prompt lookup vs HF plain": parted(texts[(task, "HF prompt lookup 10")], texts[(task, "HF plain")], n)}
                          for task, n in ((t, p[0].shape[1]) for t, p in tasks.items())]).set_index("task")
print(f"\ngreedy texts compared ({N_NEW} new tokens each):")
print(same_text.to_string())

# %%
spec_rows = speed[speed["k"] > 0]
summary = spec_rows.pivot_table(index="task", columns="method", values="speedup", aggfunc="max")
summary["HF prompt lookup (over HF plain)"] = hf_df[hf_df["HF generate"] != "plain"].groupby("task")["speedup over HF plain"].max()
decode_summary = spec_rows.pivot_table(index="task", columns="method", values="decode speedup", aggfunc="max")
print("best speedup per task over the plain lab engine, with the prefill (HF's: over HF plain, with its prefill), greedy:")
print(summary.to_string(float_format=lambda x: f"{x:.2f}"))
print("\nthe same, decode only (the tokens after the prompt's forward):")
print(decode_summary.to_string(float_format=lambda x: f"{x:.2f}"))
speedup = {name: float(d["speedup"].max()) for name, d in spec_rows.groupby("method")}
decode_speedup = {name: float(d["decode speedup"].max()) for name, d in spec_rows.groupby("method")}
hf_prompt_lookup_speedup = float(summary["HF prompt lookup (over HF plain)"].max())
pl_best = spec_rows[spec_rows["method"] == "prompt lookup"].sort_values("speedup").groupby("task").tail(1).set_index("task")
hf_pl = hf_df[hf_df["HF generate"] == "prompt lookup 10"].set_index("task")
side = pd.DataFrame({"lab: speedup": pl_best["speedup"], "lab: k": pl_best["k"],
                     "lab: tokens per round": pl_best["tokens per round"],
                     "HF: speedup": hf_pl["speedup over HF plain"], "HF: tokens per forward": hf_pl["tokens per forward"]})
side = side.join(same_text)
print("\nprompt lookup, lab (best k) and HF (10 tokens), each over its own plain decoding:")
print(side.to_string(float_format=lambda x: f"{x:.2f}"))
one_text = [t for t in side.index if (same_text.loc[t] == "identical").all()]
same_text_speedup = {"lab": float(side.loc[one_text, "lab: speedup"].max()) if one_text else None,
                     "HF": float(side.loc[one_text, "HF: speedup"].max()) if one_text else None, "tasks": one_text}
print("tasks where all three texts agree:", one_text or "none",
      "" if not one_text else "-> best there: " + (f"lab {same_text_speedup['lab']:.2f}x" if GPU else "lab not timed")
      + f", HF {same_text_speedup['HF']:.2f}x")
bars = spec_rows.assign(k=spec_rows["k"].astype(str))  # k as a category: one slot per k tried
fig = px.bar(bars, x="k", y="speedup", color="method", facet_col="task", barmode="group", height=380,
             error_y=bars["max"] / bars["task"].map(plain_best) - bars["speedup"],
             error_y_minus=bars["speedup"] - bars["min"] / bars["task"].map(plain_best),
             title=f"Over the plain lab engine, with the prefill ({'bf16, ' + torch.cuda.get_device_name() if GPU else 'CPU: not timed'})")
fig.add_hline(y=1, line_dash="dot")
show(fig)

# %% [markdown]
# What the target writes decides these numbers. Prompt lookup can only propose text that occurred
# before, in the prompt or in the output so far; a model that copies its input (code editing) or
# repeats itself (a small model decoding greedily often does) hands it long accepted runs. The share
# of each continuation's tokens that extend a 4-token sequence seen earlier, and how the text reads:

# %%
def repeat_share(tokens: list[int], start: int, n: int = 4) -> float:
    """Share of tokens[start:] whose n-gram (ending at them) occurred earlier in tokens."""
    seen, hits = {tuple(tokens[i - n + 1 : i + 1]) for i in range(n - 1, start)}, 0
    for i in range(start, len(tokens)):
        gram = tuple(tokens[i - n + 1 : i + 1])
        hits += gram in seen
        seen.add(gram)
    return hits / max(len(tokens) - start, 1)


for task, prompts in tasks.items():
    n = prompts[0].shape[1]
    best_x = speed[(speed["task"] == task) & (speed["k"] > 0)]["speedup"].max()
    for who in ("lab plain", "HF prompt lookup 10"):
        out = texts[(task, who)]
        if who != "lab plain" and out == texts[(task, "lab plain")]:
            print(f"     {who}: the same text")
            continue
        print(f"{task}, {who}: {repeat_share(out, n):.0%} of the new tokens repeat an earlier 4-gram"
              + (f"; best lab speedup {best_x:.2f}x" if GPU and who == "lab plain" else ""))
        print("    ", repr(tok.decode(out[n:])[:300]))

# %% [markdown]
# **Against HF.** Each ratio of section 7 is over one text: HF's prompt lookup over HF's plain
# decoding, the lab's speculation over the lab's plain engine. In exact arithmetic they all write
# the same greedy text; in bf16 they need not. A verification forward of several rows sums its
# products in another order than a one-row step, and where the model's two most likely tokens are
# nearly tied, the rounding can pick the other one; from there the texts part (the comparison
# table of section 7 says where). Speculation is still lossless in the sense that matters: it emits
# what its own verification forward would choose, and in fp32 its output is token-identical to plain decoding (section 3).
# But where the texts part, the two ratios measure different texts, and a text that falls into a
# loop hands prompt lookup long accepted runs whichever implementation wrote it (the tokens per
# forward show it). The implementations are compared on the tasks whose texts all agree; the line
# under that table names them and gives both ratios there.

# %% [markdown]
# **Try k yourself.** The slider reruns real speculative decoding on the embedded model (prompt
# lookup and the draft head, on the code-editing prompt) and prints what one run did.

# %%
def try_k(k: int = 4):
    ids = tasks["code editing"][0]
    for name, drafter in list(drafters_for(model, head).items())[:2]:
        speeds, s, out = run_spec(drafter, k, ids, n=pick(64, 12), timed=GPU)
        speed_note = f"{speeds['decode_tok_s']:,.0f} tok/s decode only, " if speeds else ""
        print(f"{name:>14}, k={k}: {speed_note}acceptance {s.acceptance:.2f}, {s.emitted / max(s.rounds, 1):.2f} tokens "
              f"per round over {s.rounds} rounds; drafts accepted per round: {s.accepted_per_round[:16]}"
              f"{' ...' if s.rounds > 16 else ''}")
    print("text:", repr(tok.decode(out[0, ids.shape[1]:])[:200]))


try_k(4)
slider(try_k, k=(1, 8, 1, 4))

# %% [markdown]
# ## 8. At 7B scale (predicted)
#
# The embedded model is small enough that its step is bound by launches and latency, not by bytes;
# at 7B a step is a pass over 15 GB and the drafters' costs look different. From the twins we measure
# each drafter's cost per draft token in target steps (c), and combine it with the verification
# ratio of section 6 and each drafter's **real** acceptance from section 4 (best task, each k) in the
# formula. [shape twins, predicted]

# %%
def head_step_ms(h):
    """One draft-head step (its layer at one position, then the lm_head) [shape twin]."""
    cache = h.new_cache(300)
    f = torch.randn(1, 1, h.fc.out_features, device=device, dtype=twin_dtype)
    x = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([256], device=device)
    h.set_kv_cache(cache)
    try:
        return time_fn(lambda: h.logits(h(f, x, pos)), rep_ms=pick(200, 20), cuda_graph=GPU).median_ms
    finally:
        h.set_kv_cache(None)


target_7b = variants[best_variant]
draft_arch = pick("Qwen2.5-0.5B", "SmolLM2-135M")
draft_twin = Decoder.from_hf(shape_twin(draft_arch, dtype=twin_dtype, **SMALL)).fuse_projections()
if GPU:
    compile_layers(draft_twin, dynamic=True)
costs = {"prompt lookup": 0.0,  # no model: the lookup is a few kernels inside the round, measured with it below
         "draft head": head_step_ms(draft_head.DraftHead(target_7b, device=device).to(twin_dtype)) / step_ms_7b,
         "early exit": verify_ms(target_7b.first_layers(pick(8, 1)), 1, rep_ms=pick(200, 20)).median_ms / step_ms_7b,
         f"separate model ({draft_arch} twin)": verify_ms(draft_twin, 1, rep_ms=pick(200, 20)).median_ms / step_ms_7b}
print(f"target step {step_ms_7b:.2f} ms ({best_variant}); draft cost per token in target steps:")
print(pd.Series(costs).to_string(float_format=lambda x: f"{x:.3f}"))
pred_rows = []
for name, c in costs.items():
    if name not in speedup:  # no real acceptance for a separate model here
        continue
    for task in TASKS:
        for k in KS_OF[name]:
            a = float(accept_df.query("drafter == @name and task == @task and k == @k")["acceptance"].iloc[0])
            v = verify_cost_ratio.get(k + 1, max(verify_cost_ratio.values()))
            pred_rows.append({"drafter": name, "task": task, "k": k, "a": a, "c": c, "v": v,
                              "predicted speedup": predicted_speedup(a, k, c, v)})
pred = pd.DataFrame(pred_rows)
print(pred.sort_values("predicted speedup").groupby(["drafter", "task"]).tail(1).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
predicted_speedup_7b = {name: float(d["predicted speedup"].max()) for name, d in pred.groupby("drafter")}
print("best predicted speedup at 7B [shape twin costs, real acceptance]:", {k: round(v, 2) for k, v in predicted_speedup_7b.items()})

# %% [markdown]
# ## 9. Where speculation stops paying
#
# **Temperature.** Sampling makes the target's choices less predictable, and a sampled text is one
# draw among many: acceptance is averaged over several seeds (the same seeds for every setting),
# each a different text (embedded model, code-editing prompt, k = 4; the plain baseline is the greedy
# engine, whose step costs the same). A sampled draft is accepted with probability min(1, p/q),
# and prompt lookup's q is one-hot (its guess has q = 1), so the target keeps it with probability p
# of that token: at temperature 1 the guessed token rarely carries all of p. (Prompt lookup only:
# on this prompt the draft head accepts too few drafts even greedily, section 4, to show a trend.)

# %%
SEEDS = pick(4, 1)
temp_rows = []
ids = tasks["code editing"][0]
for name, drafter in list(drafters_for(model, head).items())[:1]:  # prompt lookup
    for temperature in pick([0.0, 0.5, 1.0], [0.0, 1.0]):
        spec = new_spec(drafter, 4, temperature, top_p=0.95 if temperature else 1.0)
        speeds = spec_speed(spec, ids, N_NEW) if GPU else None
        acc = exm = 0
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            spec.generate_on_device(ids, N_NEW)
            acc, exm = acc + spec.stats.accepted, exm + spec.stats.examined
        temp_rows.append({"drafter": name, "temperature": temperature, "acceptance": acc / max(exm, 1),
                          "speedup": (speeds["tok_s"] / plain_best["code editing"]) if GPU else float("nan"),
                          "decode speedup": (speeds["decode_tok_s"] / plain_best_decode["code editing"]) if GPU else float("nan")})
temp_df = pd.DataFrame(temp_rows)
print(temp_df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
show(px.line(temp_df, x="temperature", y="acceptance", color="drafter", markers=True, height=320,
             title=f"Acceptance vs sampling temperature (k = 4, code editing, {SEEDS} seeds)"))

# %% [markdown]
# **Batch size.** Speculation spends idle arithmetic; a batch of B sequences already spends it. At
# batch B a round verifies B(k + 1) rows; once that many rows stop being free, each round costs more
# than a plain step. With t(M) the measured time of a forward of M rows on the 7B twin (one sequence
# of M tokens: the linear layers, which dominate, see the same M rows as B sequences would), the
# predicted speedup at batch B is E(a, k) · t(B) / (t(B(k + 1)) + k · c · t(B)). [shape twin, predicted]

# %%
Bs, batch_ks = pick([1, 2, 4, 8, 16, 32, 64], [1, 2]), (2, 4, 8)
Ms = sorted({B * m for B in Bs for m in (1, *(k + 1 for k in batch_ks))})
t_of_M = {M: verify_ms(target_7b, M, rep_ms=pick(100, 20)).median_ms for M in tqdm(Ms, desc="t(M)")}
best_drafter = max(predicted_speedup_7b, key=predicted_speedup_7b.get)
bd = pred[pred["drafter"] == best_drafter].sort_values("predicted speedup").iloc[-1]
batch_df = pd.DataFrame([{"batch": B, "k": k, "predicted speedup": expected_tokens(bd["a"], k) * t_of_M[B]
                          / (t_of_M[B * (k + 1)] + k * bd["c"] * t_of_M[B])} for B in Bs for k in batch_ks])
print(f"{best_drafter}, a = {bd['a']:.2f} ({bd['task']}), c = {bd['c']:.3f}; t(M) in ms [shape twin]:",
      {M: round(t, 2) for M, t in t_of_M.items()})
print(batch_df.pivot_table(index="batch", columns="k", values="predicted speedup").to_string(float_format=lambda x: f"{x:.2f}"))
fig = px.line(batch_df, x="batch", y="predicted speedup", color="k", markers=True, log_x=True, height=360,
              title=f"Predicted speedup vs batch size, {twin_arch} shape twin costs, {best_drafter}'s real acceptance")
fig.add_hline(y=1, line_dash="dot")
show(fig)

# %% [markdown]
# ## 10. Results

# %%
acceptance = {name: {int(k): float(v) for k, v in d.groupby("k")["acceptance"].mean().items()}
              for name, d in accept_df.groupby("drafter")}
metrics = {
    "greedy_identical": greedy_identical, "chi2_p_values": chi2_p_values, "negative_control_p": negative_control_p,
    "acceptance": acceptance,
    "acceptance_by_task": {name: {task: {int(k): float(a) for k, a in zip(d2["k"], d2["acceptance"])}
                                  for task, d2 in d.groupby("task")} for name, d in accept_df.groupby("drafter")},
    "speedup": speedup if GPU else None, "decode_speedup": decode_speedup if GPU else None,
    "speedup_by_task": {m: {t: float(s) for t, s in d.items()} for m, d in summary.to_dict().items()} if GPU else None,
    "decode_speedup_by_task": ({m: {t: float(s) for t, s in d.items()} for m, d in decode_summary.to_dict().items()}
                               if GPU else None),
    "tok_s": speed.to_dict(orient="records"), "plain_tok_s": plain_best.to_dict(),
    "plain_decode_tok_s": plain_best_decode.to_dict(), "plain_prefill_ms": prefill_ms if GPU else None,
    "hf_prompt_lookup_speedup": hf_prompt_lookup_speedup if GPU else None, "hf_tok_s": hf_df.to_dict(orient="records"),
    "texts_compared": same_text.to_dict(orient="index"),
    "prompt_lookup_speedup_same_text": same_text_speedup if GPU else None,
    "verify_cost_ratio": verify_cost_ratio, "verify_ms": verify_df.to_dict(orient="records"),
    "verify_variant": best_variant, "draft_cost_7b": costs, "predicted_speedup_7b": predicted_speedup_7b,
    "speedup_vs_temperature": temp_df.to_dict(orient="records"),
    "predicted_speedup_vs_batch": batch_df.to_dict(orient="records"),
    "shape_twin": twin_arch, "n_new_tokens": N_NEW,
    "draft_head": {"train_seconds": getattr(head, "train_seconds", None), "from_cache": head.from_cache,
                   "n_tokens": getattr(head, "n_tokens", None)},
}
path = save_results("05_speculative", metrics, dtype=pick(torch.bfloat16, torch.float32))
print(f"wrote {path.parent.name}/{path.name}")  # relative: the same on every machine
print({k: v for k, v in metrics.items() if k in ("greedy_identical", "negative_control_p", "speedup", "decode_speedup",
                                                  "hf_prompt_lookup_speedup", "predicted_speedup_7b")})
print("verify_cost_ratio:", {T: round(r, 3) for T, r in verify_cost_ratio.items()})
