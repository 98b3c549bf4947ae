"""Reproducible serving workloads and their metrics (notebook 06).

A **trace** is n requests, each an arrival time, a prompt (token ids) and a number of tokens to
generate, drawn from a stated ``TraceSpec``:

- arrivals: a Poisson process at ``rate`` requests/s (gaps Exp(mean 1/rate), the first at t = 0), or
  all at t = 0 (``rate=None``: the offline, maximum-throughput case);
- prompt and output lengths: ``Lengths`` -- uniform integers in [lo, hi], or lognormal with a given
  median and sigma (of the log), rounded and clipped to [lo, hi], or fixed;
- prompts: spans of token ids cut at random offsets from the book's eval text (data/, tokenized
  with the served model's tokenizer), or random token ids (for random-weight shape twins);
- greedy, and every request generates exactly its output length (EOS ignored, as vLLM's benchmarks do).

Each part has its own random stream spawned from ``seed``, so changing the output lengths leaves
arrivals and prompts as they were. The same spec and seed always give the same trace.

Replays: ``replay_server`` sends the trace to an OpenAI-compatible server (this package's or vLLM's)
with httpx, streaming, and stamps each chunk as it arrives; ``replay_engine`` drives an engine
(labutils.serving) in-process (``replay_all_at_once``: every request at t = 0); ``replay_hf_generate``
runs the trace through transformers' ``generate`` in left-padded batches (the baseline without a
scheduler). All return ``RequestRecord``s, and ``metrics`` turns them into the chapter's numbers:
output tok/s, TTFT, TPOT (time per output token after the first, per request) and request latency
at p50/p99; ``serving_metrics`` adds an engine's KV utilization over the run and its counters.

    python -m labutils.trace replay --url http://127.0.0.1:8000 --rate 4 --n 32 [--prompt-len 32:256]
                                    [--output-len lognormal:64:0.5:8:256] [--prompts text|random] [--seed 0]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

KINDS = ("uniform", "lognormal", "fixed")


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: ``uniform`` integers in [lo, hi]; ``lognormal``: exp(N(log median,
    sigma^2)) rounded, clipped to [lo, hi]; ``fixed``: always lo (= hi)."""
    kind: str
    lo: int
    hi: int
    median: float | None = None
    sigma: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not (isinstance(self.lo, int) and isinstance(self.hi, int) and 1 <= self.lo <= self.hi):
            raise ValueError(f"need integers 1 <= lo <= hi, got lo={self.lo!r}, hi={self.hi!r}")
        if self.kind == "fixed" and self.lo != self.hi:
            raise ValueError(f"a fixed length has lo == hi, got {self.lo}, {self.hi}")
        if self.kind == "lognormal" and not (self.median and self.median > 0 and self.sigma is not None
                                             and self.sigma >= 0):
            raise ValueError(f"lognormal needs median > 0 and sigma >= 0, got {self.median}, {self.sigma}")

    @classmethod
    def parse(cls, text: str) -> "Lengths":
        """'128' (fixed), '64:1024' (uniform), 'lognormal:MEDIAN:SIGMA:LO:HI'."""
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]), int(parts[0]))
            if len(parts) == 2:
                return cls("uniform", int(parts[0]), int(parts[1]))
            if len(parts) == 5 and parts[0] == "lognormal":
                return cls("lognormal", int(parts[3]), int(parts[4]), float(parts[1]), float(parts[2]))
        except ValueError as e:
            raise ValueError(f"cannot read lengths {text!r}: {e}") from None
        raise ValueError(f"lengths must be N, LO:HI or lognormal:MEDIAN:SIGMA:LO:HI, got {text!r}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.lo, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)
        x = np.rint(np.exp(rng.normal(math.log(self.median), self.sigma, size=n)))
        return np.clip(x, self.lo, self.hi).astype(np.int64)

    def __str__(self):
        if self.kind == "fixed":
            return str(self.lo)
        if self.kind == "uniform":
            return f"uniform[{self.lo}, {self.hi}]"
        return f"lognormal(median {self.median:g}, sigma {self.sigma:g}) in [{self.lo}, {self.hi}]"


@dataclass(frozen=True)
class TraceSpec:
    n: int = 32
    rate: float | None = None  # requests/s (Poisson); None: all at t = 0
    prompt_len: Lengths = Lengths("uniform", 64, 1024)
    output_len: Lengths = Lengths("uniform", 32, 512)
    prompts: str = "text"  # "text": spans of data/ text; "random": random token ids
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.rate is not None and not (self.rate > 0):
            raise ValueError(f"rate must be > 0 requests/s (or None: all at t = 0), got {self.rate!r}")
        if self.prompts not in ("text", "random"):
            raise ValueError(f"prompts must be 'text' or 'random', got {self.prompts!r}")

    def describe(self) -> str:
        arr = "all at t=0" if self.rate is None else f"Poisson at {self.rate:g} req/s"
        return (f"{self.n} requests, {arr}; prompts {self.prompt_len} tokens ({self.prompts}); outputs "
                f"{self.output_len} tokens, greedy, EOS ignored; seed {self.seed}")


@dataclass
class TraceRequest:
    index: int
    arrival: float  # seconds after the start of the replay
    prompt: list[int]
    max_tokens: int


def _text_ids(tokenizer) -> list[int]:
    from .data import load_text

    return list(tokenizer(load_text("eval")).input_ids)


def make_trace(spec: TraceSpec, tokenizer=None, vocab_size: int | None = None) -> list[TraceRequest]:
    """The requests of ``spec``: text prompts need the served model's ``tokenizer``; random ones a
    ``vocab_size`` (or a tokenizer, whose length is used)."""
    arr_rng, plen_rng, olen_rng, prompt_rng = (np.random.default_rng(s)
                                               for s in np.random.SeedSequence(spec.seed).spawn(4))
    n = spec.n
    if spec.rate is None:
        arrivals = np.zeros(n)
    else:
        gaps = arr_rng.exponential(1.0 / spec.rate, size=n)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    plens = spec.prompt_len.sample(plen_rng, n)
    olens = spec.output_len.sample(olen_rng, n)
    if spec.prompts == "text":
        if tokenizer is None:
            raise ValueError("text prompts are token ids of the served model: pass its tokenizer")
        ids = _text_ids(tokenizer)
        if spec.prompt_len.hi > len(ids):
            raise ValueError(f"prompts up to {spec.prompt_len.hi} tokens, but the eval text holds {len(ids)}")
        starts = prompt_rng.integers(0, len(ids) - plens + 1)  # one offset per request, in [0, len - L]
        prompts = [ids[s:s + L] for s, L in zip(starts.tolist(), plens.tolist())]
    else:
        vocab = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        if not vocab:
            raise ValueError("random prompts need vocab_size (or a tokenizer)")
        prompts = [prompt_rng.integers(0, vocab, size=L).tolist() for L in plens.tolist()]
    return [TraceRequest(i, float(a), p, int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, olens))]


