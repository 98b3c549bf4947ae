"""Paged attention: decode over a block pool in Triton, prefill over gathered pages, and the decoder's
paged cache seam (notebook 06).

The batch format (as vLLM and nano-vllm): a step of a server mixes sequences of different lengths,
some reading their prompt (prefill, maybe a chunk of it, maybe after a cached prefix), some adding
one token (decode). All their new tokens are flattened into ONE row::

    idx:        (1, N)   the N new tokens of all B sequences, sequence after sequence
    input_pos:  (1, N)   each token's position in its own sequence (RoPE uses it per token)

so the decoder runs unchanged (its projections and MLP see N tokens; ``apply_rope`` takes (B, T)
positions) and only attention needs to know where one sequence ends: a ``PagedBatch`` (below) holds
each token's slot in the pool, each sequence's block table and length, and which sequences decode.
A scheduler builds it with ``make_batch`` and sets it on the pool for exactly one forward::

    with pool.step(batch):
        logits = model(batch.input_ids, batch.input_pos, logits_at=batch.last_token_index)  # (1, B, vocab)

The cache seam. ``PagedKVCache`` (one per layer, all sharing one ``BlockPool``) owns its attention
call, as vLLM's attention backends do: ``attend(q, k, v, input_pos, attn_fn)`` writes the N new
keys/values into their slots (``write_kv``), then

* decode sequences (one new token): ``paged_decode``, a Triton kernel (labutils.kernels.paged_attention),
  one launch for all of them, no host sync (CUDA-graph capturable at a fixed batch size);
* prefill sequences (a prompt, a chunk of one, maybe after a cached prefix), two ways:
  ``prefill="torch"`` (the default): ``paged_prefill`` gathers each sequence's pages into a
  contiguous (1, n_kv_head, L, head_dim) tensor and calls the model's own attention backend
  ``attn_fn`` with the chunk's positions (causal, over the prefix too): torch, one call per
  sequence, a copy of its whole context. ``prefill="triton"``: ``paged_prefill_triton``, one varlen
  causal kernel for the whole step (decodes included) reading the pages in place; checked in the
  interpreter against the torch path, not yet tuned or timed on a GPU.

With no batch set (a cache left attached outside its step) ``attend`` raises instead of writing.

The decode kernel (FlashDecoding over pages, as notebook 03's ``flash_decode``): grid (B, n_kv_head,
num_splits). A program takes the ``n_head // n_kv_head`` query heads of one KV head as the rows of
its tile (GQA: each K/V byte is read once per group) and one range of whole pages of the sequence's
``context_len`` positions, a range computed on the device from ``context_lens``. It walks the range
``BLOCK_N`` positions at a time; each position's physical address comes from the block table::

    page = block_table[b, n // block_size];  K[page, kvh, n % block_size, :]

with the online softmax of flash_attention, and writes a partial output and its log-sum-exp. The
combine kernel of flash_attention merges the splits exactly.

Names: B sequences, N new tokens of the step, n_head, n_kv_head, head_dim, block_size, L context length.

The kernels, their launchers and custom ops live in labutils.kernels.paged_attention and are
re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import naive_attention
from .flash_attention import DTYPES, HEAD_DIMS, LOG2E, _decode_combine, default_num_splits  # noqa: F401
from .kernels.paged_attention import (  # noqa: F401  (re-exported: notebooks and tests read them from here)
    _BLOCK_N, _check_decode, _paged_decode_impl, _paged_decode_op, _paged_decode_split, _paged_prefill,
    _paged_prefill_impl, _paged_prefill_op, paged_decode, paged_prefill_triton)
from .paged_cache import BlockPool, BlockTable, OutOfBlocks


# ---- torch references -----------------------------------------------------------------------------
def gather_kv(k_cache, v_cache, block_table, length: int):
    """Positions 0 .. length-1 of one sequence, gathered from its pages: two (1, n_kv_head, length, head_dim)."""
    page = k_cache.shape[2]
    n_pages = -(-length // page)
    pages = block_table[:n_pages].long()

    def one(cache):
        x = cache[pages]  # (n_pages, n_kv_head, page, head_dim)
        return x.transpose(0, 1).reshape(cache.shape[1], n_pages * page, cache.shape[3])[None, :, :length]

    return one(k_cache), one(v_cache)


def paged_decode_ref(q, k_cache, v_cache, block_tables, context_lens):
    """The torch reference of ``paged_decode``: gather each sequence's pages, naive attention (fp32 math)."""
    out = []
    for b, L in enumerate(context_lens.tolist()):
        k, v = gather_kv(k_cache, v_cache, block_tables[b], L)
        out.append(naive_attention(q[b][None, :, None], k, v, torch.tensor([L - 1], device=q.device))[0, :, 0])
    return torch.stack(out)  # (B, n_head, head_dim)


