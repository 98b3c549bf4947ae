"""The EAGLE-style draft head (labutils.draft_head): speculation with it stays lossless (greedy,
token-identical to plain decoding), its KV cache agrees with a from-scratch forward across rounds,
rejections and full acceptances, training lowers the loss and is cached, and on the embedded model
a smoke-size head accepts more drafts than an untrained one."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import assert_rel_close, assert_same_tokens, tiny_hf_model
from labutils import draft_head as dh
from labutils.decoder import Decoder
from labutils.generate import greedy_cached
from labutils.kv_cache import static_caches
from labutils.speculative import SpeculativeDecoder, SpecState, accept_drafts, sampling_probs

FEAT_TOL = 1e-5  # fp32: the cached and the from-scratch forward differ only in summation order


def plain_greedy(model, ids, n):
    return greedy_cached(model, ids, n, static_caches(model, 1, ids.shape[1] + n))


def untrained_head(target, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dh.DraftHead(target).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["llama-gqa-tied", "qwen2-mha-untied"])
def tiny(request):
    target = Decoder.from_hf(tiny_hf_model(request.param, seed=3))
    return target, untrained_head(target)


# ---- (a) lossless: greedy speculation with the head is plain greedy decoding ------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_identical_tiny(tiny, k):
    target, head = tiny
    g = torch.Generator().manual_seed(k)
    drafter = dh.HeadDrafter(head)
    for prompt_len in (1, 6, 19):
        ids = torch.randint(0, 128, (1, prompt_len), generator=g)
        ref = plain_greedy(target, ids, 30)
        out = SpeculativeDecoder(target, drafter, k=k).generate(ids, 30)  # one drafter, reset per call
        assert_same_tokens(out, ref, prompt_len, f"draft head, k={k}, prompt {prompt_len}")


# ---- (b) the head's cache against a from-scratch forward ---------------------------------------------
def scratch_chain(head, tokens, hidden, drafts):
    """f̂_{L-1} .. f̂_{L+m-2} without a cache: all pairs (f_j, x_{j+1}) with real features, then the
    head's own (f̂, draft) pairs, the whole sequence recomputed for each draft."""
    L = len(tokens)
    f = hidden[: L - 1].clone()  # f_0 .. f_{L-2}
    x = torch.tensor(tokens[1:])  # x_1 .. x_{L-1}
    out = []
    for d in drafts:
        fhat = head(f[None], x[None], torch.arange(len(x)))[0, -1]  # (d,)
        out.append(fhat)
        f, x = torch.cat([f, fhat[None]]), torch.cat([x, d.view(1)])
    return torch.stack(out)


class CheckingDrafter:
    """Wraps a HeadDrafter: checks each proposal against ``scratch_chain``, that greedy drafts are
    the argmax and sampled ones come with the right q, and that each eager ingest feeds exactly the
    pairs not yet ingested. Rows of state.hidden past the real ones are overwritten with garbage
    first, so a drafter that read stale rows would be caught."""

    needs_hidden = True

    def __init__(self, inner):
        self.inner, self.name = inner, "checked " + inner.name
        self.ingested = []  # (L, pairs fed by the first forward of that proposal)

    def reset(self, max_len, device=None):
        self.inner.reset(max_len, device)
        self.prev_L = None

    @torch.no_grad()
    def propose(self, state, k):
        L = len(state.tokens)
        state.hidden[L - 1:] = 1e3 * torch.randn_like(state.hidden[L - 1:])  # rows >= L-1 are not real
        head, calls = self.inner.head, []
        forward = head.forward
        head.forward = lambda f, x, pos: calls.append(f.shape[1]) or forward(f, x, pos)
        try:
            draft, q = self.inner.propose(state, k)
        finally:
            del head.forward
        want = L - 1 if self.prev_L is None else L - self.prev_L  # pairs L_prev-1 .. L-2 (all, first time)
        assert calls[0] == want, f"L={L}: ingested {calls[0]} pairs, expected exactly the {want} missing ones"
        self.prev_L = L
        ref = scratch_chain(head, state.tokens, state.hidden, draft)
        assert_rel_close(self.inner.last_features, ref, FEAT_TOL, f"L={L}, k={k}: cached f̂ vs from scratch")
        logits = head.logits(ref)
        if state.temperature == 0:
            assert q is None and torch.equal(draft, logits.argmax(-1)), f"L={L}: greedy drafts are not the argmax"
        else:
            assert_rel_close(q, sampling_probs(logits, state.temperature, state.top_p), FEAT_TOL, f"L={L}: q")
        self.ingested.append((L, calls[0]))
        return draft, q

    @torch.no_grad()
    def propose_device(self, toks, L, k, temperature=0.0, top_p=1.0, hidden=None):
        n = int(L)
        hidden[n - 1:] = 1e3 * torch.randn_like(hidden[n - 1:])
        draft, q = self.inner.propose_device(toks, L, k, temperature, top_p, hidden)
        ref = scratch_chain(self.inner.head, toks[:n].tolist(), hidden, draft)
        assert_rel_close(self.inner.last_features, ref, FEAT_TOL, f"on device, L={n}, k={k}: f̂ vs from scratch")
        if temperature == 0:
            assert torch.equal(draft, self.inner.head.logits(ref).argmax(-1)), f"L={n}: greedy drafts"
        self.ingested.append((n, k + 1))
        return draft, q


