"""Speculative decoding on the lab decoder (notebook 05).

At batch 1 a decode step reads every weight to emit one token, and scoring k + 1 tokens in the
same pass costs little more: the matmuls stay bandwidth-bound. A cheap **drafter** proposes k
tokens; the **target** scores all k + 1 positions in one forward with its KV cache; a rejection
rule keeps a prefix of the drafts and adds one token of its own, so that every emitted token
follows *exactly* the target's distribution (Leviathan et al. 2023; Chen et al. 2023):

- draft token d_i, drawn from the drafter's q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i));
- at the first rejection the target's token is drawn from norm(max(0, p_i - q_i)) and the round ends;
- if all k pass, a bonus token is drawn from p_k, the target's distribution after the last draft.

Greedy decoding is the special case where p and q are one-hot: a draft is kept iff it is the
target's argmax, and the extra token is the target's argmax at the first mismatch.

Rolling back rejected drafts costs nothing in a static KV cache: their keys and values sit at
positions past the new end, no query attends to them (causal mask), and the next round writes
over them before any query could.

The drafter contract (n-gram lookup, a separate small model, a draft head on the target's features)::

    drafter.reset(max_len, device)     a new sequence of at most max_len positions begins
    drafter.propose(state, k) -> (draft, q)
    drafter.propose_device(toks, L, k, temperature, top_p, hidden) -> (draft, q)     (optional)
      the same in tensors only, for rounds that never leave the GPU: toks (capacity,) the committed
      tokens at positions < L ((1,) int64 on the device), hidden the target's states; exactly k drafts
      state:  SpecState: the committed tokens (the last one not yet scored by the target), the
              target's hidden states (for drafters with ``needs_hidden``), the sampling settings
      draft:  (m,) int64, 0 <= m <= k proposed tokens, on the target's device
      q:      (m, vocab) the distributions they were drawn from (after ``sampling_probs`` with the
              same temperature and top-p as the target), or None for a deterministic proposal
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .cuda_graphs import BucketedPrefill, Graphed
from .kv_cache import static_caches


# ---- sampling: one definition for target and drafters ---------------------------------------------
def sampling_probs(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from, (..., vocab) float32: one-hot argmax when
    ``temperature == 0`` (greedy); else softmax(logits / temperature), cut to the smallest set of
    most likely tokens whose mass reaches ``top_p`` and renormalized."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (..., vocab) -> (...,) int64, without a host sync: the index of
    max(p_i / E_i) with E_i ~ Exp(1) is distributed as p (an exponential race)."""
    e = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-20)  # e = 0 would give 0/0
    return (probs / e).argmax(dim=-1)


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """A drafter's token from its logits (vocab,): (token, q) with q the distribution it was drawn
    from, or (argmax, None) when greedy (no random numbers, no q needed)."""
    if temperature == 0:
        return logits.argmax(-1), None
    q = sampling_probs(logits, temperature, top_p)
    return sample(q, generator), q


