"""Speculative decoding (labutils.speculative): lossless in greedy mode (token-identical to plain
greedy decoding), distribution-exact in sampling mode (chi-square, with a wrong rule as the
negative control), the rejection rule on hand-made cases, and the speedup model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_same_tokens, tiny_hf_model
from labutils import spec_checks
from labutils.decoder import Decoder
from labutils.generate import encode_prompt, greedy_cached
from labutils.kv_cache import static_caches
from labutils.speculative import (NGramDrafter, ModelDrafter, SpecState, SpeculativeDecoder, accept_drafts,
                                  expected_tokens, predicted_speedup, sample, sampling_probs)


def plain_greedy(model, ids, n):
    return greedy_cached(model, ids, n, static_caches(model, 1, ids.shape[1] + n))


# ---- the rule on hand-made cases ----------------------------------------------------------------------
def test_sampling_probs_greedy_and_top_p():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0 - 1e-3])
    assert sampling_probs(logits, 0.0).tolist() == [0, 1, 0, 0]
    p = sampling_probs(logits, 1.0, top_p=0.5)  # the top token alone holds < 0.5: two are kept
    assert (p > 0).sum() == 2 and p[1] > 0 and p[3] > 0 and abs(float(p.sum()) - 1) < 1e-6
    assert torch.allclose(sampling_probs(logits, 1.0), torch.softmax(logits, -1))
    with pytest.raises(ValueError, match="top_p"):
        sampling_probs(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling_probs(logits, -1.0)


def test_accept_drafts_greedy_cases():
    V = 5
    onehot = lambda i: torch.nn.functional.one_hot(torch.tensor(i), V).float()  # noqa: E731
    p = torch.stack([onehot(2), onehot(4), onehot(1)])  # the target's argmax chain: 2, 4, then 1
    n, tok = accept_drafts(p, None, torch.tensor([2, 4]))
    assert (int(n), int(tok)) == (2, 1), "all drafts match: keep both and add the bonus"
    n, tok = accept_drafts(p, None, torch.tensor([2, 3]))
    assert (int(n), int(tok)) == (1, 4), "second draft wrong: keep one, the target's token replaces it"
    n, tok = accept_drafts(p, None, torch.tensor([0, 4]))
    assert (int(n), int(tok)) == (0, 2), "a later match after a rejection must not count"


def test_accept_drafts_residual_excludes_the_rejected_token():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.0, 1.0, 0.0]])  # the drafter always proposes token 1; accepted half the time
    seen = {0: 0, 1: 0}
    for _ in range(400):
        n, tok = accept_drafts(p, q, torch.tensor([1]), g)
        seen[1 if int(n) else int(tok)] += 1
        if not int(n):
            assert int(tok) == 0, "after rejecting token 1, the residual max(0, p - q) holds token 0 alone"
    assert 150 < seen[1] < 250


def test_sample_follows_probs():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    draws = torch.stack([sample(probs, g) for _ in range(3000)])
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[2] == 0
    assert spec_checks.chisquare(counts, probs)["p_value"] > 1e-3


def test_expected_tokens_and_speedup():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.8, 4) - (1 + 0.8 + 0.64 + 0.512 + 0.4096)) < 1e-12
    assert abs(predicted_speedup(0.8, 4, 0.0, 1.0) - expected_tokens(0.8, 4)) < 1e-12
    # a draft model at c = 0.24 of a target step, a = 0.8, k = 4, verification at 1.24 steps
    assert abs(predicted_speedup(0.8, 4, 0.24, 1.24) - 3.3616 / (4 * 0.24 + 1.24)) < 1e-12


# ---- prompt lookup --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,k,n,want", [
    ([1, 2, 3, 9, 1, 2], 3, 2, [3, 9, 1]),  # match at the start
    ([1, 2, 3, 1, 2, 4, 1, 2], 2, 2, [4, 1]),  # the most recent match wins
    ([5, 6, 7, 5, 6], 4, 2, [7, 5, 6]),  # fewer than k tokens follow
    ([1, 2, 3], 2, 2, []),  # no earlier occurrence
    ([1, 2], 2, 5, []),  # n longer than the text
])
def test_ngram_lookup(tokens, k, n, want):
    assert NGramDrafter.lookup(np.array(tokens), k, n).tolist() == want


# ---- greedy: token-identical to plain decoding -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    target = Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=3))
    draft = Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=4))  # another random model, same vocab
    return target, draft


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_identical_tiny(tiny, k):
    target, draft = tiny
    g = torch.Generator().manual_seed(k)
    for prompt_len in (1, 5, 17):
        ids = torch.randint(0, 128, (1, prompt_len), generator=g)
        ids = torch.cat([ids, ids], 1)  # a repeat: prompt lookup finds matches
        ref = plain_greedy(target, ids, 30)
        for drafter in (NGramDrafter(3), ModelDrafter(draft), ModelDrafter(target, name="self-draft")):
            out = SpeculativeDecoder(target, drafter, k=k).generate(ids, 30)
            assert_same_tokens(out, ref, ids.shape[1], f"{drafter.name}, k={k}, prompt {ids.shape[1]}")


def test_self_draft_accepts_everything(tiny):
    """The target drafting for itself: every draft is its own argmax, so every round emits k + 1."""
    target, _ = tiny
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    spec = SpeculativeDecoder(target, ModelDrafter(Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=3))), k=3)
    spec.generate(ids, 33)
    assert spec.stats.acceptance == 1.0 and spec.stats.accepted_per_round[:-1] == [3] * (spec.stats.rounds - 1)


def test_generate_bad_input(tiny):
    target, draft = tiny
    spec = SpeculativeDecoder(target, NGramDrafter(), k=2)
    assert torch.equal(spec.generate(torch.tensor([[1, 2]]), 0), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="batch 1"):
        spec.generate(torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="at least one token"):
        spec.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        spec.generate(torch.tensor([[1]]), -1)
    with pytest.raises(ValueError, match="context"):
        spec.generate(torch.tensor([[1]]), 10_000)
    with pytest.raises(ValueError, match="k"):
        SpeculativeDecoder(target, NGramDrafter(), k=0)
    assert all(layer.self_attn.kv_cache is None for layer in target.layers), "caches left attached"


def test_eos_stops(tiny):
    target, _ = tiny
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    ref = plain_greedy(target, ids, 20)[0, 8:].tolist()
    eos = ref[6]
    out = SpeculativeDecoder(target, NGramDrafter(), k=4).generate(ids, 20, eos_id=eos)
    assert out[0, 8:].tolist() == ref[: ref.index(eos) + 1]


# ---- sampling: the emitted tokens follow the target's distribution ------------------------------------
def test_sampling_distribution_toy_and_negative_control():
    g = torch.Generator().manual_seed(0)
    P, Q = spec_checks.random_chain(6, 3.0, g), spec_checks.random_chain(6, 3.0, g)
    ok = spec_checks.markov_joint(P, Q, 0, 3, 6000, generator=g)
    assert ok["p_value"] >= 1e-3, f"correct rule rejected: {ok['p_value']:.2e}"
    bad = spec_checks.markov_joint(P, Q, 0, 3, 6000, accept=spec_checks.resample_from_p, generator=g)
    assert bad["p_value"] < 1e-6, f"the wrong rule was not caught: p = {bad['p_value']:.2e}"


def test_sampling_loop_first_tokens_follow_target(tiny):
    """The whole loop (not only the rule): many sampled continuations of one prompt on a tiny model;
    the first two emitted tokens against the target's exact joint distribution."""
    target, draft = tiny
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        p0 = sampling_probs(target(ids)[0, -1], 1.0, 0.9)
    g = torch.Generator().manual_seed(2)
    spec = SpeculativeDecoder(target, ModelDrafter(draft), k=3, temperature=1.0, top_p=0.9, generator=g)
    firsts = torch.stack([spec.generate(ids, 1)[0, -1] for _ in range(1)])  # the prefill's token
    assert firsts.shape == (1,)
    counts = torch.zeros(128)
    for _ in range(1500):
        out = spec.generate(ids, 3)
        counts[out[0, 6]] += 1  # the first token drawn inside a speculative round
    # its law: sum over the prefill's token a of p0[a] * p(. | ids, a)
    with torch.no_grad():
        support = p0.nonzero().flatten()
        nxt = sampling_probs(target(torch.cat([ids.expand(len(support), -1), support[:, None]], 1))[:, -1], 1.0, 0.9)
        law = (p0[support, None] * nxt).sum(0)
    assert spec_checks.chisquare(counts, law)["p_value"] >= 1e-3