def write_kv(pool: BlockPool, layer: int, slot_mapping, k, v):
    """Write new keys/values k, v (N, n_kv_head, head_dim) of layer ``layer`` into slots
    slot_mapping (N,) (slot = block * block_size + offset; every slot valid)."""
    write_kv_into(pool.k_cache(layer), pool.v_cache(layer), slot_mapping, k, v)


def write_kv_into(k_cache, v_cache, slot_mapping, k, v):
    """``write_kv`` on one layer's caches (num_blocks, n_kv_head, block_size, head_dim)."""
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]):
        raise ValueError(f"k, v must be (N, n_kv_head, head_dim) = (N, {k_cache.shape[1]}, {k_cache.shape[3]}), "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) for {k.shape[0]} new tokens, "
                         f"got {tuple(slot_mapping.shape)}")
    page = k_cache.shape[2]
    blk, off = slot_mapping // page, slot_mapping % page  # (N,) each
    k_cache[blk, :, off] = k.to(k_cache.dtype)  # indexed view: (N, n_kv_head, head_dim)
    v_cache[blk, :, off] = v.to(v_cache.dtype)


def paged_prefill(q, k_cache, v_cache, batch: "PagedBatch", seqs, attn_fn):
    """Attention of the chunks of prefill sequences ``seqs`` (indices into the batch): for each, its
    pages gathered (cached prefix, earlier chunks and this chunk, already written) and ``attn_fn``
    called with the chunk's positions. q (1, n_head, N, head_dim) -> {seq: (1, n_head, T_seq, head_dim)}.
    torch, one call per sequence (a Triton varlen kernel reading pages directly is not written yet)."""
    out = {}
    for s in seqs:
        a, z = batch.query_start[s], batch.query_start[s + 1]
        k, v = gather_kv(k_cache, v_cache, batch.block_tables[s], batch.context_lens_host[s])
        out[s] = attn_fn(q[:, :, a:z], k, v, batch.input_pos[:, a:z])
    return out


# ---- per-step batch metadata ---------------------------------------------------------------------
@dataclass
class PagedBatch:
    """One forward's worth of sequences, flattened (see the module docstring). Device tensors for the
    kernels, host lists for the torch prefill loop (known to the scheduler anyway: no sync)."""
    input_ids: torch.Tensor  # (1, N) int64
    input_pos: torch.Tensor  # (1, N) int64, each token's position in its sequence
    slot_mapping: torch.Tensor  # (N,) int64, each token's slot in the pool
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    context_lens: torch.Tensor  # (B,) int32, positions after this step
    last_token_index: torch.Tensor  # (B,) int64, index in N of each sequence's last new token
    query_start: list  # B + 1 offsets of each sequence's tokens in N
    query_start_t: torch.Tensor  # the same, (B + 1,) int32 on the device
    max_query_len: int
    context_lens_host: list
    decode_seqs: list  # sequences with one new token
    prefill_seqs: list  # the others
    decode_tokens: torch.Tensor | None  # (B_dec,) their token indices; None when every sequence decodes
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def make_batch(tables: list[BlockTable], new_tokens: list, device=None) -> PagedBatch:
    """Allocate the slots of each sequence's new tokens (``tables[i].append_slots``) and build the
    step's metadata. new_tokens[i]: the token ids sequence i feeds this step (a prompt, a chunk of
    one, or the last sampled token). Raises ``OutOfBlocks`` before touching any table if the pool
    cannot hold them all."""
    if len(tables) != len(new_tokens) or not tables:
        raise ValueError(f"need one list of new tokens per table, got {len(tables)} tables and {len(new_tokens)}")
    new_tokens = [[int(t) for t in (ids.tolist() if torch.is_tensor(ids) else ids)] for ids in new_tokens]
    if any(len(ids) == 0 for ids in new_tokens):
        raise ValueError("every sequence in a step needs at least one new token")
    pool = tables[0].pool
    if any(t.pool is not pool for t in tables) or len({id(t) for t in tables}) != len(tables):
        raise ValueError("the tables must be distinct and share one pool")
    need = sum(t.blocks_needed(len(ids)) for t, ids in zip(tables, new_tokens))
    if need > pool.num_available:
        raise OutOfBlocks(need, pool.num_available, pool.num_blocks)
    device = pool.device if device is None else device
    ids, pos, slots, starts = [], [], [], [0]
    for t, new in zip(tables, new_tokens):
        p0 = t.num_tokens
        slots += t.append_slots(len(new), new)
        ids += new
        pos += range(p0, p0 + len(new))
        starts.append(len(ids))
    width = max(len(t.blocks) for t in tables)
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t.blocks)] = torch.tensor(t.blocks, dtype=torch.int32)
    lens = [t.num_tokens for t in tables]
    decode = [i for i, ids_i in enumerate(new_tokens) if len(ids_i) == 1]
    prefill = [i for i, ids_i in enumerate(new_tokens) if len(ids_i) > 1]
    bt, ctx = bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    all_decode = len(decode) == len(tables)
    dec_idx = torch.tensor(decode, dtype=torch.long, device=device)
    return PagedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        input_pos=torch.tensor([pos], dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=bt, context_lens=ctx,
        last_token_index=torch.tensor([s - 1 for s in starts[1:]], dtype=torch.long, device=device),
        query_start=starts, query_start_t=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(len(x) for x in new_tokens), context_lens_host=lens, decode_seqs=decode, prefill_seqs=prefill,
        decode_tokens=None if all_decode else torch.tensor([starts[i] for i in decode], dtype=torch.long,
                                                           device=device),
        decode_block_tables=bt if all_decode else bt[dec_idx], decode_context_lens=ctx if all_decode else ctx[dec_idx])


