"""The continuous-batching engine (labutils.scheduler, notebook 06): every request's greedy output equals
the same request run alone (SequentialEngine), with requests arriving at different steps, preemption
by recompute in a pool too small for all of them, chunked prefill of a prompt longer than a step's
token budget, prefix caching of a shared prompt head; stop ids, seeded sampling and timings as
SequentialEngine's; abort frees blocks; the stats; and labutils.serve serving it to concurrent
clients (the official openai client). Tiny random model and the embedded model (fp32), Triton's
interpreter."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import prompts_of, tiny_hf_model
from labutils.decoder import Decoder
from labutils.scheduler import ContinuousEngine
from labutils.serving import Engine, Request, SequentialEngine, run_to_completion


@pytest.fixture(scope="module")
def tiny():
    return Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=1))


def alone(model, requests, ctx=128):
    """Each request run by itself through the batch-1 baseline: {id: tokens}."""
    return {r.id: run_to_completion(SequentialEngine(model, ctx), [r])[r.id] for r in requests}


def drive(engine, arrivals, watch=None):
    """Add each request at its step [(step, Request)], step until all finish; check the Output stream
    (one token per Output, only the last finished). Returns ({id: tokens}, {id: last Output})."""
    tokens, last, step, pending = {}, {}, 0, sorted(arrivals, key=lambda a: a[0])
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            r = pending.pop(0)[1]
            engine.add(r)
            tokens[r.id] = []
        for o in engine.step():
            assert o.request_id not in last, f"{o.request_id}: an Output after its finished one"
            assert len(o.token_ids) == 1
            tokens[o.request_id] += o.token_ids
            if o.finished:
                last[o.request_id] = o
        if watch:
            watch(engine)
        step += 1
        assert step < 10_000, "the engine made no progress"
    return tokens, last


def check_stats_sane(engine):
    s = engine.stats()
    assert s["in_use"] + s["cached"] + s["free"] == s["num_blocks"]
    assert 0 <= s["tokens_stored"] <= s["slots_allocated"] == s["in_use"] * s["block_size"]
    assert 0 < s["kv_utilization"] <= 1
    if s["in_use"]:  # only a sequence's last block is partly empty
        assert s["slots_allocated"] - s["tokens_stored"] < s["running"] * s["block_size"]


def assert_all_freed(engine):
    s = engine.stats()
    assert (s["in_use"], s["running"], s["waiting"]) == (0, 0, 0), f"blocks or sequences leaked: {s}"
    assert s["cached"] + s["free"] == s["num_blocks"]


# ---- correctness: each request as if alone ------------------------------------------------------------
@pytest.mark.parametrize("prefill", ["torch", "triton"])
def test_arrivals_preemption_and_chunked_prefill_equal_alone(tiny, prefill):
    """Six requests arriving at steps 0..9 (prompts 5..60 tokens, 6..20 new tokens) in a pool of 12
    blocks of 8 (96 positions for ~330 needed: preemption must happen), a budget of 24 tokens per step
    (the 60- and 41-token prompts are prefilled in chunks, beside the others' decodes); both prefill paths."""
    lens, outs, at = (5, 60, 21, 41, 12, 30), (20, 8, 14, 6, 16, 10), (0, 0, 1, 3, 3, 9)
    reqs = [Request(f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts_of(lens, tiny.cfg.vocab_size, 0), outs))]
    engine = ContinuousEngine(tiny, num_blocks=12, block_size=8, max_batch=4, max_num_batched_tokens=24,
                              max_seq_len=128, prefill=prefill)
    assert isinstance(engine, Engine)
    got, last = drive(engine, list(zip(at, reqs)), check_stats_sane)
    ref = alone(tiny, reqs)
    for r in reqs:
        assert got[r.id] == ref[r.id], f"{r.id} ({len(r.prompt)} prompt tokens): {got[r.id]} vs alone {ref[r.id]}"
        assert last[r.id].finish_reason == "length" and len(got[r.id]) == r.max_tokens
    s = engine.stats()
    assert s["preemptions"] > 0, "the pool was meant to be too small: no preemption happened"
    assert s["max_batch_seen"] >= 3 and s["mixed_steps"] > 0, f"no batching or no mixed prefill/decode step: {s}"
    assert s["decode_tokens"] <= sum(outs) - len(outs)  # the first token of each comes from a prefill
    assert s["prefill_tokens"] >= sum(lens) - s["prefix_cached_tokens"]
    assert_all_freed(engine)