def accept_all(p, q, draft, generator=None):
    """Not the rejection rule: keeps every draft (exercises rounds where the head's whole draft is
    committed and the next ingest starts after it)."""
    return torch.tensor(len(draft)), p[-1].argmax()


def accept_cycling():
    """Keeps 0, 1, 2, ... drafts in turn: rejections at every place in the draft."""
    count = [0]

    def rule(p, q, draft, generator=None):
        count[0] += 1
        n = count[0] % (len(draft) + 1)
        return torch.tensor(n), p[n].argmax()
    return rule


@pytest.mark.parametrize("rule", ["rejection rule", "accept all", "cycling"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_matches_scratch_through_speculation(tiny, rule, temperature):
    target, head = tiny
    accept = {"rejection rule": accept_drafts, "accept all": accept_all, "cycling": accept_cycling()}[rule]
    checker = CheckingDrafter(dh.HeadDrafter(head))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    spec = SpeculativeDecoder(target, checker, k=4, temperature=temperature, accept=accept,
                              generator=torch.Generator().manual_seed(2))
    spec.generate(ids, 40)
    assert len(checker.ingested) == spec.stats.rounds >= 8
    if rule != "rejection rule":
        assert max(spec.stats.accepted_per_round) == 4, "no round accepted the whole draft"


@pytest.mark.parametrize("k", [1, 3, 5])
def test_on_device_rounds(tiny, k):
    """``generate_on_device``: the first round from Python, then propose_device re-ingesting the last
    k + 1 pairs (clamped at position 0 for short prompts); greedy stays token-identical and every
    device round's drafts equal the from-scratch chain."""
    target, head = tiny
    g = torch.Generator().manual_seed(20 + k)
    for prompt_len in (1, 8):
        ids = torch.randint(0, 128, (1, prompt_len), generator=g)
        ref = plain_greedy(target, ids, 25)
        checker = CheckingDrafter(dh.HeadDrafter(head))
        spec = SpeculativeDecoder(target, checker, k=k)
        assert_same_tokens(spec.generate_on_device(ids, 25), ref, prompt_len, f"on device, k={k}")
        assert len(checker.ingested) >= 2, "no round ran on the device"


def test_two_rounds_with_a_rejection(tiny):
    """By hand: round 1 drafts k tokens from L committed ones; the target keeps the first draft and
    replaces the second; round 2 must overwrite the rows its drafting wrote and equal a forward from
    scratch over all pairs with real features."""
    target, head = tiny
    d, k, max_len = target.cfg.hidden_size, 4, 64

    def real_hidden(tokens):  # the target's features f_j at every position, from scratch
        hidden = torch.zeros(max_len, d)
        hidden[: len(tokens)] = target(torch.tensor([tokens]), return_hidden=True)[1][0]
        return hidden

    drafter = dh.HeadDrafter(head)
    drafter.reset(max_len, "cpu")
    tokens = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    draft1, _ = drafter.propose(SpecState(tokens, real_hidden(tokens)), k)
    assert_rel_close(drafter.last_features, scratch_chain(head, tokens, real_hidden(tokens), draft1), FEAT_TOL,
                     "round 1")
    tokens = tokens + [int(draft1[0]), (int(draft1[1]) + 1) % 128]  # d_1 kept, d_2 rejected
    hidden = real_hidden(tokens)
    draft2, _ = drafter.propose(SpecState(tokens, hidden), k)
    ref = scratch_chain(head, tokens, hidden, draft2)
    assert_rel_close(drafter.last_features, ref, FEAT_TOL, "round 2 (after a rejection)")
    assert torch.equal(draft2, head.logits(ref).argmax(-1))


# ---- training data: batched collection against one prompt at a time ----------------------------------
def test_collect_features_greedy_matches_unbatched(tiny):
    """Prompts of different lengths in one right-padded batch: at temperature 0 each row must be the
    target's plain greedy continuation, and f_j its hidden state from a forward from scratch."""
    target, _ = tiny
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (3, 11, 6, 11)]
    n_new = 12
    data = dh.collect_features(target, prompts, n_new, temperature=0.0, batch=3, progress=False)
    rows = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the result is sorted by length
    assert data.tokens.shape[0] == len(prompts) and data.n_tokens == sum(len(p) + n_new for p in prompts)
    for r, i in enumerate(rows):
        L = len(prompts[i]) + n_new
        ref = plain_greedy(target, prompts[i][None], n_new)[0]
        assert torch.equal(data.tokens[r, :L], ref), f"prompt {i}: batched greedy continuation differs"
        assert data.valid[r, :L].all() and not data.valid[r, L:].any()
        f_ref = target(ref[None], return_hidden=True)[1][0]  # (L, d)
        assert_rel_close(data.feats[r, :L], f_ref, FEAT_TOL, f"prompt {i}: features")
    # an end-of-sequence token: positions after the first generated one are dropped
    r, i = 1, rows[1]
    T = len(prompts[i])
    eos = int(data.tokens[r, T + 4])
    first = T + int((data.tokens[r, T:] == eos).nonzero()[0])  # its first generated occurrence
    with_eos = dh.collect_features(target, prompts, n_new, temperature=0.0, batch=3, eos_id=eos, progress=False)
    assert with_eos.valid[r].sum() == first + 1, "valid must end at the first generated end-of-sequence"


# ---- (c) training lowers the loss; the weights are cached ------------------------------------------
TRAIN = dict(steps=30, n_new=24, batch_size=4, lr=3e-3, ce_fraction=1.0, collect_batch=8, seed=0)


def tiny_prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 128, (n,), generator=g) for n in (5, 8, 8, 12, 3, 9)]