# ---- records and metrics --------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One replayed request, times in seconds from the replay's start."""
    index: int
    prompt_len: int
    output_len: int  # tokens generated
    start: float  # when it was sent (server) or added (engine)
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between successive streamed tokens
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def metrics(records: list[RequestRecord], duration_s: float) -> dict:
    """The chapter's numbers from a replay: throughput over the whole run, latencies at p50 / p99 (ms)."""
    ok = [r for r in records if r.error is None and r.latency is not None]
    out_tokens = sum(r.output_len for r in ok)
    ttft = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    tpot = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    lat = [r.latency * 1e3 for r in ok]
    itl = [g * 1e3 for r in ok for g in r.itl]
    return {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
            "duration_s": duration_s, "output_tokens": out_tokens,
            "input_tokens": sum(r.prompt_len for r in ok),
            "output_tok_s": out_tokens / duration_s if duration_s > 0 else float("nan"),
            "request_s": len(ok) / duration_s if duration_s > 0 else float("nan"),
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "tpot_p50_ms": _pct(tpot, 50), "tpot_p99_ms": _pct(tpot, 99),
            "itl_p50_ms": _pct(itl, 50), "itl_p99_ms": _pct(itl, 99),
            "latency_p50_ms": _pct(lat, 50), "latency_p99_ms": _pct(lat, 99)}


def format_metrics(m: dict) -> str:
    lines = [f"requests {m['completed']}/{m['requests']} completed in {m['duration_s']:.2f} s "
             f"({m['request_s']:.2f} req/s); {m['output_tokens']} output tokens -> {m['output_tok_s']:.1f} tok/s"]
    for k in ("ttft", "tpot", "itl", "latency"):
        lines.append(f"{k.upper():8s} p50 {m[f'{k}_p50_ms']:9.1f} ms   p99 {m[f'{k}_p99_ms']:9.1f} ms")
    return "\n".join(lines)