def test_shared_prefix_hits_and_unchanged_outputs(tiny):
    """Four requests share a 32-token head (4 blocks of 8); the first computes it, the later ones
    (arriving once it is cached) reuse it: prefix hits, fewer prefill tokens, the same outputs."""
    vocab = tiny.cfg.vocab_size
    head, *tails = prompts_of((32, 3, 9, 17, 1), vocab, seed=5)
    reqs = [Request(f"p{i}", head + t, 8) for i, t in enumerate(tails)]
    arrivals = [(0, reqs[0]), (2, reqs[1]), (2, reqs[2]), (5, reqs[3])]
    ref = alone(tiny, reqs)
    results = {}
    for caching in (True, False):
        engine = ContinuousEngine(tiny, num_blocks=40, block_size=8, max_batch=8, max_num_batched_tokens=64,
                                  prefix_caching=caching, max_seq_len=128)
        got, _ = drive(engine, arrivals)
        for r in reqs:
            assert got[r.id] == ref[r.id], f"prefix caching {caching}, {r.id}: {got[r.id]} vs alone {ref[r.id]}"
        results[caching] = engine.stats()
        assert_all_freed(engine)
    on, off = results[True], results[False]
    assert on["prefix_hit_blocks"] >= 3 * 4 and on["prefix_cached_tokens"] >= 3 * 32, on
    assert off["prefix_hit_blocks"] == 0 and off["prefix_cached_tokens"] == 0
    assert on["prefill_tokens"] == off["prefill_tokens"] - on["prefix_cached_tokens"]


def test_without_chunked_prefill(tiny):
    """chunked_prefill=False: a prompt waits until all of it fits a step's budget; the outputs are the
    same; a request that could never fit the budget is refused at add()."""
    reqs = [Request(f"c{i}", p, 6) for i, p in enumerate(prompts_of((20, 7, 25), tiny.cfg.vocab_size, seed=7))]
    engine = ContinuousEngine(tiny, num_blocks=16, block_size=8, max_num_batched_tokens=32, chunked_prefill=False,
                              max_seq_len=128)
    got, _ = drive(engine, [(0, r) for r in reqs])
    assert got == alone(tiny, reqs)
    assert engine.stats()["steps"] >= 6 + 1, "20 + 7 + 25 prompt tokens cannot share one 32-token step"
    with pytest.raises(ValueError, match="chunked prefill"):
        engine.add(Request("long", [1] * 30, 4))
    with pytest.raises(ValueError, match="larger pool"):
        ContinuousEngine(tiny, num_blocks=2, block_size=8, max_seq_len=128).add(Request("big", [1] * 10, 8))


def test_stop_ids_sampling_and_timing(tiny):
    """A stop id ends a request (kept as its last token, reason "stop"); seeded sampling draws what
    SequentialEngine draws for the same request; timings are ordered; duplicate ids refused."""
    p = prompts_of((11,), tiny.cfg.vocab_size, seed=9)[0]
    greedy = alone(tiny, [Request("g", p, 6)])["g"]
    stop = greedy[3]
    reqs = [Request("stop", p, 6, stop_ids={stop}), Request("s1", p, 6, temperature=1.0, top_p=0.9, seed=3),
            Request("s2", p, 6, temperature=1.0, top_p=0.9, seed=3), Request("s3", p, 6, temperature=1.0, seed=4)]
    engine = ContinuousEngine(tiny, num_blocks=16, block_size=8, max_seq_len=128)
    got, last = drive(engine, [(0, r) for r in reqs])
    n_stop = greedy.index(stop) + 1
    assert got["stop"] == greedy[:n_stop] and last["stop"].finish_reason == "stop"
    assert got["s1"] == got["s2"] == alone(tiny, [reqs[1]])["s1"], "same seed, same draws as alone"
    assert got["s3"] == alone(tiny, [reqs[3]])["s3"] and got["s1"] != greedy
    assert engine.stats()["max_batch_seen"] == 4
    for r in reqs:
        t = last[r.id].timing
        assert t.arrival <= t.token_times[0] and t.token_times == sorted(t.token_times)
        assert t.finish == t.token_times[-1] and len(t.token_times) == len(got[r.id])
    engine.add(Request("dup", p, 2))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add(Request("dup", p, 2))
    engine.abort("dup")
    assert not engine.has_unfinished()


