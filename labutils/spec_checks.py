"""Is speculative sampling lossless? Statistical checks (notebook 05).

The rejection rule must leave every emitted token distributed exactly as the target's own sample
would be. We draw many speculative rounds and compare the emitted tokens' frequencies with the
target's probabilities by Pearson's chi-square test, on two problems:

- ``markov_joint``: a toy target and drafter that are Markov chains over a small vocabulary; the
  first two emitted tokens after a fixed token, whose joint law under the target is
  P[x, a] * P[a, b]: this exercises acceptance, resampling, the bonus token and the round boundary;
- ``first_token``: the next-token distribution of a real model after a fixed prefix, with a
  drafter distribution that differs from it (same model, other temperature).

A wrong rule (``resample_from_p``: after a rejection draw from p instead of norm(max(0, p - q)),
a classic mistake) is the negative control: the same test must reject it.
"""
from __future__ import annotations

import torch

from .speculative import accept_drafts, row, sample


def chisquare(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> dict:
    """Pearson's goodness-of-fit test of observed ``counts`` (n_bins,) against ``probs``.

    Bins whose expected count is below ``min_expected`` are pooled into one (dropped if the pool is
    still below it) so the chi-square approximation holds. Returns statistic, degrees of freedom,
    p-value (survival function of chi-square: the regularized upper incomplete gamma function)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if counts.shape != probs.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and probs {tuple(probs.shape)} differ in shape")
    n = counts.sum()
    expected = probs / probs.sum() * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < min_expected:  # a pool still too small: fold it into the largest bin
        j = int(exp[:-1].argmax())
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    if df < 1:
        raise ValueError("fewer than two bins with enough expected counts: draw more samples")
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    return {"statistic": stat, "df": df, "p_value": p_value, "n": int(n)}


def resample_from_p(p, q, draft, generator=None):
    """A WRONG rule, the negative control: accepts like ``accept_drafts`` but, at a rejection,
    draws the target's token from p itself instead of norm(max(0, p - q)). Tokens the drafter likes
    then come out too often."""
    m = draft.shape[0]
    p_d = p[:m].gather(1, draft[:, None]).squeeze(1)
    q_d = torch.ones_like(p_d) if q is None else q.gather(1, draft[:, None]).squeeze(1)
    u = torch.rand(m, device=p.device, generator=generator)
    n = (u * q_d < p_d).long().cumprod(0).sum()
    return n, sample(row(p, n), generator)


def random_chain(V: int, sharpness: float, generator: torch.Generator) -> torch.Tensor:
    """A random Markov transition matrix (V, V): rows of uniform draws raised to ``sharpness``
    (larger: peakier rows), normalized."""
    rows = torch.rand(V, V, generator=generator, dtype=torch.float64) ** sharpness
    return (rows / rows.sum(-1, keepdim=True)).float()


def markov_joint(P: torch.Tensor, Q: torch.Tensor, x0: int, k: int, n_samples: int, accept=accept_drafts,
                 generator: torch.Generator | None = None) -> dict:
    """Speculative rounds on a toy: target chain P, drafter chain Q (V, V), starting after token x0
    with k drafts per round, until two tokens are emitted; counts of each (a, b) pair against the
    target's joint law P[x0, a] P[a, b]."""
    V = P.shape[0]
    counts = torch.zeros(V, V)
    for _ in range(n_samples):
        emitted, last = [], x0
        while len(emitted) < 2:
            draft, q_rows, prev = [], [], last
            for _ in range(k):  # the drafter's chain, k steps
                d = int(torch.multinomial(Q[prev], 1, generator=generator))
                draft.append(d)
                q_rows.append(Q[prev])
                prev = d
            ctx = [last] + draft  # the target's distribution after each verified position
            p = P[torch.tensor(ctx)]
            n, extra = accept(p, torch.stack(q_rows), torch.tensor(draft), generator)
            out = draft[: int(n)] + [int(extra)]
            emitted += out
            last = out[-1]
        counts[emitted[0], emitted[1]] += 1
    joint = P[x0][:, None] * P  # (V, V): P[x0, a] P[a, b]
    return {**chisquare(counts, joint), "counts": counts, "expected": joint}


def first_token(p: torch.Tensor, q: torch.Tensor, n_samples: int, accept=accept_drafts,
                generator: torch.Generator | None = None, batch: int = 4096) -> dict:
    """The first token a speculative round emits (k = 1: the draft if accepted, else the resample)
    when the drafter proposes from q (vocab,) and the target's distribution is p (vocab,), tested
    against p. Rounds are independent, so they are drawn in batches. The rule sees p and q on the
    tokens where either is positive (after top-p, a few hundred of the vocabulary): the same law, as
    a token with p = q = 0 is never drafted nor resampled, at a fraction of the cost per round."""
    support = torch.nonzero((p > 0) | (q > 0)).flatten()
    ps, qs = p[support], q[support]
    pp, qq = torch.stack([ps, ps]), qs[None]
    counts_s = torch.zeros(len(support), dtype=torch.float64)
    done = 0
    while done < n_samples:
        b = min(batch, n_samples - done)
        drafts = torch.multinomial(qs, b, replacement=True, generator=generator)
        for d in drafts.tolist():
            n, extra = accept(pp, qq, torch.tensor([d]), generator)
            counts_s[d if int(n) else int(extra)] += 1
        done += b
    counts = torch.zeros_like(p, dtype=torch.float64)
    counts[support] = counts_s.to(counts.device)
    return {**chisquare(counts, p), "counts": counts}