def accept_drafts(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule. p (m + 1, vocab): the target's distributions at the m + 1 verified
    positions; q (m, vocab) the drafter's (None: deterministic drafts, q one-hot); draft (m,).

    Returns (n, token): the number of leading drafts accepted (0-d int64) and the token the target
    adds after them (0-d int64), both on the device (no host sync)."""
    m = draft.shape[0]
    p_d = p[:m].gather(1, draft[:, None]).squeeze(1)  # p_i(d_i)
    q_d = torch.ones_like(p_d) if q is None else q.gather(1, draft[:, None]).squeeze(1)  # q_i(d_i)
    u = torch.rand(m, device=p.device, generator=generator)
    accepted = u * q_d < p_d  # u < p/q: accept with probability min(1, p/q)
    n = accepted.long().cumprod(0).sum()  # leading accepts
    if q is None:  # q one-hot at the drafts
        q = torch.zeros_like(p[:m]).scatter_(1, draft[:, None], 1.0)
    q_pad = torch.cat([q, torch.zeros_like(p[:1])])  # row m is zero: the residual there is p_m (bonus)
    p_n, q_n = row(p, n), row(q_pad, n)  # the first rejected position (or the bonus position m)
    residual = (p_n - q_n).clamp_min(0.0)  # norm(max(0, p_n - q_n))
    total = residual.sum()
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_n)  # p == q: nothing to fix
    return n, sample(residual, generator)


def row(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """x[i] for a 0-d index tensor on the device, without the host sync that x[i] would make."""
    return x.index_select(0, i.reshape(1))[0]


def expected_tokens(a: float, k: int) -> float:
    """Tokens emitted per target pass with k drafts, each accepted with probability a independently
    of the others: 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def predicted_speedup(a: float, k: int, draft_cost: float, verify_cost: float = 1.0) -> float:
    """Wall-time speedup over plain decoding: tokens per round / (cost of a round in target steps),
    a round being k draft steps of ``draft_cost`` each and one verification of k + 1 tokens costing
    ``verify_cost`` target steps (1.0 if verifying k + 1 tokens cost the same as one)."""
    return expected_tokens(a, k) / (k * draft_cost + verify_cost)


# ---- the committed state a drafter sees -------------------------------------------------------------
@dataclass
class SpecState:
    tokens: list[int]  # committed tokens, prompt included; the last one not yet scored by the target
    hidden: torch.Tensor | None  # (max_len, d): target's final hidden state at positions < len(tokens) - 1
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    examined: int = 0  # draft tokens the rule looked at (those after the first rejection are not)
    emitted: int = 0  # tokens the rounds emitted (accepted + one per round; on-device rounds may overshoot the end)
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """Per-token acceptance rate a: accepted / examined (the estimate of a in (1 - a^(k+1)) / (1 - a))."""
        return self.accepted / self.examined if self.examined else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else float("nan")


# ---- drafters -------------------------------------------------------------------------------------
class NGramDrafter:
    """Prompt lookup (as HF's ``prompt_lookup_num_tokens``): find the most recent earlier place where
    the last n tokens occurred (n from ``max_ngram`` down to ``min_ngram``) and propose the tokens
    that followed it. No model: free to run, good where the output copies its input."""

    needs_hidden = False
    starts_on_device = True  # propose_device reads only the committed tokens: no first round from Python

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, compile: bool = False):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"ngram{max_ngram}"
        self.device = None
        # on-device rounds: the lookup compiled into a few fused kernels (one compiled function for
        # every drafter: guards on shapes and the ints k, n only)
        self._lookup_device = _compiled(ngram_lookup_device) if compile else ngram_lookup_device

    def reset(self, max_len: int, device=None):
        self.device = device

    @staticmethod
    def lookup(tokens: np.ndarray, k: int, n: int) -> np.ndarray:
        """Up to k tokens that followed the most recent earlier occurrence of tokens[-n:]."""
        L = len(tokens)
        if L <= n or k < 1:
            return tokens[:0]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: L - 1], n)  # starts 0 .. L-1-n
        hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))  # earlier places (suffix excluded)
        if not len(hits):
            return tokens[:0]
        start = hits[-1] + n  # the most recent match wins
        return tokens[start : start + k]

    def propose(self, state: SpecState, k: int):
        toks = np.asarray(state.tokens, dtype=np.int64)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            found = self.lookup(toks, k, n)
            if len(found):
                return torch.as_tensor(found, device=self.device), None
        return torch.empty(0, dtype=torch.long, device=self.device), None


    def propose_device(self, toks: torch.Tensor, L: torch.Tensor, k: int, temperature: float = 0.0,
                       top_p: float = 1.0, hidden=None):
        """The same lookup in tensors, for a round that never leaves the GPU (``ngram_lookup_device``)."""
        return self._lookup_device(toks, L, k, self.max_ngram, self.min_ngram), None


