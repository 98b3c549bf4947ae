"""A paged KV cache: a pool of fixed-size blocks, per-sequence block tables, prefix caching (notebook 06).

A contiguous cache reserves ``max_seq_len`` positions per sequence up front; a server that does not
know how long each answer will be wastes most of that reservation (the vLLM paper measured 20-38% of
KV memory holding real tokens in earlier systems). Paging cuts the cache into blocks of
``block_size`` token positions, hands a sequence one block at a time as it grows, and keeps a *block
table* per sequence mapping its logical blocks to physical ones. Only the last block of a sequence
is partly empty, so the waste is under one block per sequence.

Layout (one home for it: ``BlockPool``). One tensor holds every layer's keys and values::

    pool.kv:  (n_layer, 2, num_blocks, n_kv_head, block_size, head_dim)
    pool.k_cache(layer), pool.v_cache(layer):  (num_blocks, n_kv_head, block_size, head_dim) views

A block of one KV head is ``block_size * head_dim`` contiguous elements, so the decode kernel reads
a page of keys as one dense (block_size, head_dim) tile. A *slot* is a flat token position in the
pool, ``slot = block_id * block_size + offset``: token ``i`` of a sequence lives in slot
``table.blocks[i // block_size] * block_size + i % block_size``, in every layer.

Prefix caching (as vLLM's automatic prefix caching and SGLang's radix cache). A *full* block is
keyed by ``hash(parent block's key, its block_size token ids)``, a chain that covers the whole
prefix: two sequences share a block only if everything before it is equal too. ``lookup(tokens)``
returns the longest run of cached full blocks for a prompt and takes a reference on each. Blocks are
reference-counted; a cached block whose count drops to 0 is not wiped but parked in an LRU list and
reused as-is by a later lookup, or evicted (its key dropped) only when ``allocate`` finds no clean
free block. ``BlockTable.release`` frees a sequence's blocks last-first, so the tails of sequences
(the least likely to be shared) are evicted before their common prefixes.

Errors: ``OutOfBlocks`` (a RuntimeError) when the pool cannot supply a block; the scheduler catches
it to preempt a sequence. ``BlockTable.append_slots`` is all-or-nothing: on ``OutOfBlocks`` it
gives back what it took in that call, so the table is as before.

Names: B batch, N new tokens in a step (all sequences together), n_kv_head, block_size, head_dim.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict, deque

import torch


class OutOfBlocks(RuntimeError):
    """The pool has no free or evictable block left; ``needed`` blocks were asked, ``available`` exist."""

    def __init__(self, needed: int, available: int, num_blocks: int):
        self.needed, self.available, self.num_blocks = needed, available, num_blocks
        super().__init__(f"KV block pool exhausted: {needed} more block(s) needed, {available} free or "
                         f"evictable of {num_blocks}; preempt a sequence or build a larger pool")


def block_key(parent: bytes | None, tokens) -> bytes:
    """The prefix-cache key of a full block: a 128-bit BLAKE2b digest of the parent block's key and
    the block's token ids (so the key covers the whole prefix, not only this block's tokens)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b"|".join(str(int(t)).encode() for t in tokens))
    return h.digest()