# ---- the decoder's cache seam ---------------------------------------------------------------------
class PagedKVCache:
    """Layer ``layer``'s view of a ``BlockPool`` for the decoder's cache seam: ``attend`` writes the
    step's new K/V into their slots and runs paged attention with the batch set by ``pool.step``.

    decode: "triton" (``paged_decode``) or "torch" (gather the pages and call the model's attn_fn,
    the reference path). prefill: "torch" (``paged_prefill``: gathered pages, the model's attn_fn)
    or "triton" (``paged_prefill_triton``: one varlen launch for the whole step, decodes included)."""

    def __init__(self, pool: BlockPool, layer: int, decode: str = "triton", prefill: str = "torch"):
        if not 0 <= layer < pool.n_layer:
            raise ValueError(f"layer {layer} outside the pool's 0..{pool.n_layer - 1}")
        if decode not in ("triton", "torch") or prefill not in ("triton", "torch"):
            raise ValueError(f"decode and prefill must be 'triton' or 'torch', got {decode!r}, {prefill!r}")
        self.pool, self.layer, self.decode, self.prefill = pool, layer, decode, prefill

    def update(self, input_pos, k, v):
        raise TypeError("a PagedKVCache owns its attention call: the decoder calls attend(q, k, v, input_pos, "
                        "attn_fn); there is no contiguous (k_all, v_all) to return")

    def attend(self, q, k, v, input_pos, attn_fn):
        """q (1, n_head, N, head_dim), k/v (1, n_kv_head, N, head_dim): the flattened step
        -> (1, n_head, N, head_dim)."""
        batch = self.pool.batch
        if batch is None:
            raise RuntimeError("PagedKVCache.attend: no batch metadata is set on the pool; run the forward "
                               "inside `with pool.step(make_batch(...)):` (a paged cache left attached "
                               "outside its step must not write into the pool)")
        if q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != batch.num_tokens:
            raise ValueError(f"a paged step takes its {batch.num_tokens} tokens flattened as (1, N): q must be "
                             f"(1, n_head, {batch.num_tokens}, head_dim), got {tuple(q.shape)}")
        kc, vc = self.pool.k_cache(self.layer), self.pool.v_cache(self.layer)
        write_kv_into(kc, vc, batch.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (N, n_kv_head, d)
        qt = q[0].transpose(0, 1)  # (N, n_head, head_dim)
        if not batch.prefill_seqs and self.decode == "triton":  # every sequence decodes: one launch, no sync
            return paged_decode(qt, kc, vc, batch.block_tables, batch.context_lens).transpose(0, 1)[None]
        if batch.prefill_seqs and self.prefill == "triton":  # one varlen launch for the whole step
            return paged_prefill_triton(qt, kc, vc, batch.block_tables, batch.context_lens, batch.query_start_t,
                                        batch.max_query_len).transpose(0, 1)[None]
        out = torch.empty_like(qt)  # (N, n_head, head_dim)
        if batch.decode_seqs and self.decode == "triton":
            rows = batch.decode_tokens
            out[rows] = paged_decode(qt[rows], kc, vc, batch.decode_block_tables, batch.decode_context_lens)
            seqs = batch.prefill_seqs
        else:
            seqs = range(len(batch.context_lens_host))
        for s, y in paged_prefill(q, kc, vc, batch, seqs, attn_fn).items():
            out[batch.query_start[s]:batch.query_start[s + 1]] = y[0].transpose(0, 1)
        return out.transpose(0, 1)[None]  # (1, n_head, N, head_dim)


def paged_caches(pool: BlockPool, decode: str = "triton", prefill: str = "torch") -> list[PagedKVCache]:
    """One PagedKVCache per layer of the pool, for ``model.kv_caches_attached(...)``."""
    return [PagedKVCache(pool, i, decode, prefill) for i in range(pool.n_layer)]