def ngram_lookup_device(toks: torch.Tensor, L: torch.Tensor, k: int, max_ngram: int, min_ngram: int) -> torch.Tensor:
    """Prompt lookup in tensors: toks (capacity,) holds the committed tokens at positions < L (a (1,)
    tensor). Always k drafts: where fewer than k tokens follow the match, or nothing matches, the last
    token is repeated (a wrong guess costs only the verification of positions verified anyway)."""
    cap = toks.shape[0]
    start = torch.full_like(L, -1)  # where the proposed continuation starts
    for n in range(max_ngram, min_ngram - 1, -1):  # longer matches first
        suffix = toks.index_select(0, (L - n + torch.arange(n, device=toks.device)).clamp_min(0))  # (n,)
        s = torch.arange(cap - n + 1, device=toks.device)  # window starts
        hit = (toks.unfold(0, n, 1) == suffix).all(1) & (s < L - n)  # earlier occurrences only
        last = torch.where(hit, s, -1).max()
        start = torch.where((start < 0) & (last >= 0), last + n, start)
    follow = start + torch.arange(k, device=toks.device)
    follow = torch.where((start >= 0) & (follow < L), follow, L - 1)
    return toks.index_select(0, follow)


class ModelDrafter:
    """A separate small model (a lab Decoder sharing the target's tokenizer) drafts autoregressively
    with its own static KV cache. It remembers which tokens its cache holds and, each round, feeds
    only those it lacks: the last committed token, and the last draft if all drafts were accepted."""

    needs_hidden = False

    def __init__(self, model, name: str = "draft model", graph: bool = False):
        self.model, self.name, self.graph = model, name, graph
        self.caches, self.fed, self._graphs = None, [], {}

    def reset(self, max_len: int, device=None):
        if self.caches is None or self.caches[0].max_seq_len < max_len:
            self.caches, self._graphs = static_caches(self.model, 1, max_len), {}
        self.fed = []  # tokens in the cache, by position

    def _forward(self, idx, pos):
        with self.model.kv_caches_attached(self.caches):
            return self.model(idx, pos, last_only=True)[0, -1]  # (vocab,)

    def _draft_loop(self, first_idx, first_pos, k, temperature, top_p, generator):
        """Feed first_idx (1, T) at first_pos, then draw k tokens, each fed back at the next position."""
        logits = self._forward(first_idx, first_pos)
        drafts, qs = [], []
        pos = first_pos[-1:]
        for i in range(k):
            tok, q = draw(logits, temperature, top_p, generator)
            drafts.append(tok)
            if q is not None:
                qs.append(q)
            if i < k - 1:
                pos = pos + 1
                logits = self._forward(tok.view(1, 1), pos)
        return torch.stack(drafts), (torch.stack(qs) if qs else None)

    def propose_device(self, toks, L, k, temperature=0.0, top_p=1.0, hidden=None):
        """For an on-device round: feed the last two committed tokens (the first may be re-fed: its
        cache entry is rewritten with the same values) and draft k. Needs the cache valid below
        position L - 2, which a first ``propose`` round after the prompt guarantees."""
        pos = L - 2 + torch.arange(2, device=toks.device)
        draft, q = self._draft_loop(toks.index_select(0, pos)[None], pos, k, temperature, top_p, None)
        return draft, (None if temperature == 0 else q)

    @torch.no_grad()
    def propose(self, state: SpecState, k: int):
        tokens, L = state.tokens, len(state.tokens)
        dev = self.model.device
        if k < 1:
            return torch.empty(0, dtype=torch.long, device=dev), None
        start = 0  # the first position whose token the cache does not hold
        for a, b in zip(self.fed, tokens):
            if a != b:
                break
            start += 1
        start = min(start, L - 1)  # the last committed token is always fed: it yields the first draft
        if self.graph and start >= L - 2 and L >= 2:  # a fixed shape: the last two tokens (one may be re-fed)
            key = (k, state.temperature, state.top_p)
            if key not in self._graphs:
                idx_buf = torch.zeros(1, 2, dtype=torch.long, device=dev)
                pos_buf = torch.tensor([L - 2, L - 1], device=dev)
                self._graphs[key] = Graphed(
                    lambda i, p: self._draft_loop(i, p, k, state.temperature, state.top_p, None), idx_buf, pos_buf)
            draft, q = self._graphs[key](torch.tensor([tokens[L - 2:]], device=dev),
                                         torch.tensor([L - 2, L - 1], device=dev))
            draft, q = draft.clone(), (None if q is None else q.clone())
        else:
            idx = torch.tensor([tokens[start:]], device=dev)
            draft, q = self._draft_loop(idx, torch.arange(start, L, device=dev), k,
                                        state.temperature, state.top_p, state.generator)
        self.fed = list(tokens) + draft[: k - 1].tolist()
        return draft, (None if state.temperature == 0 else q)


