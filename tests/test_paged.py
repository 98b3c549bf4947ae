"""The paged KV cache (labutils.paged_cache, labutils.paged_attention, notebook 06): the block pool's
allocation, reference counts, prefix cache and LRU eviction; the Triton paged decode kernel against a
float64 reference in the interpreter (scattered pages, unused pages poisoned with NaN); write_kv;
and the decoder end to end: prompts of different lengths batched through PagedKVCache, mixed with
late arrivals and prefix hits, give the tokens and logits of each prompt run alone with the static cache."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_rel_close, prompts_of, tiny_hf_model
from labutils.attention import naive_attention
from labutils.decoder import Decoder
from labutils.kv_cache import static_caches
from labutils.paged_attention import (PagedKVCache, gather_kv, make_batch, paged_caches, paged_decode,
                                      paged_decode_ref, paged_prefill, paged_prefill_triton, write_kv)
from labutils.paged_cache import BlockPool, BlockTable, OutOfBlocks, block_key

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}  # as tests/test_flash_attention.py, vs float64
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16"}
LOGITS_TOL = 1e-4  # fp32 decoder outputs, as tests/test_decoder.py


def pool_of(num_blocks, block_size, n_layer=1, n_kv_head=1, head_dim=16, dtype=torch.float32):
    return BlockPool(n_layer, num_blocks, block_size, n_kv_head, head_dim, dtype=dtype)


# ---- the block pool ---------------------------------------------------------------------------------
def test_allocate_free_and_refcounts():
    pool = pool_of(3, 4)
    got = [pool.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and pool.num_available == 0
    with pytest.raises(OutOfBlocks) as e:
        pool.allocate()
    assert isinstance(e.value, RuntimeError) and e.value.available == 0 and e.value.num_blocks == 3
    pool.incref(got[0])  # shared by two owners
    pool.free(got[0])
    assert pool.num_available == 0, "a block with a reference left went back to the free list"
    pool.free(got[0])
    assert pool.num_available == 1 and pool.allocate() == got[0]
    pool.free(got[1])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(got[1])
    with pytest.raises(ValueError, match="is free"):
        pool.incref(got[1])
    with pytest.raises(ValueError, match="outside"):
        pool.free(7)


def test_block_table_slots_and_release():
    pool = pool_of(6, 4)
    other = BlockTable(pool)
    other.append_slots(1)  # takes a block first, so the table's blocks are not 0, 1, 2
    t = BlockTable(pool)
    s1 = t.append_slots(6)
    s2 = t.append_slots(3)
    assert len(t.blocks) == 3 and t.num_tokens == 9 and len(t) == 9
    assert s1 + s2 == [t.blocks[p // 4] * 4 + p % 4 for p in range(9)] == [t.slot(p) for p in range(9)]
    assert len(set(s1 + s2)) == 9 and not set(s1 + s2) & {other.blocks[0] * 4 + i for i in range(4)}
    assert t.append_slots(0) == [] and t.blocks_needed(3) == 0 and t.blocks_needed(4) == 1
    s = pool.stats()
    assert (s["in_use"], s["free"], s["tokens_stored"], s["slots_allocated"]) == (4, 2, 10, 16)
    assert s["kv_utilization"] == 10 / 16
    t.release()
    assert t.blocks == [] and t.num_tokens == 0 and pool.stats()["free"] == 5
    with pytest.raises(ValueError):
        t.append_slots(-1)


def test_out_of_blocks_leaves_the_table_unchanged():
    pool = pool_of(3, 4)
    a, b = BlockTable(pool), BlockTable(pool)
    a.append_slots(5)  # 2 blocks
    b.append_slots(2)  # 1 block
    before = (list(b.blocks), b.num_tokens, pool.num_available)
    with pytest.raises(OutOfBlocks) as e:
        b.append_slots(7)  # 2 + 7 = 9 positions: 2 more blocks, none left
    assert e.value.needed == 2 and e.value.available == 0
    assert (b.blocks, b.num_tokens, pool.num_available) == before
    with pytest.raises(OutOfBlocks):  # make_batch checks the whole step before touching any table
        make_batch([b, a], [[1, 2], [3, 4, 5, 6]])
    assert (b.blocks, b.num_tokens, a.num_tokens) == (before[0], 2, 5)
    a.release()
    assert b.append_slots(7)[-1] == b.slot(8)


def test_prefix_hits_follow_the_whole_prefix():
    pool = pool_of(8, 4)
    prompt = list(range(10, 20))  # 10 tokens: 2 full blocks and 2 more
    a = BlockTable(pool)
    a.append_slots(10, prompt)
    assert len(a.keys) == 2 and pool.key[a.blocks[0]] == block_key(None, prompt[:4])
    assert pool.key[a.blocks[1]] == block_key(block_key(None, prompt[:4]), prompt[4:8])
    hit = pool.lookup(prompt)
    assert hit == a.blocks[:2] and [pool.ref_count[x] for x in hit] == [2, 2]
    for x in hit:
        pool.free(x)
    # the same second block after a different first one is not a hit: keys chain the whole prefix
    assert pool.lookup([0, 0, 0, 0] + prompt[4:8]) == []
    assert pool.lookup(prompt[:3]) == []  # no full block
    a.release()
    s = pool.stats()
    assert (s["cached"], s["in_use"], s["free"]) == (2, 0, 6), "full blocks are kept for reuse at refcount 0"
    b = BlockTable(pool)
    assert b.use_cached_prefix(prompt + [99]) == 8 and b.blocks == hit
    assert [pool.ref_count[x] for x in hit] == [1, 1] and pool.stats()["cached"] == 0
    slots = b.append_slots(3, prompt[8:] + [99])
    assert slots[0] == b.slot(8) and len(b.blocks) == 3
    b.release()
    c = BlockTable(pool)  # a prompt of exactly 2 cached blocks: the last block is computed again
    assert c.use_cached_prefix(prompt[:8]) == 4 and c.blocks == hit[:1]
    assert c.append_slots(4, prompt[4:8]) and c.blocks[1] != hit[1]
    assert pool.by_key[block_key(block_key(None, prompt[:4]), prompt[4:8])] == hit[1], "the first copy stays cached"
    with pytest.raises(ValueError, match="empty"):
        c.use_cached_prefix(prompt)


def test_lru_eviction_only_when_needed():
    pool = pool_of(4, 2)
    seqs = [[1, 2], [3, 4], [5, 6]]
    tables = [BlockTable(pool) for _ in seqs]
    for t, s in zip(tables, seqs):
        t.append_slots(2, s)
    blocks = [t.blocks[0] for t in tables]
    for t in tables:  # released in order: [1, 2] is the least recently used
        t.release()
    assert pool.stats()["cached"] == 3 and pool.stats()["free"] == 1
    assert pool.lookup([3, 4]) == [blocks[1]]  # a hit: [3, 4] is in use again
    pool.free(blocks[1])  # back to refcount 0: now the most recently used
    keep = BlockTable(pool)
    keep.append_slots(2)  # the clean free block first: no eviction
    assert pool.stats()["cached"] == 3
    keep.append_slots(2)  # evicts the LRU cached block: [1, 2]
    assert pool.lookup([1, 2]) == [] and pool.stats()["cached"] == 2
    held = pool.lookup([5, 6])  # referenced again: not evictable
    assert held == [blocks[2]]
    keep.append_slots(2)  # evicts [3, 4]
    assert pool.lookup([3, 4]) == [] and pool.stats()["cached"] == 0
    with pytest.raises(OutOfBlocks):
        keep.append_slots(2)
    assert pool.lookup([5, 6]) == held and pool.ref_count[blocks[2]] == 2  # still cached
    s = pool.stats()
    assert s["prefix_hit_blocks"] >= 3 and s["in_use"] == 4 and s["free"] == 0


def test_release_frees_tails_first():
    pool = pool_of(3, 2)
    t = BlockTable(pool)
    t.append_slots(6, [1, 2, 3, 4, 5, 6])
    blocks = list(t.blocks)
    t.release()
    BlockTable(pool).append_slots(2)  # evicts one cached block: the tail, not the shared-prefix head
    assert pool.lookup([1, 2, 3, 4, 5, 6]) == blocks[:2]


# ---- the Triton paged decode kernel --------------------------------------------------------------------
def scattered_batch(lens, block_size, num_blocks, seed):
    """Block tables for sequences of the given lengths over pages taken in a random order, padded with 0."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for L in lens:
        n = -(-L // block_size)
        tables.append(order[used:used + n])
        used += n
    assert used <= num_blocks
    bt = torch.zeros(len(lens), max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    return bt, torch.tensor(lens, dtype=torch.int32), tables


def poisoned_caches(num_blocks, KV, block_size, d, tables, lens, dtype, seed):
    """K/V caches with random values at every position a sequence holds and NaN everywhere else."""
    g = torch.Generator().manual_seed(seed)
    k = torch.full((num_blocks, KV, block_size, d), float("nan"))
    v = torch.full_like(k, float("nan"))
    for t, L in zip(tables, lens):
        for p in range(L):
            k[t[p // block_size], :, p % block_size] = torch.randn(KV, d, generator=g)
            v[t[p // block_size], :, p % block_size] = torch.randn(KV, d, generator=g)
    return k.to(dtype), v.to(dtype)


def float64_reference(q, k_cache, v_cache, bt, lens):
    return paged_decode_ref(q.double(), k_cache.double(), v_cache.double(), bt, lens)


def check(out, ref, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"{what}: ||out - ref|| / ||ref|| = {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_against_float64(block_size, dtype):
    """Four sequences (1 position, one page exactly, a page and 3, five pages less one) over pages in
    a random order, GQA 4 query heads per KV head; split 1, 2 and 5 ways, 16- and 32-position tiles."""
    H, KV, d = 8, 2, 16
    lens = [1, block_size, block_size + 3, 5 * block_size - 1]
    bt, cl, tables = scattered_batch(lens, block_size, 14, seed=block_size)
    kc, vc = poisoned_caches(14, KV, block_size, d, tables, lens, dtype, seed=1)
    q = torch.randn(len(lens), H, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = float64_reference(q, kc, vc, bt, cl)
    assert torch.isfinite(ref).all()
    for num_splits, block_n in ((1, 16), (2, 32), (5, 16)):
        out = paged_decode(q, kc, vc, bt, cl, num_splits=num_splits, block_n=block_n)
        assert torch.isfinite(out).all(), f"{num_splits} splits: a slot outside a sequence's pages was read"
        check(out, ref, dtype, f"block_size {block_size}, {num_splits} splits, tiles of {block_n}")


@pytest.mark.parametrize("H,KV,d", [(2, 2, 64), (4, 1, 128)], ids=["mha-d64", "mqa-d128"])
def test_paged_decode_head_dims(H, KV, d):
    """head_dim 64 and 128, multi-head and multi-query; the default number of splits; q a strided view."""
    lens = [20, 45]
    bt, cl, tables = scattered_batch(lens, 16, 6, seed=d)
    kc, vc = poisoned_caches(6, KV, 16, d, tables, lens, torch.float16, seed=3)
    q = torch.randn(H, len(lens), d, generator=torch.Generator().manual_seed(4)).half().transpose(0, 1)
    check(paged_decode(q, kc, vc, bt, cl), float64_reference(q, kc, vc, bt, cl), torch.float16, f"H={H} KV={KV} d={d}")


def test_paged_decode_reference_is_attention():
    """The reference itself: gathering pages in table order gives the contiguous keys back."""
    lens = [7, 33]
    bt, cl, tables = scattered_batch(lens, 16, 5, seed=0)
    kc, vc = poisoned_caches(5, 2, 16, 16, tables, lens, torch.float32, seed=0)
    q = torch.randn(2, 4, 16, dtype=torch.float64)
    ref = float64_reference(q, kc, vc, bt, cl)
    for b, L in enumerate(lens):
        k = torch.stack([kc[tables[b][p // 16], :, p % 16] for p in range(L)], 1).double()[None]  # (1, KV, L, d)
        v = torch.stack([vc[tables[b][p // 16], :, p % 16] for p in range(L)], 1).double()[None]
        scores = torch.einsum("hd,hld->hl", q[b], k[0].repeat_interleave(2, 0)) / math.sqrt(16)
        want = torch.einsum("hl,hld->hd", scores.softmax(-1), v[0].repeat_interleave(2, 0))
        assert torch.allclose(ref[b], want, rtol=1e-12, atol=1e-12)
        assert torch.equal(naive_attention(q[b][None, :, None], k, v, torch.tensor([L - 1]))[0, :, 0], ref[b])


def test_paged_decode_refuses_bad_input():
    kc = torch.zeros(4, 2, 16, 16)
    q, bt, cl = torch.zeros(2, 4, 16), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        paged_decode(q, kc, kc, bt.long(), cl)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode(torch.zeros(2, 4, 32), kc, kc, bt, cl)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode(torch.zeros(2, 3, 16), kc, kc, bt, cl)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode(q, kc, kc, bt, torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="bfloat16"):  # the interpreter's bf16 dots are wrong: refused
        paged_decode(q.bfloat16(), kc.bfloat16(), kc.bfloat16(), bt, cl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_prefill_triton_against_float64(block_size, dtype):
    """A ragged step over a NaN-poisoned pool: a 37-token prompt, a 5-token chunk after 20 cached
    positions, a decode after 1, a 17-token prompt; GQA 2 query heads per KV head; tiles 16 x 16
    and 32 x 16 (query x key)."""
    g = torch.Generator().manual_seed(block_size)
    pool = BlockPool(1, 12, block_size, 2, 16, dtype=dtype)
    pool.kv.fill_(float("nan"))
    BlockTable(pool).append_slots(block_size + 1)  # someone else's pages first: tables are not 0, 1, 2...
    tables = [BlockTable(pool) for _ in range(4)]
    for t, before in zip(tables, (0, 20, 1, 0)):
        if before:
            slots = torch.tensor(t.append_slots(before))
            write_kv(pool, 0, slots, torch.randn(before, 2, 16, generator=g).to(dtype),
                     torch.randn(before, 2, 16, generator=g).to(dtype))
    batch = make_batch(tables, [[1] * 37, [2] * 5, [3], [4] * 17])
    N = batch.num_tokens
    write_kv(pool, 0, batch.slot_mapping, torch.randn(N, 2, 16, generator=g).to(dtype),
             torch.randn(N, 2, 16, generator=g).to(dtype))
    q = torch.randn(N, 4, 16, generator=g).to(dtype)
    kc, vc = pool.k_cache(0), pool.v_cache(0)
    ref = paged_prefill(q.double().transpose(0, 1)[None], kc.double(), vc.double(), batch, range(4), naive_attention)
    ref = torch.cat([ref[i][0].transpose(0, 1) for i in range(4)])  # (N, n_head, head_dim)
    for block in (None, (32, 16)):
        out = paged_prefill_triton(q, kc, vc, batch.block_tables, batch.context_lens, batch.query_start_t,
                                   batch.max_query_len, block=block)
        assert torch.isfinite(out).all(), f"tiles {block}: an unwritten slot or a future position was read"
        check(out, ref, dtype, f"paged prefill, block_size {block_size}, tiles {block}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
def test_write_kv(dtype):
    pool = BlockPool(2, 5, 4, 2, 16, dtype=dtype)
    t = BlockTable(pool)
    BlockTable(pool).append_slots(5)  # someone else's blocks first
    slots = torch.tensor(t.append_slots(7))
    k, v = torch.randn(7, 2, 16).to(dtype), torch.randn(7, 2, 16).to(dtype)
    write_kv(pool, 1, slots, k, v)
    assert pool.kv[0].abs().sum() == 0, "layer 0 was written"
    gk, gv = gather_kv(pool.k_cache(1), pool.v_cache(1), torch.tensor(t.blocks), 7)  # (1, n_kv_head, 7, d)
    assert torch.equal(gk[0].transpose(0, 1), k) and torch.equal(gv[0].transpose(0, 1), v)
    assert int((pool.kv[1] != 0).any(-1).sum()) == 2 * 7 * 2, "a slot outside the mapping was written"
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(pool, 0, slots[:3], k, v)


# ---- the decoder end to end -------------------------------------------------------------------------------
@torch.no_grad()
def alone(model, prompt, n):
    """Greedy decoding of one prompt with the static cache: n tokens and the logits that chose them (n, vocab)."""
    T = len(prompt)
    with model.kv_caches_attached(static_caches(model, 1, T + n)):
        logits = model(prompt[None], torch.arange(T), last_only=True)[0, -1]
        tokens, all_logits = [], []
        for i in range(n):
            tokens.append(int(logits.argmax()))
            all_logits.append(logits)
            if i + 1 < n:
                logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([T + i]), last_only=True)[0, -1]
    return tokens, torch.stack(all_logits)


@torch.no_grad()
def paged_greedy(model, arrivals, n, pool, decode="triton", prefix=False, prefill="torch"):
    """A minimal continuous-batching loop over PagedKVCache: arrivals [(step, prompt)], every running
    sequence advances each step (prefill of newcomers mixed with decodes of the others), retires after
    n tokens. Returns each sequence's tokens and logits, and the number of prompt positions reused."""
    tables, feed, tokens, logits = {}, {}, {i: [] for i in range(len(arrivals))}, {i: [] for i in range(len(arrivals))}
    reused, step = 0, 0
    with model.kv_caches_attached(paged_caches(pool, decode, prefill)):
        while step == 0 or tables:
            for i, (at, prompt) in enumerate(arrivals):
                if at == step:
                    tables[i] = BlockTable(pool)
                    cached = tables[i].use_cached_prefix(prompt.tolist()) if prefix else 0
                    reused += cached
                    feed[i] = prompt[cached:].tolist()
            order = sorted(tables)
            batch = make_batch([tables[i] for i in order], [feed[i] for i in order])
            with pool.step(batch):
                out = model(batch.input_ids, batch.input_pos, logits_at=batch.last_token_index)[0]  # (B, vocab)
            for row, i in enumerate(order):
                tokens[i].append(int(out[row].argmax()))
                logits[i].append(out[row])
                feed[i] = [tokens[i][-1]]
                if len(tokens[i]) == n:
                    tables.pop(i).release()
            step += 1
    return tokens, {i: torch.stack(v) for i, v in logits.items()}, reused


def check_against_alone(model, arrivals, n, got_tokens, got_logits, what):
    for i, (_, prompt) in enumerate(arrivals):
        ref_tokens, ref_logits = alone(model, prompt, n)
        assert got_tokens[i] == ref_tokens, \
            f"{what}, sequence {i} ({len(prompt)} tokens): {got_tokens[i]} vs alone {ref_tokens}"
        assert_rel_close(got_logits[i], ref_logits, LOGITS_TOL, f"{what}, sequence {i} logits")


@pytest.fixture(scope="module")
def tiny():
    return Decoder.from_hf(tiny_hf_model("llama-gqa-tied", seed=1))


@pytest.mark.parametrize("decode", ["triton", "torch"])
def test_paged_greedy_equals_alone_tiny(tiny, decode):
    """Three prompts (5, 21, 37 tokens: within one page, across two, across three) prefilled in one
    ragged step, then decoded together, block size 16."""
    arrivals = [(0, torch.tensor(p)) for p in prompts_of((5, 21, 37), tiny.cfg.vocab_size, seed=0)]
    pool = BlockPool.for_model(tiny, 16, 16)
    tokens, logits, _ = paged_greedy(tiny, arrivals, 10, pool, decode)
    check_against_alone(tiny, arrivals, 10, tokens, logits, f"paged ({decode} decode)")
    s = pool.stats()
    assert s["in_use"] == 0 and s["free"] + s["cached"] == 16, "blocks leaked"


@pytest.mark.parametrize("prefill", ["torch", "triton"])
def test_paged_mixed_steps_and_prefix_hits_tiny(tiny, prefill):
    """Late arrivals prefill while others decode (mixed steps), one of them shares a 2-page prefix with
    an earlier prompt (its cached pages are reused, only the rest is computed), block size 8; and an
    ordering with the decode sequence after the prefill one."""
    vocab = tiny.cfg.vocab_size
    a, b, tail = map(torch.tensor, prompts_of((19, 9, 6), vocab, seed=3))
    shared = torch.cat([a[:16], tail])  # 16 tokens = two full pages of a, then its own
    arrivals = [(4, shared), (0, a), (2, b)]  # at step 4 the prefill comes first in the batch, then decodes
    pool = BlockPool.for_model(tiny, 24, 8)
    tokens, logits, reused = paged_greedy(tiny, arrivals, 6, pool, "triton", prefix=True, prefill=prefill)
    assert reused == 16, f"expected the 2 shared pages to be reused, {reused} positions were"
    check_against_alone(tiny, arrivals, 6, tokens, logits, f"mixed steps with prefix caching, {prefill} prefill")


def test_paged_cache_refuses_without_a_step(tiny):
    pool = BlockPool.for_model(tiny, 4, 16)
    ids = torch.tensor([[1, 2, 3]])
    with tiny.kv_caches_attached(paged_caches(pool)):
        with pytest.raises(RuntimeError, match="no batch metadata"):
            tiny(ids)
        assert pool.kv.abs().sum() == 0, "a forward without a step wrote into the pool"
        t = BlockTable(pool)
        batch = make_batch([t], [[1, 2, 3]])
        with pool.step(batch):
            with pytest.raises(ValueError, match=r"flattened as \(1, N\)"):
                tiny(torch.tensor([[1, 2], [3, 4]]))
            with pytest.raises(RuntimeError, match="do not nest"):
                with pool.step(batch):
                    pass
            assert pool.batch is batch
        assert pool.batch is None, "the step's metadata outlived its scope"
        with pytest.raises(RuntimeError, match="no batch metadata"):
            tiny(ids)
    assert pool.kv.abs().sum() == 0 and all(layer.self_attn.kv_cache is None for layer in tiny.layers)
    tiny(ids)  # detached: a plain forward, the pool untouched
    assert pool.kv.abs().sum() == 0
    with pytest.raises(TypeError, match="attend"):
        PagedKVCache(pool, 0).update(torch.arange(3), None, None)
    with pytest.raises(ValueError, match="not both"):
        tiny(ids, last_only=True, logits_at=torch.tensor([0]))


def test_paged_greedy_equals_alone_embedded(embedded):
    """Real weights (SmolLM2-135M, fp32, 9 query / 3 KV heads, head_dim 64): three prompts of
    different lengths batched through the paged cache, Triton decode, equal to each run alone."""
    hf, tok = embedded
    model = Decoder.from_hf(hf)
    texts = ["The capital of France is", "Write a haiku about the sea and the moon at night.",
             "List three prime numbers greater than ten, separated by commas:"]
    arrivals = [(0, tok(t, return_tensors="pt").input_ids[0]) for t in texts]
    assert len({len(p) for _, p in arrivals}) == 3
    pool = BlockPool.for_model(model, 8, 16)
    tokens, logits, _ = paged_greedy(model, arrivals, 3, pool, "triton")  # prefill + 2 decode steps
    check_against_alone(model, arrivals, 3, tokens, logits, "embedded, paged")
