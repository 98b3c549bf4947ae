"""Continuous batching over the paged KV cache (notebook 06): the serving.Engine that batches.

``ContinuousEngine`` implements labutils.serving's four calls (``add / step / has_unfinished /
abort``) with iteration-level scheduling, as Orca introduced and vLLM and nano-vllm do: every
``step()`` is ONE forward of the decoder over a ragged batch (labutils.paged_attention's format, all
new tokens flattened as (1, N)), and the set of sequences in it is chosen anew at every step.

A step, in order:

1. **Running sequences, oldest first**, each get their next tokens: one for a decoding sequence, a
   chunk of the rest of its prompt for one still prefilling (``chunked_prefill``), within a budget of
   ``max_num_batched_tokens`` new tokens per step and ``max_batch`` sequences. A sequence's new
   positions need blocks; when the pool has too few, the **newest** running sequence is *preempted by
   recompute*: its blocks are freed and it goes back to the front of the waiting queue with the tokens
   it has generated so far appended to its prompt (its KV is recomputed when it is admitted again;
   the prefix cache often keeps most of it). If the sequence needing blocks is itself the newest, it
   is the one preempted.
2. **Waiting requests, first come first served**, are admitted while the token budget, ``max_batch``
   and the free blocks allow (not in a step that preempted: memory is short). On admission the
   prompt's longest cached prefix of full blocks is reused (``BlockTable.use_cached_prefix``,
   ``prefix_caching``); only the rest is computed. Without ``chunked_prefill`` a prompt is admitted
   only when all of it fits in the step's budget; with it, the head of the queue takes whatever budget
   is left and continues in later steps (a long prompt no longer stalls the decodes of the others).
3. **One forward** (``make_batch``, ``pool.step``, ``logits_at`` the last new token of each sequence):
   prefill chunks mixed with decodes. Every sequence whose known tokens are now all in the cache draws
   its next token (greedy argmax, or temperature / top-p through ``labutils.speculative`` with the
   request's own seeded generator, as ``SequentialEngine``); it **retires** at a stop id or at
   ``max_tokens``, and its blocks go back to the pool (full ones stay cached for prefix hits).

Timing stamps (arrival, each token, finish) are taken as SequentialEngine takes them. ``stats()``
gives the pool's block counts and KV utilization (``BlockPool.stats``) with the scheduler's
counters (steps, preemptions, prefill and decode tokens, prompt tokens reused from the prefix
cache, the largest batch, steps that mixed prefill chunks with decodes).

CUDA graphs for the decode-only steps (``graphs``). A step in which every sequence feeds one token
has the same shapes as any other decode step of the same batch size, up to the block tables' width.
So, as vLLM does, such a step is padded to a *bucket* (1, 2, 4, 8, 16, 32, 64, ... up to
``max_batch``) and its inputs copied into fixed buffers: ids, positions, slots (1, B_bucket), block
tables (B_bucket, max_blocks_per_seq) and context lengths. Padding rows read and write one
reserved *padding block* (allocated once from the pool, never freed, left out of ``stats()``), so
they never touch a sequence's KV. With ``graphs="graph"`` (the default on a GPU) the forward at each
bucket is captured once in a ``torch.cuda.CUDAGraph`` (on first use) and replayed: one launch per
step instead of one per kernel. ``graphs="bucketed"`` runs the same padded, fixed-buffer step
eagerly (how the CPU tests check the padding logic); ``"off"`` runs every step as built by
``make_batch``. Steps with a prefill chunk always run eagerly. Greedy outputs are the same in all
three modes (the padding rows are independent of the real ones; only the number of split-KV
programs, chosen from the buffers' width, can differ and with it the last bits of a logit).

KV utilization over time (``kv_summary``): every ``kv_sample_every`` steps the engine records the
token positions held by the running sequences' blocks against the slots of those blocks (shared
prefix blocks counted once), and what a contiguous reservation of ``max_seq_len`` positions per
running sequence (and of prompt + max_tokens) would have held.

Names: B sequences in a step, N new tokens in a step, block_size.
"""
from __future__ import annotations

import collections
import math
import time

import numpy as np
import torch

from .generate import check_count
from .paged_attention import PagedBatch, make_batch, paged_caches
from .paged_cache import BlockPool, BlockTable
from .serving import Output, Request, _Running, check_fits, engine_max_seq_len, pick_token


GRAPH_MODES = ("auto", "graph", "bucketed", "off")