def test_training_lowers_loss_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LABUTILS_CACHE", str(tmp_path))
    target = Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=3))
    flags = [p.requires_grad for p in target.parameters()]
    head = dh.train_draft_head(target, prompts=tiny_prompts(), progress=False, **TRAIN)
    first, last = sum(head.losses[:5]) / 5, sum(head.losses[-5:]) / 5
    assert len(head.losses) == TRAIN["steps"] and not head.from_cache
    assert last < 0.85 * first, f"loss {first:.3f} -> {last:.3f}: training did not lower it"
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    assert [p.requires_grad for p in target.parameters()] == flags, "the target's requires_grad flags changed"
    files = list((tmp_path / "draft_heads").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors", f"cache folder holds {files}"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cached head")

    monkeypatch.setattr(dh, "collect_features", no_training)
    t0 = time.perf_counter()
    again = dh.train_draft_head(target, prompts=tiny_prompts(), progress=False, **TRAIN)
    assert time.perf_counter() - t0 < 1.0 and again.from_cache
    assert again.state_dict().keys() == head.state_dict().keys()
    for name, w in head.state_dict().items():
        assert torch.equal(again.state_dict()[name], w), f"{name} differs after the cache round trip"
    assert again.losses == head.losses
    with pytest.raises(AssertionError, match="trained again"):  # other settings: another key
        dh.train_draft_head(target, prompts=tiny_prompts(), progress=False, **{**TRAIN, "seed": 1})
    with pytest.raises(AssertionError, match="trained again"):  # cache=False forces training
        dh.train_draft_head(target, prompts=tiny_prompts(), progress=False, cache=False, **TRAIN)


def test_head_shares_target_weights(tiny):
    target, head = tiny
    names = set(head.state_dict())
    assert names and all(n.startswith(("fc.", "layer.")) for n in names), sorted(names)
    assert head.target.embed_tokens.weight.data_ptr() == target.embed_tokens.weight.data_ptr()


# ---- (d) the embedded model: a smoke-size head beats an untrained one ------------------------------
def test_trained_head_accepts_more_embedded(embedded):
    from labutils.data import load_text

    hf, tokenizer = embedded
    target = Decoder.from_hf(hf)
    t0 = time.perf_counter()
    head = dh.train_draft_head(target, tokenizer, cache=False, progress=False)  # smoke sizes (LAB_SMOKE=1)
    train_s = time.perf_counter() - t0
    text = load_text("eval")
    prompts = [tokenizer(text[start: start + 1000], return_tensors="pt").input_ids[:, :48] for start in (5000, 40000)]
    counts = {}
    for name, h in (("untrained", untrained_head(target)), ("trained", head)):
        accepted = examined = 0
        for ids in prompts:
            spec = SpeculativeDecoder(target, dh.HeadDrafter(h), k=3)
            assert_same_tokens(spec.generate(ids, 32), plain_greedy(target, ids, 32), ids.shape[1], f"{name} head")
            accepted, examined = accepted + spec.stats.accepted, examined + spec.stats.examined
        counts[name] = accepted / examined
    print(f"smoke head: {head.n_tokens} tokens, {len(head.losses)} steps, {train_s:.1f} s; acceptance {counts}")
    assert counts["trained"] > counts["untrained"], counts


# ---- the CUDA-graph path ------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("k", [2, 4])
def test_graph_drafter_matches_eager_cuda(k):
    target = Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=3).cuda())
    head = untrained_head(target)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(k)).cuda()
    ref = plain_greedy(target, ids, 40)
    runs = {}
    for graph in (False, True):
        spec = SpeculativeDecoder(target, dh.HeadDrafter(head, graph=graph), k=k, accept=accept_cycling())
        runs[graph] = (spec.generate(ids, 40), spec.stats.accepted_per_round)
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]
    out = SpeculativeDecoder(target, dh.HeadDrafter(head, graph=True), k=k).generate(ids, 40)
    assert_same_tokens(out, ref, ids.shape[1], f"graph drafter, k={k}")
    out = SpeculativeDecoder(target, dh.HeadDrafter(head), k=k, graph=True).generate_on_device(ids, 40)
    assert_same_tokens(out, ref, ids.shape[1], f"on-device rounds in CUDA graphs, k={k}")