def test_abort_frees_blocks(tiny):
    """Abort a running request (its blocks come back at once) and a waiting one (never scheduled);
    neither yields another Output; the others finish as if alone."""
    ps = prompts_of((20, 20, 20), tiny.cfg.vocab_size, seed=11)
    reqs = [Request(f"a{i}", p, 10) for i, p in enumerate(ps)]
    engine = ContinuousEngine(tiny, num_blocks=16, block_size=8, max_batch=2, max_seq_len=128)
    for r in reqs:
        engine.add(r)
    outs = engine.step() + engine.step()  # a0, a1 running (3 blocks each), a2 waiting (max_batch 2)
    assert engine.stats()["in_use"] == 6 and engine.stats()["waiting"] == 1
    engine.abort("a1")
    engine.abort("a2")
    engine.abort("nobody")  # unknown ids are ignored
    s = engine.stats()
    assert (s["in_use"], s["running"], s["waiting"]) == (3, 1, 0)
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs[4:]} == {"a0"}
    assert [t for o in outs if o.request_id == "a0" for t in o.token_ids] == alone(tiny, reqs[:1])["a0"]
    assert_all_freed(engine)


# ---- real weights ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(embedded):
    hf, tok = embedded
    return Decoder.from_hf(hf), tok


def test_embedded_equals_alone_with_everything_on(lab):
    """SmolLM2-135M fp32: three prompts sharing an instruction head (prefix hits), one arriving late,
    prompts longer than the 16-token budget of a step (chunked prefill), a pool of 7 blocks of 8 for
    about 10 blocks of demand (preemption)."""
    model, tok = lab
    head = "Answer in one short sentence, plainly and truthfully. Question: "
    ids = [tok(head + q).input_ids for q in ("What is the capital of France?", "Why is the sky blue?",
                                             "Who wrote Hamlet?")]
    assert min(map(len, ids)) > 16
    reqs = [Request(f"e{i}", p, 6) for i, p in enumerate(ids)]
    engine = ContinuousEngine(model, num_blocks=7, block_size=8, max_batch=3, max_num_batched_tokens=16,
                              max_seq_len=64)
    got, _ = drive(engine, [(0, reqs[0]), (0, reqs[1]), (3, reqs[2])], check_stats_sane)
    ref = alone(model, reqs, 64)
    for r in reqs:
        assert got[r.id] == ref[r.id], f"{r.id}: {tok.decode(got[r.id])!r} vs alone {tok.decode(ref[r.id])!r}"
    s = engine.stats()
    assert s["preemptions"] > 0 and s["prefix_hit_blocks"] > 0 and s["mixed_steps"] > 0, s
    assert_all_freed(engine)


def test_server_over_continuous_engine(lab):
    """labutils.serve over a ContinuousEngine: concurrent completions (the official openai client), one
    streamed; each equal to the prompt's greedy continuation alone."""
    openai = pytest.importorskip("openai")
    from labutils.serve import make_server

    model, tok = lab
    prompts, n = ["Once upon a time", "def fibonacci(n):", "The three primary colours are", "Water boils at"], 5
    ref = {p: alone(model, [Request("x", tok(p).input_ids, n, stop_ids={tok.eos_token_id})], 64)["x"] for p in prompts}
    engine = ContinuousEngine(model, num_blocks=24, block_size=16, max_seq_len=64)
    results, errors = {}, []
    with make_server(engine, tok, "SmolLM2-135M-Instruct", aliases=("embedded",),
                     stop_ids={tok.eos_token_id}) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(p, stream):
            try:
                r = client.completions.create(model="embedded", prompt=p, max_tokens=n, temperature=0, stream=stream)
                results[p] = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(p, i == 0)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    for p in prompts:
        want = tok.decode([t for t in ref[p] if t != tok.eos_token_id], skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)
        assert results[p] == want, p
    assert_all_freed(engine)


# ---- decode-only steps padded to buckets (the CUDA-graph path, run eagerly on the CPU) ------------------
def test_decode_buckets():
    from labutils.scheduler import bucket_for, decode_buckets

    assert decode_buckets(1) == [1]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert decode_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert [bucket_for(n, decode_buckets(48)) for n in (1, 3, 5, 17, 33, 48)] == [1, 4, 8, 32, 48, 48]
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(49, decode_buckets(48))


