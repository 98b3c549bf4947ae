"""The serving front end (labutils.serve), the engine seam (labutils.serving) and the workload side
(labutils.trace), on the CPU with the embedded model and the official ``openai`` client."""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from labutils.decoder import Decoder  # noqa: E402
from labutils.generate import encode_prompt, greedy_cached  # noqa: E402
from labutils.kv_cache import static_caches  # noqa: E402
from labutils.serve import Detokenizer, EngineLoop, make_server  # noqa: E402
from labutils.serving import Engine, Output, Request, SequentialEngine  # noqa: E402
from labutils.trace import (Lengths, TraceSpec, make_trace, metrics, replay_engine,  # noqa: E402
                            replay_server)

CTX = 256  # the served context: short, so the static cache stays small


@pytest.fixture(scope="module")
def lab(embedded):
    hf, tok = embedded
    return Decoder.from_hf(hf), tok


@pytest.fixture(scope="module")
def server(lab):
    model, tok = lab
    with make_server(SequentialEngine(model, CTX), tok, "SmolLM2-135M-Instruct", aliases=("embedded",),
                     stop_ids={tok.eos_token_id}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def solo(lab, ids: list[int], n: int) -> list[int]:
    """labutils.generate's greedy continuation of ``ids`` alone, cut after the first EOS (kept)."""
    model, tok = lab
    out = greedy_cached(model, torch.tensor([ids]), n, static_caches(model, 1, CTX))[0, len(ids):].tolist()
    return out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def text_of(tok, ids):
    return tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True,
                      clean_up_tokenization_spaces=False)


def expect(lab, ids, n):
    """(text, finish_reason, completion tokens) that the server must return for prompt ids, greedy."""
    out = solo(lab, ids, n)
    return text_of(lab[1], out), ("stop" if out[-1] == lab[1].eos_token_id else "length"), len(out)


def collect(stream):
    """(text, finish_reason, usage) of a streamed reply, completion or chat."""
    text, reason, usage = "", None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            reason = c.finish_reason or reason
    return text, reason, usage


