"""Perplexity (labutils.perplexity): window bookkeeping, exact values on synthetic models, and the
embedded SmolLM2-135M on the held-out text (sane value; shuffled weights much worse)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from labutils.data import load_text
from labutils.decoder import Decoder
from labutils.perplexity import nll, perplexity, windows

V = 50


def uniform_model(idx):
    """Equal logits for every token: perplexity exactly V whatever the text."""
    return torch.zeros(*idx.shape, V)


class NextTokenOracle:
    """Knows the rule of the synthetic text (next = (token + 7) mod V) and bets on it with logit 30:
    perplexity ~1 if and only if position t's logits are scored against token t + 1."""

    def __init__(self):
        self.fed = 0

    def __call__(self, idx):
        self.fed += idx.numel()
        return 30.0 * torch.nn.functional.one_hot((idx + 7) % V, V).float()


def rule_ids(n):
    return (7 * torch.arange(n)) % V


@pytest.mark.parametrize("n,window,stride", [(10, 4, 4), (10, 4, 2), (11, 4, 3), (513, 512, 512), (1000, 256, 64), (5, 8, 8)])
def test_windows_score_each_token_once(n, window, stride):
    seen = []
    for begin, end, first in windows(n, window, stride):
        assert 0 <= begin < first < end <= n and end - begin <= window
        if stride < window and begin > 0:
            assert first - begin >= window - stride, "each target needs window - stride tokens of context"
        seen += range(first, end)
    assert len(seen) == len(set(seen)), "a token was scored twice"
    # overlapping windows score every token but the first; non-overlapping ones skip each window's first
    want = set(range(1, n)) if stride < window else set(range(1, n)) - set(range(window, n, window))
    assert set(seen) == want, f"missing {sorted(want - set(seen))}, extra {sorted(set(seen) - want)}"


def test_windows_reject_bad_arguments():
    for window, stride in [(1, 1), (8, 0), (8, 9)]:
        with pytest.raises(ValueError):
            list(windows(100, window, stride))


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (7, 7)])
def test_uniform_model_gives_vocab_size(window, stride):
    ids = torch.randint(0, V, (100,), generator=torch.Generator().manual_seed(0))
    total, count = nll(uniform_model, ids, window, stride, progress=False)
    n_windows = math.ceil(99 / window)
    assert count == (99 if stride < window else 100 - n_windows)
    assert math.isclose(math.exp(total / count), V, rel_tol=1e-6)


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 3)])
def test_targets_are_aligned_with_predictions(window, stride):
    oracle = NextTokenOracle()
    total, count = nll(oracle, rule_ids(200), window, stride, progress=False)
    assert math.exp(total / count) < 1.001, "logits at t must be scored against token t + 1"
    shifted = lambda idx: oracle(torch.roll(idx, 1, dims=-1))  # noqa: E731  (predicts the current token)
    total, count = nll(shifted, rule_ids(200), window, stride, progress=False)
    assert math.exp(total / count) > 1e6


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert not add_special_tokens
        return {"input_ids": [(7 * i) % V for i in range(len(text))]}


def test_perplexity_tokenizes_and_truncates():
    oracle = NextTokenOracle()
    ppl = perplexity(oracle, FakeTokenizer(), "x" * 300, window=64, stride=64, max_tokens=100, progress=False)
    assert ppl < 1.001 and oracle.fed == 100, f"fed {oracle.fed} tokens, want the 100-token prefix"
    assert math.isclose(perplexity(uniform_model, FakeTokenizer(), "x" * 300, window=64, progress=False), V, rel_tol=1e-6)


# ---- the embedded model ---------------------------------------------------------------------------------------------
def test_embedded_model_perplexity(embedded):
    hf_model, tokenizer = embedded
    text = load_text("eval")
    model = Decoder.from_hf(hf_model)
    ppl = perplexity(model, tokenizer, text, window=512, max_tokens=2048, progress=False)
    assert 5 < ppl < 200, f"SmolLM2-135M perplexity {ppl:.2f} on the first 2048 eval tokens"

    shuffled = Decoder.from_hf(hf_model)  # shares storage with the session's model: replace, never modify
    probe = hf_model.model.layers[0].mlp.down_proj.weight.clone()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in shuffled.layers:
            for name, lin in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
                w = lin.weight
                lin.weight = nn.Parameter(w.flatten()[torch.randperm(w.numel(), generator=g)].view_as(w),
                                          requires_grad=False)
    bad = perplexity(shuffled, tokenizer, text, window=512, max_tokens=1024, progress=False)
    assert bad > 10 * ppl, f"shuffled weights: perplexity {bad:.1f}, unshuffled {ppl:.1f}"
    assert torch.equal(hf_model.model.layers[0].mlp.down_proj.weight, probe), "the shuffle touched the shared weights"


def test_wikitext2_unavailable_fails_clearly(monkeypatch):
    """Without `datasets` (CI) or without the hub and a cache, one clear error, fast."""
    import sys
    import time

    from labutils.data import DataUnavailableError, load_wikitext2

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailableError, match="load_text\\('eval'\\)"):
        load_wikitext2()
    assert time.perf_counter() - t0 < 5
