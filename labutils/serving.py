"""The engine seam of a server (notebook 06): requests in, tokens out, one iteration at a time.

A server (labutils.serve) or a load replay (labutils.trace) drives any engine through four calls::

    engine.add(request)            queue a Request; it is served in some later step
    engine.step() -> [Output]      one iteration: every request it advanced gets one Output with the
                                   token ids new in this step; the last Output of a request has
                                   finished=True and finish_reason "stop" (a stop id, e.g. EOS, was
                                   drawn: it is the last of the ids) or "length" (max_tokens reached)
    engine.has_unfinished()        True while some added request has not finished
    engine.abort(request_id)       drop a request (a client went away); no more Outputs for it

Engines are driven by one thread (the server's engine loop): they need not be thread-safe. (Nor is
the model they run: the decoder's cache seam is state on the model, so while an engine steps, no
other thread may run that model with caches of its own.)
Every engine stamps each request's ``Timing`` (arrival, first token, each token, finish) with
``time.perf_counter()``, so TTFT and TPOT are measured the same way for every engine.

``SequentialEngine`` is the baseline: one request at a time, prefill then one token per step with a
static KV cache, the others waiting in FIFO order. It is correct and simple, and slow under load:
a request that arrives behind a long one waits for all of it (head-of-line blocking), and each step
reads every weight to produce one token. The continuous-batching scheduler (notebook 06) replaces
it behind the same four calls: many requests per step, admitted and retired at every iteration.
``StaticBatchEngine`` is the other baseline, batching as servers did before that: fixed batches,
padded, each run to its longest output, over a contiguous KV reservation.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .generate import check_count

FINISH_REASONS = ("stop", "length")


@dataclass
class Timing:
    """perf_counter() stamps of one request: when it arrived, when each token came out, when it ended."""
    arrival: float
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def ttft(self) -> float | None:
        """Time to first token (s): queueing + prefill."""
        return None if not self.token_times else self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (s): (last - first) / (n - 1); None for n < 2."""
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival


@dataclass
class Request:
    """One generation request, in token ids. ``stop_ids``: ids that end it (EOS); the stop id drawn is
    the last id of the output. ``seed``: a private generator for sampling (reproducible draws)."""
    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None
    arrival: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.prompt = [int(t) for t in self.prompt]
        if not self.prompt:
            raise ValueError(f"request {self.id}: the prompt holds no token")
        self.max_tokens = check_count(self.max_tokens, "max_tokens", minimum=1)
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"request {self.id}: need temperature >= 0 and 0 < top_p <= 1, got "
                             f"temperature={self.temperature}, top_p={self.top_p}")
        self.stop_ids = frozenset(int(t) for t in self.stop_ids)


@dataclass
class Output:
    """What one step produced for one request; ``timing`` is filled in on the finished Output."""
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    timing: Timing | None = None


@runtime_checkable
class Engine(Protocol):
    max_seq_len: int  # prompt + output tokens a request may span

    def add(self, request: Request) -> None: ...
    def step(self) -> list[Output]: ...
    def has_unfinished(self) -> bool: ...
    def abort(self, request_id: str) -> None: ...


def engine_max_seq_len(model, max_seq_len: int | None) -> int:
    """An engine's prompt + output tokens per request: ``max_seq_len``, by default min(the model's
    context, 2048); at least 2 and at most the model's context."""
    ctx = model.cfg.max_seq_len
    n = check_count(max_seq_len if max_seq_len is not None else min(ctx, 2048), "max_seq_len", minimum=2)
    if n > ctx:
        raise ValueError(f"max_seq_len={n} exceeds the model's context of {ctx}")
    return n


def check_fits(request: Request, max_seq_len: int) -> None:
    """ValueError unless prompt + max_tokens fits in ``max_seq_len`` positions (one message for all engines)."""
    T = len(request.prompt)
    if T + request.max_tokens > max_seq_len:
        raise ValueError(f"this model's maximum context length is {max_seq_len} tokens, but the request "
                         f"asks for {T + request.max_tokens} ({T} in the prompt, {request.max_tokens} to "
                         f"generate); shorten the prompt or lower max_tokens")


