"""Why HF's prompt lookup gains more over its own plain decoding than the lab's does (GPU probe, ~2 min):
on the first prompt of each task of notebook 05 (bf16, greedy, 128 new tokens), the text HF generates
and the text the lab engine generates, where they part, how repetitive each is, HF
generate(prompt_lookup_num_tokens=10)'s forward passes (tokens per forward), and both lookup rules
simulated on both texts (with greedy decoding the emitted text does not depend on the drafter, so the
tokens per round of a rule follow from the final sequence alone). Writes $OUT/probe_hf_text05.json."""
import json, os
import numpy as np
import torch
from labutils.decoder import Decoder
from labutils.data import speculative_tasks
from labutils.engine import DecodeEngine
from labutils.models import load_model
from labutils.speculative import NGramDrafter

N = int(os.environ.get("N_NEW", 128))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_grad_enabled(False)
hf, tok = load_model(dtype=torch.bfloat16, device=DEV)
tasks = speculative_tasks(tok, per_task=1, device=DEV)
model = Decoder.from_hf(hf)
plain = DecodeEngine(model, batch=1, max_seq_len=1024, mode="eager")
calls = [0]
hf.model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))


def lab_rule(toks, k):
    for n in (3, 2, 1):
        d = NGramDrafter.lookup(toks, k, n)
        if len(d):
            return d
    return toks[:0]


def hf_rule(toks, k, max_n=2):  # PromptLookupCandidateGenerator: the first (earliest) match, n = 2..1
    L = len(toks)
    for n in range(max_n, 0, -1):
        if L <= n:
            continue
        w = np.lib.stride_tricks.sliding_window_view(toks[: L - 1], n)
        for h in np.flatnonzero((w == toks[L - n:]).all(1)):
            s = h + n
            if s < L:
                return toks[s: min(s + k, L)]
    return toks[:0]


def simulate(seq, P, k, rule):
    L, rounds = P, 0
    while L < len(seq):
        d = rule(seq[:L], k)
        a = 0
        while a < len(d) and L + a < len(seq) and d[a] == seq[L + a]:
            a += 1
        L, rounds = L + a + 1, rounds + 1
    return (len(seq) - P) / rounds


def repeat_share(t, start, n=4):
    seen, hits = {tuple(t[i - n + 1: i + 1]) for i in range(n - 1, start)}, 0
    for i in range(start, len(t)):
        g = tuple(t[i - n + 1: i + 1]); hits += g in seen; seen.add(g)
    return hits / max(len(t) - start, 1)


out = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__, "dtype": "bfloat16", "tasks": {}}
for task, ps in tasks.items():
    ids = ps[0]; P = ids.shape[1]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, do_sample=False,
              pad_token_id=tok.eos_token_id)
    lab = plain.generate(ids, N)[0].cpu().numpy()
    hf_plain = hf.generate(ids, **kw)[0].cpu().numpy()
    calls[0] = 0
    hf_pl = hf.generate(ids, prompt_lookup_num_tokens=10, **kw)[0].cpu().numpy()
    fw = calls[0]
    diff = np.flatnonzero(lab[P:] != hf_plain[P:])
    r = {"first_difference_lab_vs_hf": int(diff[0]) if len(diff) else None,
         "hf_pl_equals_hf_plain": bool((hf_pl == hf_plain).all()),
         "hf_pl10_forwards": fw, "hf_pl10_tokens_per_forward": N / fw,
         "repeat_share_lab": repeat_share(lab.tolist(), P), "repeat_share_hf": repeat_share(hf_plain.tolist(), P),
         "tokens_per_round": {f"{rule} rule on {text} text, k={k}": simulate(seq, P, k, fn)
                              for rule, fn in (("lab", lab_rule), ("HF", hf_rule))
                              for text, seq in (("lab", lab), ("HF", hf_plain)) for k in (10, 16)},
         "lab_text": tok.decode(lab[P:])[:400], "hf_text": tok.decode(hf_plain[P:])[:400]}
    out["tasks"][task] = r
    print(task, json.dumps(r, indent=1), flush=True)
os.makedirs(os.environ.get("OUT", "build"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "build"), "probe_hf_text05.json"), "w"), indent=1)
