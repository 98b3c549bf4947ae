"""Prompt lookup strategies, simulated on the target's own greedy continuations (CPU, fp32).

With greedy decoding the emitted text does not depend on the drafter, so the tokens per round of any
lookup rule follow from the final sequence alone: at each round (committed length L) the rule proposes
k tokens from tokens[:L]; the round emits the longest agreeing prefix plus one. This compares the
lab's rule (most recent match, n = 3..1, padded to k with the last token), the earliest match (HF's
PromptLookupCandidateGenerator picks the first match, n = 2..1, nothing when nothing matches), and a
few variants, on every prompt of the three tasks. Also counts HF generate(prompt_lookup_num_tokens=10)'s
forward passes on the same prompts (its tokens per forward = its speedup over HF plain when its step
cost dominates). Writes scripts/probes/results/probe_lookup_cpu.json.

Usage: python scripts/probes/probe_lookup_cpu.py [N_NEW]
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from labutils.data import speculative_tasks
from labutils.decoder import Decoder
from labutils.engine import DecodeEngine
from labutils.models import load_model

N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
hf, tok = load_model(dtype=torch.float32)
model = Decoder.from_hf(hf)
eng = DecodeEngine(model, batch=1, max_seq_len=2048)
tasks = speculative_tasks(tok, per_task=3)
seqs = {t: [(p.shape[1], eng.generate(p, N)[0].numpy()) for p in ps] for t, ps in tasks.items()}


def propose(toks, k, max_n, min_n, latest, pad):
    L = len(toks)
    for n in range(max_n, min_n - 1, -1):
        if L <= n:
            continue
        w = np.lib.stride_tricks.sliding_window_view(toks[: L - 1], n)
        hits = np.flatnonzero((w == toks[L - n:]).all(1))
        if latest:
            hits = hits[::-1]
        for h in hits:
            s = h + n
            if s < L:
                d = toks[s: s + k]
                if pad and len(d) < k:
                    d = np.concatenate([d, np.full(k - len(d), toks[-1])])
                return d
            if not latest:
                continue
    return np.full(k, toks[-1]) if pad else toks[:0]


def simulate(T, seq, k, **rule):
    L, rounds = T + 1, 0  # the first token comes from prefill
    while L < len(seq):
        d = propose(seq[:L], k, **rule)
        truth = seq[L: L + len(d)]
        n = 0
        while n < len(truth) and d[n] == truth[n]:
            n += 1
        L += n + 1
        rounds += 1
    return (len(seq) - T - 1) / rounds  # tokens per round (verification forward)


RULES = {"lab: latest, n=3..1, padded": dict(max_n=3, min_n=1, latest=True, pad=True),
         "earliest, n=2..1 (HF)": dict(max_n=2, min_n=1, latest=False, pad=False),
         "earliest, n=3..1": dict(max_n=3, min_n=1, latest=False, pad=True),
         "latest, n=2..1": dict(max_n=2, min_n=1, latest=True, pad=True),
         "latest, n=4..1": dict(max_n=4, min_n=1, latest=True, pad=True),
         "latest, n=3..2": dict(max_n=3, min_n=2, latest=True, pad=True)}
out = {"n_new": N, "tokens_per_round": {}}
for name, rule in RULES.items():
    for task, ss in seqs.items():
        for k in (4, 8, 12, 16):
            v = float(np.mean([simulate(T, s, k, **rule) for T, s in ss]))
            out["tokens_per_round"].setdefault(name, {}).setdefault(task, {})[k] = v
    print(name, {t: {k: round(v, 2) for k, v in d.items()} for t, d in out["tokens_per_round"][name].items()}, flush=True)

# HF: forwards per generate call with prompt lookup 10
calls = {"n": 0}
hook = hf.model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
hf_tpr = {}
for task, ps in tasks.items():
    r = []
    for p in ps:
        calls["n"] = 0
        hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                    pad_token_id=tok.eos_token_id, prompt_lookup_num_tokens=10)
        r.append(N / calls["n"])
    hf_tpr[task] = float(np.mean(r))
hook.remove()
out["hf_prompt_lookup_10_tokens_per_forward"] = hf_tpr
print("HF prompt lookup 10, tokens per forward:", {t: round(v, 2) for t, v in hf_tpr.items()})
Path(__file__).parent.joinpath("results", "probe_lookup_cpu.json").write_text(json.dumps(out, indent=1))