class _Running:
    """Per-request decoding state inside an engine."""

    def __init__(self, request: Request, device):
        self.request = request
        self.timing = Timing(arrival=request.arrival)
        self.out: list[int] = []
        self.generator = None
        if request.seed is not None and request.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)

    def emit(self, token: int, now: float) -> Output:
        """Record ``token``; the Output for it, finished when it is a stop id or the last allowed one."""
        r = self.request
        self.out.append(token)
        self.timing.token_times.append(now)
        reason = "stop" if token in r.stop_ids else "length" if len(self.out) >= r.max_tokens else None
        if reason is None:
            return Output(r.id, [token])
        self.timing.finish = now
        return Output(r.id, [token], finished=True, finish_reason=reason, timing=self.timing)


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """The next token from logits (vocab,): argmax when greedy, else a draw from
    ``speculative.sampling_probs`` (temperature, top-p) with the request's generator."""
    if temperature == 0:
        return int(logits.argmax(-1))
    from .speculative import sample, sampling_probs

    return int(sample(sampling_probs(logits, temperature, top_p), generator))


class SequentialEngine:
    """The baseline engine: requests one after another (FIFO), batch 1, a static KV cache.

    A step either prefills the request at the head of the queue (giving its first token) or decodes
    one more token for it. The cache holds ``max_seq_len`` positions and is reused by each request
    without clearing: prefill overwrites positions 0..T-1, and positions beyond a query's own are
    hidden by the causal mask. ``model``: the lab decoder (``labutils.decoder.Decoder``).
    """

    def __init__(self, model, max_seq_len: int | None = None):
        from .kv_cache import static_caches

        self.model = model
        self.max_seq_len = engine_max_seq_len(model, max_seq_len)
        self.caches = static_caches(model, 1, self.max_seq_len)
        self.waiting: collections.OrderedDict[str, _Running] = collections.OrderedDict()
        self.current: _Running | None = None
        self.steps = 0

    def add(self, request: Request) -> None:
        check_fits(request, self.max_seq_len)
        if request.id in self.waiting or (self.current and self.current.request.id == request.id):
            raise ValueError(f"a request with id {request.id!r} is already in the engine")
        if max(request.prompt) >= self.model.cfg.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"request {request.id}: prompt token ids must lie in 0..{self.model.cfg.vocab_size - 1}")
        self.waiting[request.id] = _Running(request, self.model.device)

    def has_unfinished(self) -> bool:
        return self.current is not None or bool(self.waiting)

    def abort(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)
        if self.current is not None and self.current.request.id == request_id:
            self.current = None

    @torch.no_grad()
    def step(self) -> list[Output]:
        if self.current is None:
            if not self.waiting:
                return []
            _, self.current = self.waiting.popitem(last=False)
        run, r, dev = self.current, self.current.request, self.model.device
        with self.model.kv_caches_attached(self.caches):
            if not run.out:  # prefill: the whole prompt at positions 0..T-1, the first token from its last
                idx = torch.tensor([r.prompt], device=dev)  # (1, T)
                logits = self.model(idx, torch.arange(idx.shape[1], device=dev), last_only=True)
            else:  # decode: the last token at its position, attending to the cache
                pos = len(r.prompt) + len(run.out) - 1
                idx = torch.tensor([[run.out[-1]]], device=dev)  # (1, 1)
                logits = self.model(idx, torch.tensor([pos], device=dev), last_only=True)
        token = pick_token(logits[0, -1], r.temperature, r.top_p, run.generator)
        out = run.emit(token, time.perf_counter())
        if out.finished:
            self.current = None
        self.steps += 1
        return [out]