# ---- replay against a server --------------------------------------------------------------------------
async def _one(client, url, model, tr: TraceRequest, t0: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, t0 + tr.arrival - time.perf_counter()))
    start = time.perf_counter()
    rec = RequestRecord(tr.index, len(tr.prompt), 0, start - t0)
    body = {"model": model, "prompt": tr.prompt, "max_tokens": tr.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks, usage = [], None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"])
                    return rec
                if obj.get("choices"):
                    chunks.append(time.perf_counter())
                if obj.get("usage"):
                    usage = obj["usage"]
    except Exception as e:  # noqa: BLE001  (a failed request is a record, not a crashed replay)
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    end = time.perf_counter()
    if not chunks:
        rec.error = "no token came back"
        return rec
    rec.output_len = usage["completion_tokens"] if usage else len(chunks)
    rec.ttft, rec.latency = chunks[0] - start, end - start
    rec.itl = np.diff(chunks).tolist()
    return rec


async def replay_server_async(url: str, trace: list[TraceRequest], model: str | None = None,
                              timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    import httpx

    url = url.rstrip("/").removesuffix("/v1")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        if model is None:
            model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        records = await asyncio.gather(*(_one(client, url, model, tr, t0) for tr in trace))
        return list(records), time.perf_counter() - t0


def replay_server(url: str, trace: list[TraceRequest], model: str | None = None,
                  timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Send the trace to an OpenAI-compatible server at ``url`` (streamed completions, greedy, EOS
    ignored), each request at its arrival time: (records, duration in s). Inside a running event
    loop (a Jupyter kernel) the replay runs in a worker thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(replay_server_async(url, trace, model, timeout_s))
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, replay_server_async(url, trace, model, timeout_s)).result()


# ---- replay against an engine, in process ----------------------------------------------------------------
def replay_engine(engine, trace: list[TraceRequest]) -> tuple[list[RequestRecord], float]:
    """Drive ``engine`` (labutils.serving) with the trace in real time: each request is added once its
    arrival time has passed (its TTFT counts the wait from then), the engine stepped while anything is
    unfinished. Greedy, EOS ignored. (records, duration in s)."""
    from .serving import Request

    pending = sorted(trace, key=lambda r: (r.arrival, r.index))
    records, timings = {}, {}
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter()
        while i < len(pending) and t0 + pending[i].arrival <= now:
            tr = pending[i]
            engine.add(Request(str(tr.index), tr.prompt, tr.max_tokens, arrival=t0 + tr.arrival))
            records[tr.index] = RequestRecord(tr.index, len(tr.prompt), 0, tr.arrival)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, t0 + pending[i].arrival - time.perf_counter()))
            continue
        for o in engine.step():
            if o.finished:
                timings[int(o.request_id)] = o.timing
    duration = time.perf_counter() - t0
    for idx, t in timings.items():
        rec = records[idx]
        rec.output_len, rec.ttft, rec.latency = len(t.token_times), t.ttft, t.latency
        rec.itl = np.diff(t.token_times).tolist()
    return [records[k] for k in sorted(records)], duration