def test_chisquare_pools_small_bins():
    r = spec_checks.chisquare(torch.tensor([50.0, 48, 1, 1]), torch.tensor([0.5, 0.48, 0.01, 0.01]))
    assert r["df"] == 1 and r["p_value"] > 0.5  # the two rare bins (2 expected) fold into the largest
    with pytest.raises(ValueError, match="shape"):
        spec_checks.chisquare(torch.ones(3), torch.ones(4))


# ---- the embedded model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(embedded):
    hf, tok = embedded
    return Decoder.from_hf(hf), tok


def test_greedy_identical_embedded(smol):
    model, tok = smol
    prompts = ["Repeat this sentence twice: the quick brown fox jumps over the lazy dog.",
               "Write a Python function that returns the square of a number."]
    small_draft = ModelDrafter(model, name="self")  # the only real weights here: itself as its own draft
    for text in prompts:
        ids = encode_prompt(tok, text)
        ref = plain_greedy(model, ids, 24)
        for k in (1, 4, 8):
            for drafter in (NGramDrafter(3), small_draft):
                out = SpeculativeDecoder(model, drafter, k=k).generate(ids, 24)
                assert_same_tokens(out, ref, ids.shape[1], f"{drafter.name}, k={k}, {text[:20]!r}")


def test_sampling_first_token_embedded(smol):
    """Next-token law of the embedded model after a fixed prefix, drafts from the same model at a
    higher temperature: the emitted token follows p; the wrong rule is caught."""
    model, tok = smol
    ids = encode_prompt(tok, "Name a color.")
    with torch.no_grad():
        logits = model(ids)[0, -1]
    p, q = sampling_probs(logits, 1.0, 0.95), sampling_probs(logits, 2.0, 0.95)
    g = torch.Generator().manual_seed(0)
    ok = spec_checks.first_token(p, q, 3000, generator=g)
    assert ok["p_value"] >= 1e-3
    bad = spec_checks.first_token(p, q, 3000, accept=spec_checks.resample_from_p, generator=g)
    assert bad["p_value"] < 1e-6