class _RowsOf:
    """Rows r0:r1 of a StaticKVCache as a cache of their own (views: writes land in the full cache)."""

    def __init__(self, cache, r0: int, r1: int):
        self.k, self.v = cache.k[r0:r1], cache.v[r0:r1]

    def attend(self, q, k, v, input_pos, attn_fn):
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1); input_pos (B, T)
        self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed view: (B, T, n_kv_head, head_dim)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return attn_fn(q, self.k, self.v, input_pos)


class StaticBatchEngine:
    """Static batching, as servers batched before iteration-level scheduling: the baseline that
    continuous batching is measured against.

    When no batch is running, the first ``max_batch`` waiting requests (FIFO) form one; the batch is
    fixed until its longest output is done. Prefill runs the prompts padded on the left to the
    longest (each prompt at its own positions 0 .. T_i-1, its padding at positions T_i .. T_max-1:
    hidden from the prompt by the causal mask, overwritten by the row's own decode steps before any
    query can see them), ``prefill_rows`` rows per forward. Every decode step then runs all ``max_batch`` rows: rows of
    requests already finished, and empty rows of a short batch, are computed and thrown away.
    Requests that arrive meanwhile wait for the whole batch. A request's tokens are streamed as they
    come (its Output finishes at its own last token), but its row is busy until the batch ends.

    The KV cache is contiguous: ``max_batch`` x ``max_seq_len`` positions reserved up front
    (``kv_reserved_positions``), whatever the requests' lengths. On a GPU the decode step (all rows
    at their own positions, greedy) is captured once as a CUDA graph (``graph="auto"``), as
    engine.DecodeEngine's, so the comparison with the continuous engine is about scheduling and
    memory, not launch overhead. Greedy only (static batching with a sampler per row adds nothing
    to the comparison). ``prefill_rows``: rows per prefill forward (all padded to the batch's
    longest prompt; a few at a time keep the activations of a large batch of long prompts small).
    """

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, graph: str = "auto",
                 prefill_rows: int = 8):
        from .kv_cache import static_caches

        self.model = model
        self.max_seq_len = engine_max_seq_len(model, max_seq_len)
        self.max_batch = check_count(max_batch, "max_batch", minimum=1)
        self.prefill_rows = check_count(prefill_rows, "prefill_rows", minimum=1)
        if graph not in ("auto", "on", "off"):
            raise ValueError(f"graph must be 'auto', 'on' or 'off', got {graph!r}")
        if graph == "on" and model.device.type != "cuda":
            raise RuntimeError("graph='on' captures a CUDA graph and needs a GPU")
        self.use_graph = graph == "on" or (graph == "auto" and model.device.type == "cuda")
        self.caches = static_caches(model, self.max_batch, self.max_seq_len)
        dev = model.device
        self.tok = torch.zeros(self.max_batch, 1, dtype=torch.long, device=dev)  # each row's input token
        self.pos = torch.zeros(self.max_batch, 1, dtype=torch.long, device=dev)  # and its position
        self.graph = None
        self.waiting: collections.OrderedDict[str, _Running] = collections.OrderedDict()
        self.batch: list[_Running | None] = []  # the running batch's rows (None: finished or empty)
        self.steps = self.batches = self.row_steps = self.useful_row_steps = 0
        self.padded_prefill_tokens = self.prompt_tokens = 0

    @property
    def kv_reserved_positions(self) -> int:
        return self.max_batch * self.max_seq_len

    def add(self, request: Request) -> None:
        check_fits(request, self.max_seq_len)
        if request.id in self.waiting or any(r is not None and r.request.id == request.id for r in self.batch):
            raise ValueError(f"a request with id {request.id!r} is already in the engine")
        if max(request.prompt) >= self.model.cfg.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"request {request.id}: prompt token ids must lie in 0..{self.model.cfg.vocab_size - 1}")
        if request.temperature != 0:
            raise ValueError("StaticBatchEngine is greedy only (temperature=0)")
        self.waiting[request.id] = _Running(request, self.model.device)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.batch)

    def abort(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)
        self.batch = [None if r is not None and r.request.id == request_id else r for r in self.batch]

    def _decode_fn(self):
        logits = self.model(self.tok, self.pos, last_only=True)  # (B, 1, vocab)
        self.tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1).clamp_(max=self.max_seq_len - 1)  # rows done long ago keep computing somewhere valid

    def _capture(self):
        saved = self.tok.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._decode_fn()
        self.tok.copy_(saved[0])
        self.pos.copy_(saved[1])

    @torch.no_grad()
    def step(self) -> list[Output]:
        if not any(r is not None for r in self.batch):
            if not self.waiting:
                return []
            return self._prefill()
        with self.model.kv_caches_attached(self.caches):
            if self.use_graph and self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_fn()
        toks = self.tok[:, 0].tolist()
        self.steps += 1
        self.row_steps += self.max_batch
        self.useful_row_steps += sum(r is not None for r in self.batch)
        return self._emit(toks)

    def _prefill(self) -> list[Output]:
        n = min(self.max_batch, len(self.waiting))
        rows = [self.waiting.popitem(last=False)[1] for _ in range(n)]
        B, dev = self.max_batch, self.model.device
        T = max(len(r.request.prompt) for r in rows)
        # padded on the LEFT, so every row's last prompt token is column T-1 (one logit row each). Row i's
        # prompt sits at positions 0..T_i-1; its padding gets positions T_i..T-1, hidden from the prompt
        # by the causal mask and overwritten by the row's own decode steps before any query reads them.
        idx = torch.zeros(B, T, dtype=torch.long)  # (B, T); empty rows: one pad token at position 0 ...
        pos = torch.arange(T).repeat(B, 1)  # (B, T)
        lens = [len(r.request.prompt) for r in rows] + [1] * (B - n)
        for i, r in enumerate(rows):
            p, off = r.request.prompt, T - len(r.request.prompt)
            idx[i, off:] = torch.tensor(p)
            pos[i] = torch.cat([torch.arange(len(p), T), torch.arange(len(p))])
        for c in self.caches:
            c.reset()
        first = torch.empty(B, dtype=torch.long, device=dev)
        for r0 in range(0, B, self.prefill_rows):  # a few rows per forward: activations stay small
            r1 = min(B, r0 + self.prefill_rows)
            with self.model.kv_caches_attached([_RowsOf(c, r0, r1) for c in self.caches]):
                logits = self.model(idx[r0:r1].to(dev), pos[r0:r1].to(dev), last_only=True)  # (rows, 1, vocab)
            first[r0:r1] = logits[:, -1].argmax(-1)
        self.tok.copy_(first[:, None])
        self.pos.copy_(torch.tensor(lens, device=dev)[:, None])
        self.batch = rows + [None] * (B - n)
        self.batches += 1
        self.steps += 1
        self.padded_prefill_tokens += B * T
        self.prompt_tokens += sum(lens[:n])
        return self._emit(first.tolist())

    def _emit(self, toks: list[int]) -> list[Output]:
        now, outs = time.perf_counter(), []
        for i, r in enumerate(self.batch):
            if r is None:
                continue
            out = r.emit(toks[i], now)
            outs.append(out)
            if out.finished:
                self.batch[i] = None
        if not any(r is not None for r in self.batch):
            self.batch = []
        return outs

    def stats(self) -> dict:
        """Batches run, steps, and the share of decode rows that produced a token someone wanted."""
        return dict(batches=self.batches, steps=self.steps, row_steps=self.row_steps,
                    useful_row_steps=self.useful_row_steps, padded_prefill_tokens=self.padded_prefill_tokens,
                    prompt_tokens=self.prompt_tokens, kv_reserved_positions=self.kv_reserved_positions)


def run_to_completion(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    """Add every request, step until none is left: {request id: output token ids}."""
    for r in requests:
        engine.add(r)
    out: dict[str, list[int]] = {r.id: [] for r in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return out