class BlockPool:
    """K/V storage for all layers in ``num_blocks`` blocks of ``block_size`` positions, with a free
    list, reference counts and a prefix cache of full blocks (see the module docstring)."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        for name, val in (("n_layer", n_layer), ("num_blocks", num_blocks), ("block_size", block_size),
                          ("n_kv_head", n_kv_head), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        self.n_layer, self.num_blocks, self.block_size = n_layer, num_blocks, block_size
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        self.kv = torch.zeros(n_layer, 2, num_blocks, n_kv_head, block_size, head_dim, dtype=dtype, device=device)
        self.ref_count = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks  # prefix-cache key of a registered full block
        self.tokens: list[tuple | None] = [None] * num_blocks  # its token ids (checked on every hit)
        self.fill = [0] * num_blocks  # positions written in the block (for KV utilization)
        self.by_key: dict[bytes, int] = {}
        self.free_ids: deque[int] = deque(range(num_blocks))  # clean: no key, contents meaningless
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; oldest first
        self.batch = None  # per-step metadata for PagedKVCache (labutils.paged_attention), set in a scope
        self.hits = self.queries = 0  # prefix-cache statistics, in blocks

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16, dtype=None, device=None) -> "BlockPool":
        """A pool shaped for the lab decoder ``model`` (its layers, KV heads, head_dim, dtype, device)."""
        c = model.cfg
        return cls(c.n_layer, num_blocks, block_size, c.n_kv_head, c.head_dim,
                   dtype=dtype or model.dtype, device=device or model.device)

    # ---- storage ---------------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]  # (num_blocks, n_kv_head, block_size, head_dim)

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    @property
    def dtype(self):
        return self.kv.dtype

    @property
    def device(self):
        return self.kv.device

    def bytes_per_block(self) -> int:
        """K and V of one block in every layer."""
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    # ---- the step in flight (read by labutils.paged_attention.PagedKVCache) -----------------------
    @contextlib.contextmanager
    def step(self, batch):
        """``with pool.step(batch): model(...)``: the paged caches of this pool use ``batch`` (a
        ``labutils.paged_attention.PagedBatch``) for this block only; outside it they refuse to run."""
        if self.batch is not None:
            raise RuntimeError("a step is already in flight on this pool; steps do not nest")
        self.batch = batch
        try:
            yield batch
        finally:
            self.batch = None

    # ---- allocation --------------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Blocks that ``allocate`` can hand out: clean free ones plus cached ones nobody references."""
        return len(self.free_ids) + len(self.evictable)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available

    def allocate(self) -> int:
        """A block with reference count 1: a clean one if any, else the least recently used cached
        block with no references (its prefix-cache key is dropped). Raises ``OutOfBlocks``."""
        if self.free_ids:
            b = self.free_ids.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)  # LRU
            del self.by_key[self.key[b]]
            self.key[b] = self.tokens[b] = None
        else:
            raise OutOfBlocks(1, 0, self.num_blocks)
        self.ref_count[b] = 1
        self.fill[b] = 0
        return b

    def incref(self, b: int) -> None:
        if self.ref_count[b] == 0:
            if b not in self.evictable:
                raise ValueError(f"block {b} is free; only a block in use or a cached block can be shared")
            del self.evictable[b]
        self.ref_count[b] += 1

    def free(self, b: int) -> None:
        """Drop one reference. At 0 a cached block is parked as most recently used; others go back
        to the free list."""
        if not 0 <= b < self.num_blocks:
            raise ValueError(f"block id {b} outside the pool's 0..{self.num_blocks - 1}")
        if self.ref_count[b] <= 0:
            raise ValueError(f"block {b} freed more often than allocated (reference count is already 0)")
        self.ref_count[b] -= 1
        if self.ref_count[b] == 0:
            if self.key[b] is not None:
                self.evictable[b] = None  # newest at the end
            else:
                self.fill[b] = 0
                self.free_ids.append(b)

    # ---- prefix cache -------------------------------------------------------------------------------
    def register(self, b: int, key: bytes, tokens) -> None:
        """Make full block ``b`` findable under ``key``. If another block already holds that key (two
        sequences computed the same prefix at once), the first stays cached and ``b`` is left as is."""
        if key in self.by_key or self.key[b] is not None:
            return
        self.key[b], self.tokens[b] = key, tuple(int(t) for t in tokens)
        self.by_key[key] = b

    def lookup(self, tokens) -> list[int]:
        """Block ids of the longest cached prefix of ``tokens`` made of full blocks, each with one more
        reference (the caller owns them; give them back with ``free``)."""
        tokens = [int(t) for t in tokens]
        bs, parent, found = self.block_size, None, []
        for i in range(len(tokens) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            key = block_key(parent, chunk)
            self.queries += 1
            b = self.by_key.get(key)
            if b is None or self.tokens[b] != chunk:
                break
            self.hits += 1
            self.incref(b)
            found.append(b)
            parent = key
        return found

    # ---- statistics ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Blocks in use, cached (refcount 0, kept for reuse) and clean free; KV utilization = token
        positions written in the blocks in use / positions those blocks hold."""
        in_use = [b for b in range(self.num_blocks) if self.ref_count[b] > 0]
        stored = sum(self.fill[b] for b in in_use)
        allocated = len(in_use) * self.block_size
        return dict(num_blocks=self.num_blocks, block_size=self.block_size, in_use=len(in_use),
                    cached=len(self.evictable), free=len(self.free_ids), tokens_stored=stored,
                    slots_allocated=allocated, kv_utilization=stored / allocated if allocated else 1.0,
                    prefix_hit_blocks=self.hits, prefix_query_blocks=self.queries)

    def __repr__(self):
        s = self.stats()
        return (f"BlockPool({self.num_blocks} blocks x {self.block_size} positions, {self.n_layer} layers, "
                f"in use {s['in_use']}, cached {s['cached']}, free {s['free']}, {self.kv.dtype})")


class BlockTable:
    """One sequence's blocks in a ``BlockPool``: ``blocks[i]`` holds its positions i*bs .. (i+1)*bs - 1.

    ``num_tokens`` positions are allocated (and, after the step that uses them, written). When the
    token ids are passed to ``append_slots``, every block that becomes full is registered in the
    prefix cache.
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.token_ids: list[int] = []  # ids of the positions so far, while all of them are known
        self.keys: list[bytes] = []  # prefix-cache key of each full block
        self.hashable = True

    def use_cached_prefix(self, tokens) -> int:
        """On an empty table: take the longest cached prefix of ``tokens`` (full blocks) and return
        the number of positions it covers. At least one token is always left to compute (the last
        prompt token's logits are needed), so a fully cached prompt reuses all but its last block."""
        if self.num_tokens:
            raise ValueError("use_cached_prefix needs an empty block table")
        tokens = [int(t) for t in tokens]
        bs = self.pool.block_size
        found = self.pool.lookup(tokens[:((len(tokens) - 1) // bs) * bs])
        self.blocks = list(found)
        self.num_tokens = len(found) * bs
        self.token_ids = tokens[:self.num_tokens]
        self.keys = [self.pool.key[b] for b in found]
        for b in found:
            self.pool.fill[b] = bs
        return self.num_tokens

    def blocks_needed(self, n: int) -> int:
        """New blocks that appending n positions would take."""
        bs = self.pool.block_size
        return max(0, -(-(self.num_tokens + n) // bs) - len(self.blocks))

    def append_slots(self, n: int, token_ids=None) -> list[int]:
        """Allocate the next ``n`` positions (new blocks as needed) and return their slot indices.
        ``token_ids``: the n tokens' ids, for prefix caching of the blocks they fill. All or
        nothing: raises ``OutOfBlocks`` with the table unchanged."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if token_ids is not None:
            token_ids = [int(t) for t in token_ids]
            if len(token_ids) != n:
                raise ValueError(f"token_ids has {len(token_ids)} ids for {n} positions")
        pool, bs = self.pool, self.pool.block_size
        need = self.blocks_needed(n)
        if need > pool.num_available:
            raise OutOfBlocks(need, pool.num_available, pool.num_blocks)
        new = [pool.allocate() for _ in range(need)]
        self.blocks.extend(new)
        start = self.num_tokens
        slots = [self.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
        for p in range(start, start + n):
            pool.fill[self.blocks[p // bs]] = p % bs + 1
        self.num_tokens += n
        if token_ids is None:
            self.hashable = False
        elif self.hashable:
            self.token_ids.extend(token_ids)
            while len(self.keys) < self.num_tokens // bs:  # blocks that just became full
                i = len(self.keys)
                chunk = self.token_ids[i * bs:(i + 1) * bs]
                key = block_key(self.keys[-1] if self.keys else None, chunk)
                self.keys.append(key)
                pool.register(self.blocks[i], key, chunk)
        return slots

    def slot(self, pos: int) -> int:
        bs = self.pool.block_size
        return self.blocks[pos // bs] * bs + pos % bs

    def release(self) -> None:
        """Give every block back (last block first: tails are evicted before shared prefixes)."""
        for b in reversed(self.blocks):
            self.pool.free(b)
        self.blocks, self.num_tokens, self.token_ids, self.keys, self.hashable = [], 0, [], [], True

    def __len__(self):
        return self.num_tokens

    def __repr__(self):
        return f"BlockTable({self.num_tokens} positions in blocks {self.blocks})"
