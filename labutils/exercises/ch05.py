"""Notebook 05 (speculative decoding): the acceptance rule, the residual distribution, prompt
lookup and the expected tokens per round."""
from __future__ import annotations

import torch

from . import case, exercise

def _distribution(V: int, g: torch.Generator, peaked: bool = False) -> torch.Tensor:
    """A random distribution over V tokens, float32: Dirichlet(1) (normalized exponentials), or
    peaked like a language model's (softmax of scaled normal logits)."""
    if peaked:
        return torch.softmax(3 * torch.randn(V, generator=g, dtype=torch.float64), 0).float()
    e = -torch.log(torch.rand(V, generator=g, dtype=torch.float64))
    return (e / e.sum()).float()


def _uniform(g: torch.Generator) -> float:
    return torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


def ref_expected_tokens(a: float, k: int) -> float:
    if a == 1:
        return float(k + 1)
    return (1 - a ** (k + 1)) / (1 - a)


@exercise("expected_tokens", reference=ref_expected_tokens,
          hint="a pass emits the accepted drafts plus one token from the target: 1 + a + a^2 + ... + a^k, a "
               "geometric series; with a == 1 every draft is accepted (and the closed form divides by zero)")
def _expected_tokens_cases(g):
    yield case("a = 0: every draft rejected", 0.0, 4)
    yield case("a = 1: every draft accepted", 1.0, 4)
    yield case("k = 0: no drafts", 0.7, 0)
    yield case("a = 1 and k = 0", 1.0, 0)
    yield case("a = 0.999, close to 1", 0.999, 8)
    for _ in range(4):
        yield case("random a, k", round(_uniform(g), 3), _randint(1, 9, g))


def ref_accept_rule(p: torch.Tensor, q: torch.Tensor, token: int, u: float) -> bool:
    return bool(u < min(1.0, p[token].item() / q[token].item()))


@exercise("accept_rule", reference=ref_accept_rule,
          hint="accept with probability min(1, p[token] / q[token]): the target's probability over the draft's, "
               "always accept when the target likes the token at least as much; compare with u strictly (<)")
def _accept_rule_cases(g):
    V = 8
    q = _distribution(V, g)
    p = q.clone()
    yield case("p[token] == q[token]: always accept", p, q, 3, 0.999)
    p = _distribution(V, g)
    p[5] = 0
    p /= p.sum()
    yield case("p[token] == 0: the target never emits it", p, q, 5, 0.0)
    p, q = torch.tensor([0.1, 0.6, 0.3]), torch.tensor([0.3, 0.3, 0.4])
    yield case("p[token] > q[token]: accept even a large u", p, q, 1, 0.95)
    yield case("p[token] < q[token]: u below p/q", p, q, 0, 0.2)
    yield case("p[token] < q[token]: u above p/q", p, q, 0, 0.5)
    for _ in range(8):
        V = _randint(4, 50, g)
        p, q = _distribution(V, g, peaked=True), _distribution(V, g, peaked=True)
        token = int(torch.multinomial(q, 1, generator=g))
        yield case("random p, q; token drawn from q", p, q, token, _uniform(g))


def ref_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = (p.double() - q.double()).clamp(min=0)
    return (r / r.sum()).to(p.dtype)


@exercise("residual", reference=ref_residual,
          hint="after a rejection, resample from where the target has more mass than the draft: "
               "max(0, p - q) elementwise, divided by its sum so it is a distribution")
def _residual_cases(g):
    V = 8
    q = _distribution(V, g)
    p = q.clone()
    p[2] += 0.5 * q[6]
    p[6] -= 0.5 * q[6]
    yield case("p == q except where mass moved to one entry: a one-hot residual", p, q)
    p = torch.zeros(V)
    p[4] = 1.0
    yield case("p one-hot (a greedy target)", p, q)
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    yield case("q zero where p is not", p, q)
    for _ in range(4):
        V = _randint(4, 64, g)
        yield case("random Dirichlet p, q", _distribution(V, g), _distribution(V, g))
    yield case("random peaked p, q (V=1000)", _distribution(1000, g, peaked=True), _distribution(1000, g, peaked=True))


def ref_ngram_propose(tokens: list[int], k: int, n: int) -> list[int]:
    T = len(tokens)
    if n > T or n <= 0:
        return []
    suffix = tokens[T - n:]
    for i in range(T - n - 1, -1, -1):  # latest start first; i = T - n is the suffix itself
        if tokens[i:i + n] == suffix:
            return tokens[i + n:i + n + k]
    return []


@exercise("ngram_propose", reference=ref_ngram_propose,
          hint="take the last n tokens, search backwards from the latest earlier start (not the suffix itself) for "
               "the same n tokens, and return the (up to k) tokens that followed that occurrence; [] if none")
def _ngram_propose_cases(g):
    yield case("no earlier occurrence", [1, 2, 3, 4, 5, 6], 3, 2)
    yield case("match at the very start", [7, 8, 9, 10, 11, 12, 7, 8], 3, 2)
    yield case("match near the end: fewer than k follow", [5, 1, 2, 3, 4, 1, 2, 9, 1, 2], 5, 2)
    yield case("several matches: the most recent wins", [3, 4, 10, 11, 3, 4, 20, 21, 22, 3, 4], 3, 2)
    yield case("overlapping repeats", [6, 6, 6, 6], 4, 2)
    yield case("n larger than the sequence", [1, 2], 3, 3)
    yield case("n equal to the sequence", [1, 2, 3], 3, 3)
    yield case("k = 0", [1, 2, 1, 2], 0, 1)
    for _ in range(6):
        tokens = torch.randint(0, 5, (_randint(8, 40, g),), generator=g).tolist()
        yield case("random tokens from 5 values", tokens, _randint(1, 7, g), _randint(1, 4, g))
