"""Notebook 06's exercises: plausible wrong answers fail, naming the case that shows the mistake;
the references agree with labutils.paged_cache and labutils.scheduler."""
from __future__ import annotations

import pytest

from labutils.exercises import EXERCISES
from labutils.exercises import ch06
from labutils.paged_cache import BlockPool, BlockTable
from labutils.scheduler import bucket_for, decode_buckets
from conftest import assert_fails_naming_the_case

NAMES = {"append_slots", "paged_kv_utilization", "reusable_prefix", "decode_bucket"}


def test_notebook_06_exercises_are_registered():
    assert NAMES <= set(EXERCISES)


# ---- wrong answers ------------------------------------------------------------------------------------------------
def _off_by_one_blocks(blocks, num_tokens, n, free, block_size):
    """floor + 1 instead of ceil: one block too many when the positions fill their blocks exactly."""
    blocks, free = list(blocks), list(free)
    for _ in range(max(0, (num_tokens + n) // block_size + 1 - len(blocks))):
        blocks.append(free.pop(0))
    return blocks, [blocks[p // block_size] * block_size + p % block_size for p in range(num_tokens, num_tokens + n)]


def _logical_slots(blocks, num_tokens, n, free, block_size):
    """Slots as logical positions: the block table is not looked up."""
    got, _ = ch06.ref_append_slots(blocks, num_tokens, n, free, block_size)
    return got, list(range(num_tokens, num_tokens + n))


def _mutates(blocks, num_tokens, n, free, block_size):
    """Right values, but appends to the caller's lists."""
    need = -(-(num_tokens + n) // block_size) - len(blocks)
    for _ in range(max(0, need)):
        blocks.append(free.pop(0))
    return blocks, [blocks[p // block_size] * block_size + p % block_size for p in range(num_tokens, num_tokens + n)]


def _util_per_sequence_mean(lengths, block_size):
    """The mean of each sequence's utilization, not positions over slots."""
    fr = [L / (-(-L // block_size) * block_size) for L in lengths if L]
    return sum(fr) / len(fr) if fr else 1.0


def _util_no_empty_guard(lengths, block_size):
    return sum(lengths) / (sum(-(-L // block_size) for L in lengths) * block_size)


def _prefix_not_rounded(prompt, cached, block_size):
    best = 0
    for c in cached:
        k = 0
        while k < min(len(prompt), len(c)) and prompt[k] == c[k]:
            k += 1
        best = max(best, k)
    return min(best, len(prompt) - 1)


def _prefix_whole_prompt(prompt, cached, block_size):
    """Rounded to blocks, but a fully cached prompt is reused whole (no last token to compute)."""
    best = 0
    for c in cached:
        k = 0
        while k < min(len(prompt), len(c)) and prompt[k] == c[k]:
            k += 1
        best = max(best, k)
    return best // block_size * block_size


def _bucket_uncapped(n, max_batch):
    b = 1
    while b < n:
        b *= 2
    return b


def _bucket_next_power_always(n, max_batch):
    """The next power of two strictly above n."""
    b = 1
    while b <= n:
        b *= 2
    return min(b, max_batch)


WRONG = [("append_slots", _off_by_one_blocks, "block size 1", "got [4, 0, 9, 8, 7], expected [4, 0, 9, 8]"),
         ("append_slots", _logical_slots, "empty table, a prompt of 5", "first wrong item"),
         ("append_slots", _mutates, "empty table", "changed its inputs in place"),
         ("paged_kv_utilization", _util_per_sequence_mean, "a short and a long sequence", "got 0.53125, expected 0.6875"),
         ("paged_kv_utilization", _util_no_empty_guard, "nothing held at all", "raised ZeroDivisionError"),
         ("reusable_prefix", _prefix_not_rounded, "a common prefix of 5", "got 5, expected 4"),
         ("reusable_prefix", _prefix_whole_prompt, "the prompt entirely cached", "got 8, expected 4"),
         ("decode_bucket", _bucket_uncapped, "max_batch not a power of two", "got 64, expected 48"),
         ("decode_bucket", _bucket_next_power_always, "one sequence", "got 2, expected 1")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


# ---- the references against the package ---------------------------------------------------------------------------
@pytest.mark.parametrize("bs, steps", [(4, (5, 1, 1, 3, 0, 9)), (1, (2, 2)), (16, (40, 1, 30))])
def test_append_slots_reference_is_the_block_tables(bs, steps):
    """The same sequence of appends through BlockTable and through the reference (its free list in
    the pool's order) gives the same blocks and slots."""
    pool = BlockPool(1, 32, bs, 1, 16)
    table = BlockTable(pool)
    blocks, free, L = [], list(pool.free_ids), 0
    for n in steps:
        slots = table.append_slots(n)
        blocks, want = ch06.ref_append_slots(blocks, L, n, free, bs)
        free = [b for b in free if b not in blocks]
        L += n
        assert (table.blocks, slots) == (blocks, want)


def test_kv_utilization_reference_is_the_pools():
    pool = BlockPool(1, 64, 8, 1, 16)
    lengths = [1, 8, 9, 30, 0]
    for L in lengths:
        BlockTable(pool).append_slots(L)
    assert pool.stats()["kv_utilization"] == pytest.approx(ch06.ref_paged_kv_utilization(lengths, 8))


def test_reusable_prefix_reference_is_the_prefix_cache():
    pool = BlockPool(1, 64, 4, 1, 16)
    first = list(range(1, 12))
    t = BlockTable(pool)
    t.append_slots(len(first), first)
    t.release()  # its full blocks stay cached
    for prompt in ([1, 2, 3, 4, 5, 6, 7, 8, 20], first, first[:8], [1, 2, 3, 9, 9], first + [5, 5, 5]):
        t = BlockTable(pool)
        assert t.use_cached_prefix(prompt) == ch06.ref_reusable_prefix(prompt, [first], 4), prompt
        t.release()


@pytest.mark.parametrize("m", [1, 2, 7, 48, 64, 257])
def test_decode_bucket_reference_is_the_schedulers(m):
    assert all(ch06.ref_decode_bucket(n, m) == bucket_for(n, decode_buckets(m)) for n in range(1, m + 1))
