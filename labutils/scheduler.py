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

Not done here: CUDA graphs for the decode-only steps at bucketed batch sizes (the paged decode
kernel is a custom op with no host sync, so it is capturable, but no graphs are captured yet); every
step runs eagerly.

Names: B sequences in a step, N new tokens in a step, block_size.
"""
from __future__ import annotations

import collections
import time

import torch

from .generate import check_count
from .paged_attention import make_batch, paged_caches
from .paged_cache import BlockPool, BlockTable
from .serving import Output, Request, _Running, check_fits, pick_token


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
    (default min(model's context, 2048), as SequentialEngine).
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_batch: int = 64,
                 max_num_batched_tokens: int = 2048, prefix_caching: bool = True, chunked_prefill: bool = True,
                 max_seq_len: int | None = None, decode: str = "triton", prefill: str = "torch"):
        self.model = model
        ctx = model.cfg.max_seq_len
        self.max_seq_len = check_count(max_seq_len if max_seq_len is not None else min(ctx, 2048),
                                       "max_seq_len", minimum=2)
        if self.max_seq_len > ctx:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's context of {ctx}")
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

    # ---- the Engine protocol -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        check_fits(request, self.max_seq_len)
        if request.id in self.ids:
            raise ValueError(f"a request with id {request.id!r} is already in the engine")
        if max(request.prompt) >= self.model.cfg.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"request {request.id}: prompt token ids must lie in 0..{self.model.cfg.vocab_size - 1}")
        positions = len(request.prompt) + request.max_tokens - 1  # K/V written: all but the last token
        if -(-positions // self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"request {request.id} needs {positions} KV positions, more than the pool's "
                             f"{self.pool.num_blocks} blocks of {self.pool.block_size} hold; build a larger pool")
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
        batch = make_batch([s.table for s in seqs], feeds)  # blocks were checked by _schedule
        with self.model.kv_caches_attached(self.caches), self.pool.step(batch):
            logits = self.model(batch.input_ids, batch.input_pos, logits_at=batch.last_token_index)[0]  # (B, vocab)
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
        """The pool's blocks and KV utilization (``BlockPool.stats``) and the scheduler's counters."""
        return dict(self.pool.stats(), steps=self.steps, preemptions=self.preemptions, running=len(self.running),
                    waiting=len(self.waiting), prefill_tokens=self.prefill_tokens, decode_tokens=self.decode_tokens,
                    prefix_cached_tokens=self.prompt_tokens_cached, max_batch_seen=self.max_batch_seen,
                    mixed_steps=self.mixed_steps)