def decode_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes of decode-only steps: powers of two below ``max_batch``, then ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``n`` sequences."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} sequences exceed the largest bucket {buckets[-1]}")


class _Seq(_Running):
    """A request inside the continuous engine: its known tokens (prompt + generated), how many of them
    have their K/V in the pool (``num_computed``), its block table while it holds blocks."""

    def __init__(self, request: Request, device):
        super().__init__(request, device)
        self.tokens: list[int] = list(request.prompt)  # prompt, then every generated token
        self.num_computed = 0
        self.table: BlockTable | None = None

    @property
    def remaining(self) -> int:
        """Known tokens whose K/V is not in the pool yet (1 for a decoding sequence)."""
        return len(self.tokens) - self.num_computed


class ContinuousEngine:
    """Iteration-level scheduling over a paged KV cache (see the module docstring).

    model: the lab decoder (``labutils.decoder.Decoder``). num_blocks, block_size: the ``BlockPool``
    (num_blocks * block_size token positions shared by all sequences). max_batch: sequences per
    step. max_num_batched_tokens: new tokens per step (prefill chunks and decodes together).
    prefix_caching: reuse cached full blocks of a prompt on admission. chunked_prefill: split a
    prompt over steps when it does not fit the step's budget. decode / prefill: the attention paths
    of ``paged_caches`` ("triton" or "torch"). max_seq_len: prompt + output tokens per request
    (default min(model's context, 2048), as SequentialEngine). graphs: "auto" ("graph" on a GPU with
    the Triton decode, else "off"), "graph", "bucketed" or "off" (see the module docstring).
    kv_sample_every: steps between two samples of the KV utilization (``kv_summary``).
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_batch: int = 64,
                 max_num_batched_tokens: int = 2048, prefix_caching: bool = True, chunked_prefill: bool = True,
                 max_seq_len: int | None = None, decode: str = "triton", prefill: str = "torch",
                 graphs: str = "auto", kv_sample_every: int = 4):
        self.model = model
        self.max_seq_len = engine_max_seq_len(model, max_seq_len)
        self.max_batch = check_count(max_batch, "max_batch", minimum=1)
        self.max_num_batched_tokens = check_count(max_num_batched_tokens, "max_num_batched_tokens", minimum=1)
        self.prefix_caching, self.chunked_prefill = bool(prefix_caching), bool(chunked_prefill)
        self.pool = BlockPool.for_model(model, check_count(num_blocks, "num_blocks", minimum=1),
                                        check_count(block_size, "block_size", minimum=1))
        self.caches = paged_caches(self.pool, decode, prefill)
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []  # in admission order: the last is the newest (preempted first)
        self.ids: set[str] = set()
        self.steps = self.preemptions = 0
        self.prefill_tokens = self.prompt_tokens_cached = self.decode_tokens = 0
        self.max_batch_seen = self.mixed_steps = 0
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {GRAPH_MODES}, got {graphs!r}")
        if graphs == "auto":
            graphs = "graph" if model.device.type == "cuda" and decode == "triton" else "off"
        if graphs == "graph" and model.device.type != "cuda":
            raise RuntimeError("graphs='graph' captures CUDA graphs and needs a GPU; use 'bucketed' or 'off'")
        if graphs != "off" and decode != "triton":
            raise ValueError("padded decode steps run the Triton paged decode kernel: use decode='triton'")
        self.graphs = graphs
        self.buckets = decode_buckets(self.max_batch)
        self.graph_steps = 0  # decode-only steps run through the fixed buffers
        self.graph_error: str | None = None  # why capture failed (then those steps run eagerly, bucketed)
        if graphs != "off":
            if self.pool.num_blocks < 2:
                raise ValueError("padded decode steps reserve one padding block: num_blocks must be >= 2")
            self._pad_block = self.pool.allocate()  # padding rows write here; never freed
            self._setup_buffers()
        else:
            self._pad_block = None
        self.kv_sample_every = check_count(kv_sample_every, "kv_sample_every", minimum=1)
        self._kv_samples: list[tuple[int, int, int, int, int]] = []  # (stored, allocated, running, max_len, need)

    # ---- the Engine protocol -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        check_fits(request, self.max_seq_len)
        if request.id in self.ids:
            raise ValueError(f"a request with id {request.id!r} is already in the engine")
        if max(request.prompt) >= self.model.cfg.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"request {request.id}: prompt token ids must lie in 0..{self.model.cfg.vocab_size - 1}")
        positions = len(request.prompt) + request.max_tokens - 1  # K/V written: all but the last token
        if -(-positions // self.pool.block_size) > self.num_usable_blocks:
            raise ValueError(f"request {request.id} needs {positions} KV positions, more than the pool's "
                             f"{self.num_usable_blocks} blocks of {self.pool.block_size} hold; build a larger pool")
        if not self.chunked_prefill and positions > self.max_num_batched_tokens:
            raise ValueError(f"request {request.id}: without chunked prefill a prompt (after a preemption, with "
                             f"its output) of up to {positions} tokens must fit max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}")
        self.waiting.append(_Seq(request, self.model.device))
        self.ids.add(request.id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; its blocks go back to the pool."""
        if request_id not in self.ids:
            return
        self.ids.discard(request_id)
        self.waiting = collections.deque(s for s in self.waiting if s.request.id != request_id)
        for s in [s for s in self.running if s.request.id == request_id]:
            self.running.remove(s)
            self._free(s)

    @torch.no_grad()
    def step(self) -> list[Output]:
        scheduled = self._schedule()  # [(seq, number of new tokens)]
        if not scheduled:
            return []
        seqs = [s for s, _ in scheduled]
        feeds = [s.tokens[s.num_computed:s.num_computed + n] for s, n in scheduled]
        if self.graphs != "off" and all(n == 1 for _, n in scheduled):  # decode only: padded, fixed buffers
            logits = self._decode_step([s.table for s in seqs], [f[0] for f in feeds])  # (B, vocab)
        else:
            batch = make_batch([s.table for s in seqs], feeds)  # blocks were checked by _schedule
            with self.model.kv_caches_attached(self.caches), self.pool.step(batch):
                logits = self.model(batch.input_ids, batch.input_pos, logits_at=batch.last_token_index)[0]  # (B, vocab)
        if self.steps % self.kv_sample_every == 0:
            self._sample_kv()
        done = []
        for row, (s, n) in enumerate(scheduled):
            s.num_computed += n
            if s.remaining == 0:  # every known token is in the cache: its next token is due
                done.append(row)
        greedy = [row for row in done if seqs[row].request.temperature == 0]
        picked = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}  # one sync for all
        for row in done:
            if row not in picked:
                r = seqs[row].request
                picked[row] = pick_token(logits[row], r.temperature, r.top_p, seqs[row].generator)
        now = time.perf_counter()
        outputs = []
        for row in done:
            s = seqs[row]
            s.tokens.append(picked[row])
            out = s.emit(picked[row], now)
            outputs.append(out)
            if out.finished:
                self.running.remove(s)
                self._free(s)
                self.ids.discard(s.request.id)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(scheduled))
        return outputs

    # ---- scheduling ------------------------------------------------------------------------------------
    def _free(self, s: _Seq) -> None:
        if s.table is not None:
            s.table.release()
            s.table = None
        s.num_computed = 0

    def _preempt(self, s: _Seq) -> None:
        """Recompute: free its blocks, back to the front of the queue; its tokens (prompt + output) stay."""
        self.running.remove(s)
        self._free(s)
        self.waiting.appendleft(s)
        self.preemptions += 1

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """This step's sequences and how many new tokens each feeds; blocks for all of them exist
        (``make_batch`` takes them). May preempt running sequences."""
        budget, scheduled, preempted = self.max_num_batched_tokens, [], False
        pool, reserved = self.pool, 0  # reserved: blocks the sequences scheduled so far will take

        def fits(table, n):
            return table.blocks_needed(n) <= pool.num_available - reserved

        # 1. running sequences, oldest first; blocks short -> preempt the newest (maybe s itself)
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < self.max_batch:
            s = self.running[i]
            n = min(s.remaining, budget)
            while not fits(s.table, n) and self.running[-1] is not s:
                self._preempt(self.running[-1])
                preempted = True
            if not fits(s.table, n):
                self._preempt(s)  # the newest: nothing after it to free
                preempted = True
                break
            scheduled.append((s, n))
            reserved += s.table.blocks_needed(n)
            budget -= n
            i += 1
        # 2. waiting requests, first come first served (not after a preemption: blocks are short)
        while self.waiting and not preempted and budget > 0 and len(scheduled) < self.max_batch:
            s = self.waiting[0]
            table = BlockTable(pool)
            cached = table.use_cached_prefix(s.tokens) if self.prefix_caching else 0
            todo = len(s.tokens) - cached
            n = min(todo, budget)
            if (n < todo and not self.chunked_prefill) or not fits(table, n):
                table.release()  # gives the cached prefix back (parked as most recently used)
                break
            self.waiting.popleft()
            s.table, s.num_computed = table, cached
            self.prompt_tokens_cached += cached
            self.running.append(s)
            scheduled.append((s, n))
            reserved += table.blocks_needed(n)
            budget -= n
        kinds = set()
        for s, n in scheduled:
            if s.out and s.remaining == 1:
                self.decode_tokens += 1
                kinds.add("decode")
            else:
                self.prefill_tokens += n  # prompt chunks, and recomputation after a preemption
                kinds.add("prefill")
        self.mixed_steps += len(kinds) == 2
        return scheduled

    def stats(self) -> dict:
        """The pool's blocks and KV utilization (``BlockPool.stats``, the padding block left out) and
        the scheduler's counters."""
        st = self.pool.stats()
        if self._pad_block is not None:  # the padding block is not KV of any sequence
            st["num_blocks"] -= 1
            st["in_use"] -= 1
            st["slots_allocated"] -= self.pool.block_size
            st["tokens_stored"] -= self.pool.fill[self._pad_block]
            st["kv_utilization"] = st["tokens_stored"] / st["slots_allocated"] if st["slots_allocated"] else 1.0
        return dict(st, steps=self.steps, preemptions=self.preemptions, running=len(self.running),
                    waiting=len(self.waiting), prefill_tokens=self.prefill_tokens, decode_tokens=self.decode_tokens,
                    prefix_cached_tokens=self.prompt_tokens_cached, max_batch_seen=self.max_batch_seen,
                    mixed_steps=self.mixed_steps, graphs=self.graphs, graph_steps=self.graph_steps,
                    graphs_captured=sorted(self._graphs) if self.graphs == "graph" else [],
                    graph_error=self.graph_error)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks sequences can hold: the pool less the padding block of padded decode steps."""
        return self.pool.num_blocks - (self._pad_block is not None)

    # ---- KV utilization over the run ----------------------------------------------------------------
    def _sample_kv(self) -> None:
        """One sample of the running sequences' KV: positions stored in their blocks (a shared block
        once), the slots of those blocks, and the contiguous reservations they would have needed."""
        blocks = set()
        need = 0
        for s in self.running:
            if s.table is not None:
                blocks.update(s.table.blocks)
            need += len(s.request.prompt) + s.request.max_tokens
        if not blocks:
            return
        stored = sum(self.pool.fill[b] for b in blocks)
        self._kv_samples.append((stored, len(blocks) * self.pool.block_size, len(self.running),
                                 self.max_seq_len, need))

    def reset_kv_samples(self) -> None:
        """Forget the KV samples so far (e.g. those of a warm-up run)."""
        self._kv_samples.clear()

    def kv_summary(self) -> dict:
        """KV utilization averaged over the sampled steps: ``paged`` = positions stored / slots of the
        blocks allocated; ``contiguous_max_len`` = the same positions / (running sequences x
        max_seq_len), a reservation of the longest allowed sequence per request (as systems before
        paging did); ``contiguous_request_len`` = / (prompt + max_tokens per running request), a
        reservation that knows each request's limit. Also the peak of allocated slots."""
        if not self._kv_samples:
            return {"samples": 0, "paged": float("nan"), "contiguous_max_len": float("nan"),
                    "contiguous_request_len": float("nan"), "peak_slots_allocated": 0}
        n = len(self._kv_samples)
        return {"samples": n,
                "paged": sum(st / al for st, al, *_ in self._kv_samples) / n,
                "contiguous_max_len": sum(st / (r * L) for st, _, r, L, _ in self._kv_samples) / n,
                "contiguous_request_len": sum(st / need for st, _, _, _, need in self._kv_samples) / n,
                "peak_slots_allocated": max(al for _, al, *_ in self._kv_samples)}

    # ---- decode-only steps: padded to a bucket, fixed buffers, CUDA graphs ---------------------------
    def _setup_buffers(self) -> None:
        """Fixed input buffers for the largest bucket (each bucket uses their first rows) and one
        PagedBatch per bucket over views of them."""
        dev, bs = self.model.device, self.pool.block_size
        Bmax, W = self.buckets[-1], math.ceil(self.max_seq_len / bs)
        pad_slot = self._pad_block * bs
        self._buf = dict(ids=torch.zeros(1, Bmax, dtype=torch.long, device=dev),
                         pos=torch.zeros(1, Bmax, dtype=torch.long, device=dev),
                         slots=torch.full((Bmax,), pad_slot, dtype=torch.long, device=dev),
                         tables=torch.full((Bmax, W), self._pad_block, dtype=torch.int32, device=dev),
                         ctx=torch.ones(Bmax, dtype=torch.int32, device=dev),
                         rows=torch.arange(Bmax, dtype=torch.long, device=dev),
                         starts=torch.arange(Bmax + 1, dtype=torch.int32, device=dev))
        self._width = W
        self._batches = {}
        for Bp in self.buckets:
            b = self._buf
            tables, ctx = b["tables"][:Bp], b["ctx"][:Bp]
            self._batches[Bp] = PagedBatch(
                input_ids=b["ids"][:, :Bp], input_pos=b["pos"][:, :Bp], slot_mapping=b["slots"][:Bp],
                block_tables=tables, context_lens=ctx, last_token_index=b["rows"][:Bp],
                query_start=list(range(Bp + 1)), query_start_t=b["starts"][:Bp + 1], max_query_len=1,
                context_lens_host=[1] * Bp, decode_seqs=list(range(Bp)), prefill_seqs=[], decode_tokens=None,
                decode_block_tables=tables, decode_context_lens=ctx)
        self._graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, its logits output)
        self._graph_pool = None

    def _forward_fixed(self, Bp: int) -> torch.Tensor:
        """The decode forward over bucket Bp's buffers: logits (Bp, vocab)."""
        batch = self._batches[Bp]
        with self.model.kv_caches_attached(self.caches), self.pool.step(batch):
            return self.model(batch.input_ids, batch.input_pos, logits_at=batch.last_token_index)[0]

    def _capture(self, Bp: int) -> None:
        """Record bucket Bp's forward in a CUDA graph (warm-up on a side stream first, as
        engine.DecodeEngine). The warm-up runs write the same K/V into the same slots as the step
        they precede (the buffers already hold it), so they change nothing."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward_fixed(Bp)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._forward_fixed(Bp)
        self._graphs[Bp] = (graph, out)

    @torch.no_grad()
    def capture(self) -> int:
        """Capture every bucket's graph now (largest first, as vLLM), with every buffer row on the
        padding block, so no later step pays for a capture. Returns the number captured (0 unless
        graphs="graph")."""
        if self.graphs != "graph":
            return 0
        b, pad = self._buf, self._pad_block
        b["ids"].zero_()
        b["pos"].zero_()
        b["slots"].fill_(pad * self.pool.block_size)
        b["tables"].fill_(pad)
        b["ctx"].fill_(1)
        for Bp in reversed(self.buckets):
            if Bp not in self._graphs:
                self._capture(Bp)
        return len(self._graphs)

    def _decode_step(self, tables: list[BlockTable], tokens: list[int]) -> torch.Tensor:
        """One decode-only step padded to its bucket: take each sequence's slot for its token, fill
        the buffers (rows past B: the padding block, context 1), run (replay) the bucket's forward.
        Returns the B real rows' logits (B, vocab)."""
        B, bs, pad = len(tables), self.pool.block_size, self._pad_block
        Bp = bucket_for(B, self.buckets)
        ids, pos, slots, ctx = [0] * Bp, [0] * Bp, [pad * bs] * Bp, [1] * Bp
        rows = np.full((Bp, self._width), pad, dtype=np.int32)
        for i, (t, tok) in enumerate(zip(tables, tokens)):
            slots[i] = t.append_slots(1, [tok])[0]
            ids[i], pos[i], ctx[i] = tok, t.num_tokens - 1, t.num_tokens
            rows[i, :len(t.blocks)] = t.blocks
        b = self._buf
        b["ids"][0, :Bp].copy_(torch.tensor(ids))
        b["pos"][0, :Bp].copy_(torch.tensor(pos))
        b["slots"][:Bp].copy_(torch.tensor(slots))
        b["ctx"][:Bp].copy_(torch.tensor(ctx, dtype=torch.int32))
        b["tables"][:Bp].copy_(torch.from_numpy(rows))
        self.graph_steps += 1
        if self.graphs == "graph" and self.graph_error is None:
            try:
                if Bp not in self._graphs:
                    self._capture(Bp)
                graph, out = self._graphs[Bp]
                graph.replay()
                return out[:B].clone()
            except Exception as e:  # noqa: BLE001  (reported in stats(); the step runs eagerly instead)
                self.graph_error = f"{type(e).__name__}: {e}"[:300]
        return self._forward_fixed(Bp)[:B]