# ---- the speculative decoder ---------------------------------------------------------------------
def rounds_until_end(left: int, k: int, room: int) -> int:
    """How many on-device rounds to run before the next host sync, ``left`` tokens still to emit:
    ceil(left / (k + 1)), the fewest that could emit them (each round emits 1 to k + 1). No round of
    such a batch is wasted: were ``left`` reached before its last round, that many rounds of k + 1
    would already cover it. Sizing batches from the tokens per round so far would need fewer syncs,
    but rounds are ~20x dearer than a sync (~1 ms against ~30-50 us of GPU idle while Python
    launches the next batch), and acceptance can jump: on the GPU, a 128-token answer whose text
    fell into a repeated list after a few rounds ran twice the rounds it needed, sized from the
    slow start (probe_round05). The last round may overshoot by up to k tokens, computed and
    dropped. ``room``: the rounds the buffers can hold (each writes up to k + 1 positions); at least 1."""
    return max(1, min(-(-left // (k + 1)), room))


def commit_round(logits, h, draft, q, pos, toks, L, counts, hidden, temperature, top_p, accept, log=None):
    """The end of an on-device round: accept (greedy: the drafts equal to the target's argmax, no
    random numbers: the same rule for one-hot p and q), then write positions L .. L+n-1 with the
    accepted drafts and L+n with the extra token (writes past it are overwritten by later rounds,
    like the rejected drafts' KV entries), advance L, count (rounds, accepted, rounds with all k) and,
    given ``log``, write n at index ``counts[0]`` (the accepted drafts of each round)."""
    k = draft.shape[0]
    j = torch.arange(k + 1, device=toks.device)
    if temperature == 0:
        best = logits.argmax(-1)  # (k + 1,) the target's own choices
        n = (draft == best[:k]).long().cumprod(0).sum()
        extra = best.index_select(0, n.reshape(1))[0]
    else:
        n, extra = accept(sampling_probs(logits, temperature, top_p), q, draft, None)
    if hidden is not None:
        hidden.index_copy_(0, pos, h)
    toks.index_copy_(0, L + j, torch.where(j < n, torch.cat([draft, draft[-1:]]), extra))
    L.add_(n + 1)
    if log is not None:
        log.index_copy_(0, counts[:1].clamp_max(log.shape[0] - 1), n.reshape(1))
    counts.add_(torch.stack([torch.ones_like(n), n, (n == k).long()]))


_COMPILED = {}


def _compiled(fn):
    """One torch.compile per function, shared by every decoder and drafter."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


class SpeculativeDecoder:
    """Target + drafter, batch 1.

    ``generate`` is the algorithm as written above, one round at a time from Python: any drafter,
    drafts of any length up to k, one host sync per round. ``generate_on_device`` runs the same
    rounds without leaving the GPU (for drafters with ``propose_device``: always k drafts, the
    committed tokens and their count kept in device tensors); with ``graph=True`` each round is one
    CUDA-graph replay, so launches and host syncs no longer eat the gain.

    ``accept``: the rejection rule (``accept_drafts``) for sampling; replaceable so that a wrong rule
    can be shown to fail the distribution test (notebook 05). Greedy on-device rounds compare the
    drafts with the target's argmax directly (the same rule for one-hot p and q, without random numbers).
    """

    def __init__(self, target, drafter, k: int = 4, temperature: float = 0.0, top_p: float = 1.0,
                 graph: bool = False, accept=accept_drafts, generator: torch.Generator | None = None,
                 compile_glue: bool = False, prefill_bucket: int | None = None):
        if k < 1:
            raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
        if graph and target.device.type != "cuda":
            raise RuntimeError("graph=True captures CUDA graphs and needs a GPU")
        self.target, self.drafter, self.k = target, drafter, k
        self.temperature, self.top_p = temperature, top_p
        sampling_probs(torch.zeros(1), temperature, top_p)  # validates the settings
        self.graph, self.accept, self.generator = graph, accept, generator
        self.caches, self.hidden, self._graphs, self._round_graphs = None, None, {}, {}
        self.stats = SpecStats()
        # compile_glue: the accept-and-commit step of on-device rounds as one compiled function
        # (a few fused kernels instead of ~30 small ones per round: they count on a 1 ms step)
        self._commit_fn = _compiled(commit_round) if compile_glue else commit_round
        if prefill_bucket is not None and (not isinstance(prefill_bucket, int) or prefill_bucket < 1):
            raise ValueError(f"prefill_bucket must be a positive number of tokens or None, got {prefill_bucket!r}")
        # prefill_bucket: the prompt padded to a multiple of it and, with graph=True, its forward
        # replayed from a CUDA graph per padded length (labutils.cuda_graphs; DecodeEngine's option too)
        self.prefill_bucket, self._prefill = prefill_bucket, None

    # ---- pieces shared by both loops -----------------------------------------------------------
    def _check(self, idx, max_new_tokens):
        if idx.dim() != 2 or idx.shape[0] != 1:
            raise ValueError(f"speculative decoding here is batch 1: idx must be (1, T), got {tuple(idx.shape)}")
        if idx.shape[1] < 1:
            raise ValueError("the prompt must hold at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        max_len = idx.shape[1] + max_new_tokens + self.k + 1  # the last round may verify k tokens past the end
        if max_len > self.target.cfg.max_seq_len:
            raise ValueError(f"{idx.shape[1]} prompt + {max_new_tokens} new tokens (+ {self.k + 1} of verification "
                             f"room) exceed the model's context of {self.target.cfg.max_seq_len}")
        return max_len

    def _alloc(self, max_len: int):
        if self.caches is None or self.caches[0].max_seq_len < max_len:
            # whole multiples of 256 positions: the same shapes for most prompts, so compiled and
            # captured rounds are reused
            max_len = min(-(-max_len // 256) * 256, self.target.cfg.max_seq_len)
            dev = self.target.device
            self.caches = static_caches(self.target, 1, max_len)
            self._graphs, self._round_graphs = {}, {}  # verification graphs by T, whole rounds by k
            if self.prefill_bucket is not None:  # recorded graphs write to these caches
                self._prefill = BucketedPrefill(self.target, max_len, self.prefill_bucket, graph=self.graph, full=True)
            self._toks = torch.zeros(max_len, dtype=torch.long, device=dev)  # on-device rounds: the tokens
            self._L = torch.zeros(1, dtype=torch.long, device=dev)  # ... and how many are committed
            self._counts = torch.zeros(3, dtype=torch.long, device=dev)  # rounds, accepted, rounds with all k
            self._log = torch.zeros(max_len, dtype=torch.long, device=dev)  # accepted drafts of each round
            if getattr(self.drafter, "needs_hidden", False):
                self.hidden = torch.zeros(max_len, self.target.cfg.hidden_size, dtype=self.target.dtype, device=dev)

    def _forward(self, idx, pos):
        """Target logits and hidden states (T, vocab), (T, d) for idx (1, T) at positions pos (T,)."""
        logits, h = self.target(idx, pos, return_hidden=True)
        return logits[0], h[0]

    def _verify(self, idx, pos):
        if not self.graph:
            return self._forward(idx, pos)
        T = idx.shape[1]
        if T not in self._graphs:
            self._graphs[T] = Graphed(self._forward, torch.zeros_like(idx), pos.clone())
        return self._graphs[T](idx, pos)

    def _start(self, idx, max_len) -> SpecState:
        """Prefill: the prompt fills the target's cache; the first token comes from its last position."""
        T, dev = idx.shape[1], self.target.device
        self.drafter.reset(self.caches[0].max_seq_len, dev)  # the target's (rounded) capacity
        self.stats = SpecStats()
        if self._prefill is not None:
            logits, h = (x[0] for x in self._prefill(idx))
        else:
            logits, h = self._forward(idx, torch.arange(T, device=dev))
        if self.hidden is not None:
            self.hidden[:T] = h
        first = sample(sampling_probs(logits[-1], self.temperature, self.top_p), self.generator)
        return SpecState(idx[0].tolist() + [int(first)], self.hidden, self.temperature, self.top_p, self.generator)

    def _host_round(self, state: SpecState, k: int) -> list[int]:
        """One round from Python: draft up to k, verify in one forward, accept; returns the new tokens."""
        dev = self.target.device
        L = len(state.tokens)  # the last token, at position L - 1, is not in the cache yet
        draft, q = self.drafter.propose(state, k)
        m = draft.shape[0]
        # verify: the last committed token and the m drafts, positions L-1 .. L-1+m, one forward
        verify_idx = torch.cat([torch.tensor([state.tokens[-1]], device=dev), draft])[None]
        logits, h = self._verify(verify_idx, torch.arange(L - 1, L + m, device=dev))
        p = sampling_probs(logits, self.temperature, self.top_p)  # (m + 1, vocab)
        n, extra = self.accept(p, q, draft, self.generator)
        if self.hidden is not None:
            self.hidden[L - 1 : L + m] = h  # rows past the accepted ones are overwritten later
        n = int(n)  # the one host sync of a round
        s = self.stats
        s.rounds, s.drafted, s.accepted = s.rounds + 1, s.drafted + m, s.accepted + n
        s.examined += n + (1 if n < m else 0)
        s.accepted_per_round.append(n)
        return draft[:n].tolist() + [int(extra)]

    @staticmethod
    def _finish(tokens: list[int], T: int, max_new_tokens: int, eos_id) -> list[int]:
        new = tokens[T : T + max_new_tokens]
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        return tokens[:T] + new

    # ---- the algorithm, one round at a time ----------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Continue idx (1, T) by up to max_new_tokens tokens (fewer if ``eos_id`` appears): (1, T + n)."""
        max_len = self._check(idx, max_new_tokens)
        if max_new_tokens == 0:
            return idx.clone()
        T = idx.shape[1]
        self._alloc(max_len)
        with self.target.kv_caches_attached(self.caches):  # attached for this call only
            state = self._start(idx, max_len)
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=max_new_tokens, desc=f"speculative ({self.drafter.name}, k={self.k})")
            while len(state.tokens) - T < max_new_tokens and not (eos_id is not None and state.tokens[-1] == eos_id):
                out = self._host_round(state, min(self.k, max_new_tokens - (len(state.tokens) - T)))
                state.tokens.extend(out)
                self.stats.emitted += len(out)
                if bar is not None:
                    bar.update(len(out))
            if bar is not None:
                bar.close()
        return torch.tensor([self._finish(state.tokens, T, max_new_tokens, eos_id)], device=idx.device)

    # ---- the same rounds, on the device ----------------------------------------------------------
    def _device_round(self):
        """One round in tensors only (capturable in a CUDA graph): draft k, verify k + 1 positions in
        one forward, accept, commit the new tokens to ``_toks`` and advance ``_L``."""
        toks, L, k = self._toks, self._L, self.k
        draft, q = self.drafter.propose_device(toks, L, k, self.temperature, self.top_p, self.hidden)
        pos = L - 1 + torch.arange(k + 1, device=toks.device)  # the last committed token, then the drafts
        logits, h = self._forward(torch.cat([toks.index_select(0, L - 1), draft])[None], pos)
        self._commit_fn(logits, h, draft, q, pos, toks, L, self._counts, self.hidden,
                        self.temperature, self.top_p, self.accept, self._log)

    def _device_round_graph(self):
        if self.k not in self._round_graphs:  # keyed by k; the buffers are fixed until _alloc grows them
            saved = (self._toks.clone(), self._L.clone(), self._counts.clone())

            def warm_up():  # from the same state each time: the writes land past the committed tokens
                self._device_round()
                for buf, v in zip((self._toks, self._L, self._counts), saved):
                    buf.copy_(v)

            warm_up()  # compiles on the default stream (a first compile on a side stream once stalled for minutes)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                warm_up()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._device_round()
            self._round_graphs[self.k] = graph
        return self._round_graphs[self.k]

    @torch.no_grad()
    def generate_on_device(self, idx: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                           phases: dict | None = None) -> torch.Tensor:
        """``generate`` with the rounds kept on the device: the same tokens in greedy mode, the same
        distribution when sampling. The first round runs from Python (the drafter reads the prompt);
        then rounds run in batches between host syncs (``rounds_until_end``). A drafter
        whose ``propose_device`` reads only the committed tokens (``starts_on_device``: prompt lookup)
        starts on the device directly.

        ``phases``: a dict to fill with the seconds of each phase, the device synchronized at their
        borders: ``prefill`` (the prompt's forward and the first token), ``host_round`` (the first
        round, from Python; none for a drafter that starts on the device), ``rounds`` (the on-device
        rounds and their host syncs), ``syncs`` (their
        number)."""
        mark = _PhaseClock(phases, idx.is_cuda)
        if not hasattr(self.drafter, "propose_device"):
            raise TypeError(f"drafter {self.drafter.name!r} has no propose_device: use generate()")
        max_len = self._check(idx, max_new_tokens)
        if max_new_tokens == 0:
            return idx.clone()
        T, k = idx.shape[1], self.k
        self._alloc(max_len)
        with self.target.kv_caches_attached(self.caches):
            state = self._start(idx, max_len)
            mark("prefill")
            if max_new_tokens > 1 and not getattr(self.drafter, "starts_on_device", False):
                state.tokens.extend(self._host_round(state, k))
            mark("host_round")
            L = len(state.tokens)
            self._toks[:L] = torch.tensor(state.tokens, device=self._toks.device)
            self._L.fill_(L)
            self._counts.zero_()
            cap = self._toks.shape[0]
            while L - T < max_new_tokens:
                if eos_id is not None and eos_id in self._toks[T:L].tolist():
                    break
                rounds = rounds_until_end(max_new_tokens - (L - T), k, (cap - L) // (k + 1))
                step = self._device_round_graph().replay if self.graph else self._device_round
                for _ in range(rounds):
                    step()
                L = int(self._L)  # a host sync per batch of rounds
                mark.count("syncs")
            mark("rounds")
            tokens = self._toks[: min(L, T + max_new_tokens)].tolist()
        r, acc, full = self._counts.tolist()
        s = self.stats
        s.accepted_per_round.extend(self._log[:r].tolist())
        s.rounds, s.accepted, s.drafted = s.rounds + r, s.accepted + acc, s.drafted + r * k
        s.examined += acc + r - full
        s.emitted = L - T - 1  # what the rounds produced (the last batch's overshoot included): accepted + rounds
        return torch.tensor([self._finish(tokens, T, max_new_tokens, eos_id)], device=idx.device)

    @torch.no_grad()
    def decode_tok_s(self, idx: torch.Tensor, n: int = 128, repeats: int = 3, on_device: bool = True) -> float:
        """Tokens/s of ``generate_on_device(idx, n)`` (or ``generate``) after one warm-up call,
        prefill included as in ``plain_tok_s``; best of ``repeats`` (``spec_speed``: also without prefill)."""
        fn = self.generate_on_device if on_device else self.generate
        return _best_tok_s(lambda: fn(idx, n), n, repeats, idx.is_cuda)


@torch.no_grad()
def verify_ms(model, T: int, context: int = 256, rep_ms: float = 100):
    """Median time (a ``bench.Timing``) of one forward of T new tokens at positions context ..
    context + T - 1 with a static KV cache holding ``context`` positions: what verifying T - 1 drafts
    costs. On a GPU the forward is replayed from a CUDA graph (``time_fn(cuda_graph=True)``), as an
    engine runs it; random token ids (time does not depend on them)."""
    from . import bench, runtime

    if T < 1 or context < 0:
        raise ValueError(f"need T >= 1 and context >= 0, got T={T}, context={context}")
    dev = model.device
    # the cache rounded up to whole 256 positions: one cache shape for most T, so compiled layers
    # do not recompile for each T (the time does not depend on the unused tail)
    caches = static_caches(model, 1, -(-(context + T) // 256) * 256)
    x = torch.randint(0, model.cfg.vocab_size, (1, context + T), device=dev)
    with model.kv_caches_attached(caches):
        if context:
            model(x[:, :context], torch.arange(context, device=dev))  # fills the cache (not timed)
        pos = torch.arange(context, context + T, device=dev)
        return bench.time_fn(lambda: model(x[:, context:], pos), rep_ms=rep_ms, cuda_graph=runtime.has_cuda())


def _best_tok_s(fn, n, repeats, cuda):
    best = float("inf")
    for r in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if r:
            best = min(best, time.perf_counter() - t0)
    return n / best


@torch.no_grad()
def plain_tok_s(engine, idx: torch.Tensor, n: int = 128, repeats: int = 3) -> float:
    """Tokens/s of a plain ``DecodeEngine.generate(idx, n)`` (prefill included, as for speculation)."""
    return _best_tok_s(lambda: engine.generate(idx, n), n, repeats, idx.is_cuda)


@torch.no_grad()
def spec_speed(spec, idx: torch.Tensor, n: int = 128, repeats: int = 5) -> dict:
    """Speed of ``spec.generate_on_device(idx, n)`` from the same timed calls (one warm-up, then
    ``repeats``; ``_speeds``): ``tok_s`` over the whole call (prefill included) and ``decode_tok_s``
    over the n - 1 tokens after the prompt's forward and first token, as ``DecodeEngine.decode_tok_s``
    counts."""
    return _speeds(lambda ph: spec.generate_on_device(idx, n, phases=ph), n, repeats)


@torch.no_grad()
def plain_speed(engine, idx: torch.Tensor, n: int = 128, repeats: int = 5) -> dict:
    """The same speeds for a plain ``DecodeEngine``: ``prefill(idx)`` then ``decode(n - 1)``, timed
    apart (as ``generate(idx, n)`` runs them)."""
    if n < 2:
        raise ValueError(f"need n >= 2 (the first token comes from the prefill), got {n}")

    def call(ph):
        mark = _PhaseClock(ph, idx.is_cuda)
        engine.prefill(idx)
        mark("prefill")
        engine.decode(n - 1)
        mark("decode")

    return _speeds(call, n, repeats)


def _speeds(call, n: int, repeats: int) -> dict:
    """``call(phases)`` once to warm up, then ``repeats`` times: the median whole call (its phases
    summed) as ``tok_s`` over n tokens, with the slowest and fastest call (``tok_s_min``,
    ``tok_s_max``), and the median time after the ``prefill`` phase as ``decode_tok_s`` over n - 1."""
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    totals, decodes = [], []
    for r in range(repeats + 1):
        ph = {}
        call(ph)
        if r:
            seconds = sum(v for k, v in ph.items() if k != "syncs")
            totals.append(seconds)
            decodes.append(seconds - ph["prefill"])
    return {"tok_s": n / statistics.median(totals), "tok_s_min": n / max(totals), "tok_s_max": n / min(totals),
            "decode_tok_s": (n - 1) / statistics.median(decodes)}


class _PhaseClock:
    """``mark(name)``: seconds since the previous mark into ``phases[name]`` (the device synchronized
    first); ``count(name)`` adds 1. Does nothing when ``phases`` is None."""

    def __init__(self, phases: dict | None, cuda: bool):
        self.phases, self.cuda = phases, cuda
        if phases is not None:
            self._sync()
            self.t = time.perf_counter()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, name: str):
        if self.phases is None:
            return
        self._sync()
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now

    def count(self, name: str):
        if self.phases is not None:
            self.phases[name] = self.phases.get(name, 0) + 1