def test_bucketed_decode_equals_alone_under_preemption(tiny):
    """graphs='bucketed': decode-only steps padded to 1, 2, 4, 8 rows over fixed buffers (the padding
    rows on the reserved padding block). Five requests, arrivals spread, preemption: every output
    equals the request alone and the eager engine's; the padding block is left out of the stats."""
    lens, outs, at = (5, 30, 21, 11, 9), (20, 12, 14, 9, 16), (0, 0, 1, 6, 9)
    reqs = [Request(f"b{i}", p, n) for i, (p, n) in enumerate(zip(prompts_of(lens, tiny.cfg.vocab_size, 3), outs))]
    engine = ContinuousEngine(tiny, num_blocks=13, block_size=8, max_batch=5, max_num_batched_tokens=24,
                              max_seq_len=64, graphs="bucketed")
    assert engine.buckets == [1, 2, 4, 5] and engine.num_usable_blocks == 12
    seen = set()

    def watch(e):
        check_stats_sane(e)
        assert e.pool.ref_count[e._pad_block] == 1, "the padding block was freed or shared"
        seen.add(len(e.running))

    got, _ = drive(engine, list(zip(at, reqs)), watch)
    ref = alone(tiny, reqs)
    plain = ContinuousEngine(tiny, num_blocks=12, block_size=8, max_batch=5, max_num_batched_tokens=24,
                             max_seq_len=64, graphs="off")
    got_plain, _ = drive(plain, list(zip(at, reqs)))
    for r in reqs:
        assert got[r.id] == ref[r.id] == got_plain[r.id], f"{r.id}: bucketed {got[r.id]}, alone {ref[r.id]}"
    s = engine.stats()
    assert s["graph_steps"] > 0 and s["preemptions"] > 0, s
    assert s["num_blocks"] == 12 and s["graphs"] == "bucketed"
    assert {1, 3} & seen, "no step ran with a batch that needed padding"
    assert_all_freed(engine)
    assert engine.capture() == 0  # graphs are captured only with graphs="graph" (a GPU)
    with pytest.raises(RuntimeError, match="GPU"):
        ContinuousEngine(tiny, num_blocks=8, block_size=8, graphs="graph")
    with pytest.raises(ValueError, match="graphs must be one of"):
        ContinuousEngine(tiny, num_blocks=8, block_size=8, graphs="always")


def test_kv_summary_counts_positions_in_allocated_blocks(tiny):
    """One request, 13 prompt tokens + 4 new, blocks of 8, sampled every step: the four forwards hold
    13, 14, 15, 16 positions in 2 blocks (16 slots); a max_seq_len=64 reservation holds 64, one of
    prompt + max_tokens 17."""
    r = Request("k", prompts_of((13,), tiny.cfg.vocab_size, 4)[0], 4)
    engine = ContinuousEngine(tiny, num_blocks=8, block_size=8, max_seq_len=64, kv_sample_every=1)
    drive(engine, [(0, r)])
    k = engine.kv_summary()
    assert k["samples"] == 4 and k["peak_slots_allocated"] == 16
    assert k["paged"] == pytest.approx((13 + 14 + 15 + 16) / 64)
    assert k["contiguous_max_len"] == pytest.approx((13 + 14 + 15 + 16) / (4 * 64))
    assert k["contiguous_request_len"] == pytest.approx((13 + 14 + 15 + 16) / (4 * 17))
    engine.reset_kv_samples()
    assert engine.kv_summary()["samples"] == 0


def test_graph_path_replays_over_the_buffers(tiny, monkeypatch):
    """The CUDA-graph path's bookkeeping on the CPU: each bucket's 'graph' (a stand-in whose replay
    re-runs the forward over the fixed buffers into its own output tensor, as a replay does) is
    captured up front with every row on the padding block; the steps then only fill the buffers and
    replay. Outputs equal each request alone."""
    lens, outs = (7, 19, 12), (9, 6, 11)
    reqs = [Request(f"g{i}", p, n) for i, (p, n) in enumerate(zip(prompts_of(lens, tiny.cfg.vocab_size, 6), outs))]
    engine = ContinuousEngine(tiny, num_blocks=16, block_size=8, max_batch=3, max_seq_len=64, graphs="bucketed")
    engine.graphs = "graph"
    replays = []

    class StandIn:
        def __init__(self, Bp):
            self.Bp, self.out = Bp, engine._forward_fixed(Bp).clone()

        def replay(self):
            replays.append(self.Bp)
            self.out.copy_(engine._forward_fixed(self.Bp))

    def capture(Bp):
        assert engine.pool.fill[engine._pad_block] == 0 and bool((engine._buf["tables"] == engine._pad_block).all())
        g = StandIn(Bp)
        engine._graphs[Bp] = (g, g.out)

    monkeypatch.setattr(engine, "_capture", capture)
    assert engine.capture() == 3 and sorted(engine._graphs) == [1, 2, 3]
    got, _ = drive(engine, [(0, reqs[0]), (0, reqs[1]), (2, reqs[2])])
    ref = alone(tiny, reqs)
    for r in reqs:
        assert got[r.id] == ref[r.id], f"{r.id}: graph path {got[r.id]} vs alone {ref[r.id]}"
    s = engine.stats()
    assert s["graph_error"] is None and s["graphs_captured"] == [1, 2, 3] and len(replays) == s["graph_steps"] > 0