# ---- the on-device rounds ----------------------------------------------------------------------------------
def test_ngram_propose_device_matches_lookup():
    g = torch.Generator().manual_seed(9)
    d = NGramDrafter(3)
    for _ in range(30):
        toks = torch.randint(0, 4, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g)
        L = len(toks)
        buf = torch.cat([toks, torch.randint(0, 4, (10,), generator=g)])  # stale tokens past L
        want, _ = d.propose(SpecState(toks.tolist(), None), 4)
        got, _ = d.propose_device(buf, torch.tensor([L]), 4)
        assert got[: len(want)].tolist() == want.tolist(), f"tokens {toks.tolist()}"
        if len(want) < 4:  # padding repeats the last committed token
            assert (got[len(want):] == toks[-1]).all()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_on_device_greedy_identical_tiny(tiny, k):
    target, draft = tiny
    g = torch.Generator().manual_seed(10 + k)
    for prompt_len in (2, 9):
        ids = torch.randint(0, 128, (1, prompt_len), generator=g).repeat(1, 2)
        ref = plain_greedy(target, ids, 29)
        for drafter in (NGramDrafter(2), ModelDrafter(draft)):
            spec = SpeculativeDecoder(target, drafter, k=k)
            out = spec.generate_on_device(ids, 29)
            assert_same_tokens(out, ref, ids.shape[1], f"on device: {drafter.name}, k={k}")
            st = spec.stats
            assert st.emitted >= 28 and st.emitted == st.accepted + st.rounds, \
                "29 tokens: the prefill's and at least 28 from rounds, each round its accepted drafts plus one"
            again = spec.generate_on_device(ids, 29)  # buffers reused: the same answer
            assert torch.equal(again, out)


def test_on_device_eos_and_stats(tiny):
    target, _ = tiny
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    ref = plain_greedy(target, ids, 20)[0, 8:].tolist()
    eos = ref[9]
    spec = SpeculativeDecoder(target, NGramDrafter(), k=3)
    out = spec.generate_on_device(ids, 20, eos_id=eos)
    assert out[0, 8:].tolist() == ref[: ref.index(eos) + 1]
    spec.generate_on_device(ids, 20)
    s = spec.stats
    assert s.drafted <= 3 * s.rounds and 0 <= s.accepted <= s.examined <= s.drafted and s.rounds > 1
    assert len(s.accepted_per_round) == s.rounds and sum(s.accepted_per_round) == s.accepted  # device rounds logged too
    assert all(0 <= n <= 3 for n in s.accepted_per_round)