def replay_hf_generate(hf_model, trace: list[TraceRequest], batch_size: int = 8, pad_id: int = 0,
                       tokens_out: dict | None = None) -> tuple[list[RequestRecord], float]:
    """The trace through transformers' ``generate``, as a server without a scheduler would batch it:
    requests in arrival order, ``batch_size`` at a time, prompts padded on the LEFT (so every row's
    last prompt token is the last column) with an attention mask, greedy, every batch generating its
    longest output (``min_new_tokens`` = ``max_new_tokens``, so EOS never ends a row early, as
    ``ignore_eos``). A batch starts once its last request has arrived and the previous batch is done.
    Each generation step is stamped by a logits processor, called once per step when that step's
    logits are computed (on a GPU it synchronizes first; generate synchronizes every step anyway to
    test its stopping criteria), so a request's TTFT and token times count only its own
    ``max_tokens`` tokens; the rest of its row is wasted work. ``tokens_out``: a dict that receives
    {index: the request's max_tokens generated ids}. (records, duration)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    device = next(hf_model.parameters()).device
    pending = sorted(trace, key=lambda r: (r.arrival, r.index))
    records = []
    t0 = time.perf_counter()
    for i in range(0, len(pending), batch_size):
        group = pending[i:i + batch_size]
        wait = t0 + group[-1].arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        T = max(len(r.prompt) for r in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        for j, r in enumerate(group):
            ids[j, T - len(r.prompt):] = torch.tensor(r.prompt)
            mask[j, T - len(r.prompt):] = 1
        n = max(r.max_tokens for r in group)
        stamp = _Stamp()
        with torch.no_grad():
            gen = hf_model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([stamp]))
        if tokens_out is not None:
            new = gen[:, T:].tolist()
            for j, r in enumerate(group):
                tokens_out[r.index] = new[j][:r.max_tokens]
        for r in group:
            arrival = t0 + r.arrival
            tt = stamp.times[:r.max_tokens]  # stamp k: the step whose logits give token k of every row
            records.append(RequestRecord(r.index, len(r.prompt), r.max_tokens, r.arrival, ttft=tt[0] - arrival,
                                         latency=tt[-1] - arrival, itl=np.diff(tt).tolist()))
    return sorted(records, key=lambda rec: rec.index), time.perf_counter() - t0


def replay_all_at_once(engine, trace: list[TraceRequest]) -> tuple[list[RequestRecord], float]:
    """``replay_engine`` with every request arriving at t = 0 (the offline throughput case), whatever
    the trace's arrival times."""
    return replay_engine(engine, [TraceRequest(r.index, 0.0, r.prompt, r.max_tokens) for r in trace])


def serving_metrics(records: list[RequestRecord], duration_s: float, engine=None) -> dict:
    """``metrics`` plus, for an engine that reports them, its KV utilization averaged over steps
    (``kv_summary``: paged, and contiguous reservations of max_seq_len or of prompt + max_tokens per
    running request) and its counters (``stats``)."""
    m = metrics(records, duration_s)
    if engine is not None and hasattr(engine, "kv_summary"):
        k = engine.kv_summary()
        m.update(kv_utilization=k["paged"], kv_utilization_contiguous=k["contiguous_max_len"],
                 kv_utilization_contiguous_request=k["contiguous_request_len"], kv_samples=k["samples"])
    if engine is not None and hasattr(engine, "stats"):
        m["engine_stats"] = engine.stats()
    return m


# ---- command line ------------------------------------------------------------------------------------------
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from . import models

    if name in models._EMBEDDED_ALIASES:
        return AutoTokenizer.from_pretrained(models._embedded_cache())
    return AutoTokenizer.from_pretrained(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m labutils.trace", description="Replay a reproducible trace.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="replay a trace against an OpenAI-compatible server and print metrics")
    r.add_argument("--url", default="http://127.0.0.1:8000")
    r.add_argument("--rate", type=float, default=None, help="requests/s, Poisson (default: all at t = 0)")
    r.add_argument("--n", type=int, default=32)
    r.add_argument("--prompt-len", default="32:256", help="N | LO:HI | lognormal:MEDIAN:SIGMA:LO:HI")
    r.add_argument("--output-len", default="16:128", help="N | LO:HI | lognormal:MEDIAN:SIGMA:LO:HI")
    r.add_argument("--prompts", choices=["text", "random"], default="text")
    r.add_argument("--tokenizer", default="embedded", help="the served model's tokenizer (text prompts)")
    r.add_argument("--vocab-size", type=int, default=None, help="random prompts: ids in 0..V-1")
    r.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", default=None, help="also write the metrics and the spec to this file")
    a = p.parse_args(argv)
    spec = TraceSpec(a.n, a.rate, Lengths.parse(a.prompt_len), Lengths.parse(a.output_len), a.prompts, a.seed)
    tok = _tokenizer(a.tokenizer) if a.prompts == "text" or a.vocab_size is None else None
    trace = make_trace(spec, tok, a.vocab_size)
    print(f"trace: {spec.describe()}", flush=True)
    records, duration = replay_server(a.url, trace, a.model)
    m = metrics(records, duration)
    print(format_metrics(m))
    for rec in records:
        if rec.error:
            print(f"request {rec.index} failed: {rec.error}", file=sys.stderr)
            break
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"spec": {**asdict(spec), "description": spec.describe()}, "url": a.url, "metrics": m}, f,
                      indent=2)
    return 0 if m["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
