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
        ctx = model.cfg.max_seq_len
        self.max_seq_len = check_count(max_seq_len if max_seq_len is not None else min(ctx, 2048),
                                       "max_seq_len", minimum=2)
        if self.max_seq_len > ctx:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's context of {ctx}")
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


def run_to_completion(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    """Add every request, step until none is left: {request id: output token ids}."""
    for r in requests:
        engine.add(r)
    out: dict[str, list[int]] = {r.id: [] for r in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return out