def test_on_device_sampling_tokens_follow_target():
    """Sampling through on-device rounds: the 3rd and 4th new tokens (drawn inside rounds) against
    their exact joint law under the target, on models with an 8-token vocabulary so that every path
    can be enumerated."""
    target = Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=5, vocab_size=8))
    draft = Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=6, vocab_size=8))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.manual_seed(4)  # on-device rounds draw from the global generator
    spec = SpeculativeDecoder(target, ModelDrafter(draft), k=2, temperature=1.0, top_p=0.9)
    counts = torch.zeros(8, 8)
    for _ in range(1500):
        out = spec.generate_on_device(ids, 6)
        counts[out[0, 7], out[0, 8]] += 1
    with torch.no_grad():  # the law of (x7, x8): sum over the paths x5, x6 of their probabilities
        seqs, probs = ids, torch.ones(1)
        for _ in range(4):
            p = sampling_probs(target(seqs)[:, -1], 1.0, 0.9)  # (paths, 8)
            nz = p.nonzero()
            probs = probs[nz[:, 0]] * p[nz[:, 0], nz[:, 1]]
            seqs = torch.cat([seqs[nz[:, 0]], nz[:, 1:]], 1)
        law = torch.zeros(8, 8).index_put_((seqs[:, -2], seqs[:, -1]), probs, accumulate=True)
    assert abs(float(law.sum()) - 1) < 1e-4
    assert spec_checks.chisquare(counts, law)["p_value"] >= 1e-3


def test_early_exit_drafter_shares_layers_and_stays_lossless(tiny):
    target, _ = tiny
    draft = target.first_layers(1)
    assert draft.layers[0] is target.layers[0] and draft.lm_head is target.lm_head
    with pytest.raises(ValueError, match="n must be"):
        target.first_layers(0)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(8))
    ref = plain_greedy(target, ids, 25)
    for k in (2, 5):
        spec = SpeculativeDecoder(target, ModelDrafter(draft, "early exit"), k=k)
        assert_same_tokens(spec.generate(ids, 25), ref, 7, f"early exit, host loop, k={k}")
        assert_same_tokens(spec.generate_on_device(ids, 25), ref, 7, f"early exit, on device, k={k}")
    assert all(layer.self_attn.kv_cache is None for layer in target.layers)


@pytest.mark.parametrize("bucket", [4, 16])
def test_padded_prefill_greedy_identical(tiny, bucket):
    """prefill_bucket pads the prompt (its forward replayed from a CUDA graph on a GPU): the same
    tokens, from the host loop and from on-device rounds (prompt lookup then starts on the device)."""
    target, draft = tiny
    g = torch.Generator().manual_seed(40 + bucket)
    for prompt_len in (3, 10):
        ids = torch.randint(0, 128, (1, prompt_len), generator=g).repeat(1, 2)
        ref = plain_greedy(target, ids, 25)
        for drafter in (NGramDrafter(2), ModelDrafter(draft)):
            spec = SpeculativeDecoder(target, drafter, k=3, prefill_bucket=bucket)
            for out in (spec.generate(ids, 25), spec.generate_on_device(ids, 25)):
                assert_same_tokens(out, ref, ids.shape[1], f"prefill_bucket={bucket}, {drafter.name}")
            assert spec.stats.emitted >= 24 and spec.stats.emitted == spec.stats.accepted + spec.stats.rounds
    with pytest.raises(ValueError):
        SpeculativeDecoder(target, NGramDrafter(), k=3, prefill_bucket=0)


def test_rounds_until_end():
    from labutils.speculative import rounds_until_end

    assert rounds_until_end(127, 4, 100) == 26  # the fewest rounds of up to 5 tokens that could emit 127
    assert rounds_until_end(127, 16, 100) == 8
    assert rounds_until_end(3, 16, 100) == 1  # always at least one round
    assert rounds_until_end(60, 16, 2) == 2  # capped by the room in the buffers
    assert rounds_until_end(5, 4, 0) == 1


@pytest.mark.parametrize("k", [1, 4, 16])
def test_round_batches_waste_no_round(k):
    """Rounds run in batches sized by rounds_until_end, with a host sync after each, never run a round
    after the answer is complete, whatever each round emits: here a slow start that jumps to every
    draft accepted (the case that made the earlier sizing run twice the rounds it needed), and random."""
    from labutils.speculative import rounds_until_end

    g = torch.Generator().manual_seed(k)
    jump = [1] * 7 + [k + 1] * 200
    for emits in [jump, torch.randint(1, k + 2, (300,), generator=g).tolist()]:
        n_new, done, ran = 127, 0, 0
        while done < n_new:
            for _ in range(rounds_until_end(n_new - done, k, 1000)):
                done += emits[ran]
                ran += 1
        needed = next(i + 1 for i in range(len(emits)) if sum(emits[: i + 1]) >= n_new)
        assert ran == needed, f"k={k}: ran {ran} rounds, {needed} were needed"