# ---- the HTTP API, through the official client -------------------------------------------------------
def test_completion_equals_greedy(lab, client):
    prompt, n = "The capital of France is", 8
    ids = lab[1](prompt).input_ids
    text, reason, n_out = expect(lab, ids, n)
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=n, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n_out)
    s = client.completions.create(model="embedded", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    got, got_reason, usage = collect(s)
    assert (got, got_reason) == (text, reason)
    assert usage.completion_tokens == n_out and usage.total_tokens == len(ids) + n_out


def test_chat_equals_greedy_and_stops_at_eos(lab, client):
    question, n = "What is the capital of France? Answer in one word.", 24
    ids = encode_prompt(lab[1], question)[0].tolist()  # the chat template, as labutils.generate renders it
    text, reason, n_out = expect(lab, ids, n)
    msgs = [{"role": "user", "content": question}]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=n, temperature=0)
    m = r.choices[0]
    assert (m.message.role, m.message.content, m.finish_reason) == ("assistant", text, reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n_out)
    got, got_reason, usage = collect(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert (got, got_reason, usage.completion_tokens) == (text, reason, n_out)
    assert reason == "stop", f"expected the model to end its short answer within {n} tokens: {text!r}"


def test_stream_is_openai_sse(server):
    """The raw stream: `data: {json}` events, one token each, the last with a finish_reason, then [DONE]."""
    body = {"model": "embedded", "prompt": [504, 3458, 282], "max_tokens": 3, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1


def test_concurrent_requests_each_equal_solo(lab, client):
    prompts = ["Once upon a time", "def fibonacci(n):", "The three primary colours are", "Water boils at"]
    n = 6
    results, errors = {}, []

    def ask(p):
        try:
            r = client.completions.create(model="embedded", prompt=p, max_tokens=n, temperature=0)
            results[p] = r.choices[0].text
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for p in prompts:
        assert results[p] == expect(lab, lab[1](p).input_ids, n)[0], p


@pytest.mark.parametrize("body, phrase", [
    ({"model": "gpt-4", "prompt": "hi", "max_tokens": 2}, "does not exist"),
    ({"model": "embedded", "prompt": "hi", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"model": "embedded", "prompt": "hi", "max_tokens": "3"}, "max_tokens must be an integer"),
    ({"model": "embedded", "prompt": [7] * (CTX - 2), "max_tokens": 3}, "maximum context length is 256"),
    ({"model": "embedded", "prompt": [10**9], "max_tokens": 2}, "token ids must lie in"),
    ({"model": "embedded", "prompt": "", "max_tokens": 2}, "prompt is empty"),
    ({"model": "embedded", "prompt": "hi", "max_tokens": 2, "n": 2}, "n=2 is not supported"),
    ({"model": "embedded", "prompt": "hi", "temperature": -1}, "temperature must be >= 0"),
    ({"model": "embedded", "messages": []}, "messages must be a non-empty list"),
])
def test_bad_requests_get_400(server, body, phrase):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert phrase in err["message"] and err["type"] == "invalid_request_error", err


def test_bad_json_and_client_errors(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=CTX)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = client.completions.create(model="embedded", prompt="Hello", max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1  # the server still serves after the errors


# ---- the engine seam ---------------------------------------------------------------------------------------
def test_sequential_engine_stop_sampling_timing(lab):
    model, tok = lab
    engine = SequentialEngine(model, 64)
    assert isinstance(engine, Engine)
    ids = tok("The capital of France is").input_ids
    greedy = solo(lab, ids, 4)
    stop = greedy[2]  # make the third greedy token a stop id: the output ends with it, reason "stop"
    outs = []
    engine.add(Request("a", ids, 4, stop_ids={stop}))
    engine.add(Request("b", ids, 5, temperature=1.0, seed=7))
    engine.add(Request("c", ids, 5, temperature=1.0, seed=7))
    engine.add(Request("d", ids, 5))
    engine.abort("d")
    while engine.has_unfinished():
        outs += engine.step()
    by = {}
    for o in outs:
        by.setdefault(o.request_id, []).append(o)
    assert set(by) == {"a", "b", "c"}
    assert [t for o in by["a"] for t in o.token_ids] == greedy[:3] and by["a"][-1].finish_reason == "stop"
    b, c = ([t for o in by[k] for t in o.token_ids] for k in "bc")
    assert b == c and len(b) == 5 and by["b"][-1].finish_reason == "length"  # same seed, same draws
    assert b[:4] != greedy  # and they are draws: with this seed they leave the greedy path
    for k in "abc":
        assert [o.finished for o in by[k]] == [False] * (len(by[k]) - 1) + [True]
        t = by[k][-1].timing
        assert t.arrival <= t.token_times[0] and t.token_times == sorted(t.token_times)
        assert t.finish == t.token_times[-1]
    assert by["b"][-1].timing.first_token > by["a"][-1].timing.finish  # b waited behind all of a (sequential)
    with pytest.raises(ValueError, match="maximum context length is 64"):
        engine.add(Request("e", ids, 64))


class _CountingEngine:
    """A fake engine: each step gives every request one token (0, 1, ...), slowly."""
    max_seq_len = 10**6

    def __init__(self):
        self.live, self.aborted = {}, []

    def add(self, r):
        self.live[r.id] = [r, 0]

    def step(self):
        time.sleep(0.01)
        outs = []
        for rid, s in list(self.live.items()):
            s[1] += 1
            done = s[1] >= s[0].max_tokens
            outs.append(Output(rid, [s[1] - 1], done, "length" if done else None))
            if done:
                del self.live[rid]
        return outs

    def has_unfinished(self):
        return bool(self.live)

    def abort(self, rid):
        self.aborted.append(rid)
        self.live.pop(rid, None)


def test_engine_loop_routes_outputs_and_frees_aborted():
    eng = _CountingEngine()
    loop = EngineLoop(eng)
    try:
        qa, qb = loop.submit(Request("a", [1], 3)), loop.submit(Request("b", [1], 1000))
        got = [qa.get(timeout=10) for _ in range(3)]
        assert [o.token_ids for o in got] == [[0], [1], [2]] and got[-1].finished
        first_b = qb.get(timeout=10)
        assert first_b.request_id == "b"
        loop.abort("b")  # as when a streaming client disconnects
        deadline = time.time() + 10
        while eng.has_unfinished() and time.time() < deadline:
            time.sleep(0.01)
        assert eng.aborted == ["b"] and not eng.has_unfinished()
    finally:
        loop.stop()


def test_client_disconnect_aborts_the_request(server):
    """A streaming client that goes away frees the engine: it stops long before max_tokens."""
    steps0 = server.loop.steps
    body = {"model": "embedded", "prompt": [504, 3458], "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        next(resp.iter_lines())  # one token came back; then the connection closes
    deadline = time.time() + 60
    while server.loop.engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.05)
    assert not server.loop.engine.has_unfinished()
    assert server.loop.steps - steps0 < 60, f"{server.loop.steps - steps0} steps: the abort came late or never"


def test_engine_refusal_is_a_400(lab):
    class Refusing(_CountingEngine):
        def add(self, r):
            raise ValueError("this engine takes no requests today")

    with make_server(Refusing(), lab[1], "m") as srv:
        for stream in (False, True):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "stream": stream}, timeout=30)
            assert r.status_code == 400 and "no requests today" in r.json()["error"]["message"]


def test_detokenizer_pieces_add_up(lab):
    tok = lab[1]
    ids = tok("naïve café — 東京 🙂 done.").input_ids
    d = Detokenizer(tok)
    pieces = [d.add([t]) for t in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert all("\ufffd" not in p for p in pieces)


# ---- the workload side ---------------------------------------------------------------------------------------
def test_trace_is_reproducible_and_follows_its_distributions(lab):
    spec = TraceSpec(n=4000, rate=5.0, prompt_len=Lengths("uniform", 10, 20),
                     output_len=Lengths("lognormal", 5, 400, median=64.0, sigma=0.5), prompts="random", seed=3)
    a, b = make_trace(spec, vocab_size=1000), make_trace(spec, vocab_size=1000)
    assert a == b
    c = make_trace(TraceSpec(**{**spec.__dict__, "seed": 4}), vocab_size=1000)
    assert [r.prompt for r in c] != [r.prompt for r in a]
    # changing one part leaves the others' random streams alone
    d = make_trace(TraceSpec(**{**spec.__dict__, "output_len": Lengths("fixed", 7, 7)}), vocab_size=1000)
    assert [(r.arrival, r.prompt) for r in d] == [(r.arrival, r.prompt) for r in a]
    assert {r.max_tokens for r in d} == {7}
    n = spec.n
    plen = np.array([len(r.prompt) for r in a])
    assert plen.min() == 10 and plen.max() == 20
    assert abs(plen.mean() - 15) < 5 * np.sqrt((11**2 - 1) / 12 / n)  # 5 standard errors of the mean
    gaps = np.diff([r.arrival for r in a])
    assert a[0].arrival == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 0.2) < 5 * 0.2 / np.sqrt(n - 1)  # Exp(mean 1/rate): sd = mean
    out = np.array([r.max_tokens for r in a])
    assert out.min() >= 5 and out.max() <= 400
    # the median of n lognormal draws: standard error sqrt(pi/2) * sigma / sqrt(n) on the log scale
    assert abs(np.log(np.median(out)) - np.log(64)) < 5 * np.sqrt(np.pi / 2) * 0.5 / np.sqrt(n) + 0.01
    assert all(0 <= t < 1000 for r in a[:50] for t in r.prompt)
    # text prompts: contiguous spans of the eval text's token ids, all at t = 0
    from labutils.data import load_text

    tok = lab[1]
    text = make_trace(TraceSpec(n=5, rate=None, prompt_len=Lengths("uniform", 30, 40),
                                output_len=Lengths("fixed", 3, 3), prompts="text", seed=1), tok)
    all_ids = tok(load_text("eval")).input_ids
    for r in text:
        assert r.arrival == 0 and 30 <= len(r.prompt) <= 40
        starts = [i for i in range(len(all_ids) - len(r.prompt) + 1) if all_ids[i] == r.prompt[0]]
        assert any(all_ids[i:i + len(r.prompt)] == r.prompt for i in starts)
    with pytest.raises(ValueError, match="rate must be > 0"):
        TraceSpec(rate=0)
    assert Lengths.parse("lognormal:64:0.5:8:256") == Lengths("lognormal", 8, 256, 64.0, 0.5)


def test_replay_against_live_server_reports_sane_metrics(lab, server):
    spec = TraceSpec(n=3, rate=20.0, prompt_len=Lengths("uniform", 8, 16), output_len=Lengths("uniform", 3, 5),
                     prompts="text", seed=0)
    trace = make_trace(spec, lab[1])
    records, duration = replay_server(server.url, trace)
    m = metrics(records, duration)
    assert m["completed"] == 3 and m["failed"] == 0, [r.error for r in records]
    assert [r.output_len for r in records] == [r.max_tokens for r in trace]  # EOS ignored: exact lengths
    assert m["output_tokens"] == sum(r.max_tokens for r in trace)
    assert m["output_tok_s"] == pytest.approx(m["output_tokens"] / duration)
    for r in records:
        assert 0 < r.ttft <= r.latency <= duration and r.start >= trace[r.index].arrival - 1e-3
        assert len(r.itl) == r.output_len - 1 and r.tpot > 0
    assert 0 < m["ttft_p50_ms"] <= m["ttft_p99_ms"] and 0 < m["tpot_p50_ms"] <= m["tpot_p99_ms"]
    assert m["latency_p99_ms"] <= duration * 1e3


def test_replay_from_inside_a_running_event_loop(lab, server):
    """As in a Jupyter kernel: replay_server called while an event loop runs (in a worker thread)."""
    import asyncio

    trace = make_trace(TraceSpec(n=2, rate=None, prompt_len=Lengths("fixed", 8, 8), output_len=Lengths("fixed", 2, 2),
                                 prompts="random", seed=0), vocab_size=lab[0].cfg.vocab_size)

    async def inside():
        return replay_server(server.url, trace)

    records, duration = asyncio.run(inside())
    assert [r.output_len for r in records] == [2, 2] and all(r.error is None for r in records)


def test_replay_in_process_engine(lab):
    model, tok = lab
    spec = TraceSpec(n=2, rate=None, prompt_len=Lengths("fixed", 8, 8), output_len=Lengths("fixed", 3, 3),
                     prompts="random", seed=0)
    trace = make_trace(spec, vocab_size=model.cfg.vocab_size)
    records, duration = replay_engine(SequentialEngine(model, 32), trace)
    assert [r.output_len for r in records] == [3, 3]
    first, second = sorted(records, key=lambda r: r.ttft)
    assert second.ttft >= first.latency  # one at a time: the second waited for all of the first
    m = metrics(records, duration)
    assert m["completed"] == 2 and m["output_tokens"] == 6


def test_cli_serves_and_replays(tmp_path):
    """`python -m labutils.serve` in a subprocess, then `python -m labutils.trace replay` against it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "labutils.serve", "--port", str(port), "--max-model-len", "128",
                             "--dtype", "float32"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        deadline, seen = time.time() + 120, []
        while time.time() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            if "serving SmolLM2-135M-Instruct" in seen[-1]:
                break
        else:
            pytest.fail("the server did not start: " + "".join(seen))
        out = tmp_path / "m.json"
        r = subprocess.run([sys.executable, "-m", "labutils.trace", "replay", "--url", f"http://127.0.0.1:{port}",
                            "--n", "2", "--prompts", "random", "--vocab-size", "1000", "--prompt-len", "4",
                            "--output-len", "2", "--json", str(out)], cwd=root, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "TTFT" in r.stdout and "4 output tokens" in r.stdout, r.stdout
        m = json.loads(out.read_text())["metrics"]
        assert m["completed"] == 2 and m["output_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
