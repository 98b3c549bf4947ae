"""Notebook 06 (serving): a block table's allocation, paged KV utilization, the prompt tokens a prefix
cache can reuse, and the padded batch size of a captured decode step."""
from __future__ import annotations

import torch

from . import case, exercise


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


def ref_append_slots(blocks: list[int], num_tokens: int, n: int, free: list[int],
                     block_size: int) -> tuple[list[int], list[int]]:
    blocks = list(blocks)
    free = list(free)
    need = -(-(num_tokens + n) // block_size) - len(blocks)
    for _ in range(max(0, need)):
        blocks.append(free.pop(0))
    slots = [blocks[p // block_size] * block_size + p % block_size for p in range(num_tokens, num_tokens + n)]
    return blocks, slots


@exercise("append_slots", reference=ref_append_slots,
          hint="a sequence of num_tokens + n positions needs ceil((num_tokens + n) / block_size) blocks: take the "
               "missing ones from the front of the free list; position p lives in block blocks[p // block_size] "
               "at offset p % block_size, slot = block * block_size + offset; return (blocks, slots) as new lists")
def _append_slots_cases(g):
    yield case("empty table, a prompt of 5 in blocks of 4", [], 0, 5, [7, 2, 9], 4)
    yield case("the last block has room: no new block", [3], 2, 1, [8], 4)
    yield case("the last block is exactly full: one new block", [3], 4, 1, [8, 1], 4)
    yield case("n = 0: nothing changes", [5, 6], 7, 0, [1], 4)
    yield case("block size 1: one block per token", [4], 1, 3, [0, 9, 8, 7], 1)
    yield case("a chunk spanning three new blocks", [11], 3, 9, [2, 5, 0, 6], 4)
    for _ in range(6):
        bs = [1, 2, 8, 16][_randint(0, 4, g)]
        L, n = _randint(0, 40, g), _randint(0, 30, g)
        perm = torch.randperm(64, generator=g).tolist()
        held = -(-L // bs)
        yield case("random length, chunk and block size", perm[:held], L, n, perm[held:], bs)


def ref_paged_kv_utilization(lengths: list[int], block_size: int) -> float:
    stored = sum(lengths)
    allocated = sum(-(-L // block_size) for L in lengths) * block_size
    return stored / allocated if allocated else 1.0


@exercise("paged_kv_utilization", reference=ref_paged_kv_utilization,
          hint="each sequence of L positions holds ceil(L / block_size) blocks; utilization = all positions / all "
               "slots of the blocks held (block_size per block); no block held at all counts as 1.0")
def _paged_kv_utilization_cases(g):
    yield case("one sequence, one position in a block of 16", [1], 16)
    yield case("lengths that fill their blocks", [16, 32, 48], 16)
    yield case("block size 1: nothing wasted", [3, 17, 250], 1)
    yield case("a short and a long sequence", [1, 32], 16)
    yield case("a sequence of length 0 holds no block", [0, 9], 8)
    yield case("nothing held at all", [0, 0], 8)
    for _ in range(6):
        bs = [4, 16, 32, 128][_randint(0, 4, g)]
        yield case("random lengths", [_randint(1, 1500, g) for _ in range(_randint(1, 20, g))], bs)


def ref_reusable_prefix(prompt: list[int], cached: list[list[int]], block_size: int) -> int:
    best = 0
    for c in cached:
        k = 0
        while k < min(len(prompt), len(c)) and prompt[k] == c[k]:
            k += 1
        best = max(best, k)
    best = best // block_size * block_size  # whole blocks only
    return min(best, (len(prompt) - 1) // block_size * block_size)  # the last token is always computed


@exercise("reusable_prefix", reference=ref_reusable_prefix,
          hint="the longest common prefix with any cached prompt, rounded DOWN to whole blocks (only full blocks "
               "are cached); and at least the prompt's last token must be computed (its logits give the first "
               "output token), so never more than (len(prompt) - 1) // block_size whole blocks")
def _reusable_prefix_cases(g):
    yield case("nothing cached", [1, 2, 3, 4, 5], [], 2)
    yield case("a common prefix of 5 in blocks of 4: one block", [1, 2, 3, 4, 5, 6, 7, 8, 9], [[1, 2, 3, 4, 5, 0]], 4)
    yield case("the prompt entirely cached: its last block is recomputed", [1, 2, 3, 4, 5, 6, 7, 8],
               [[1, 2, 3, 4, 5, 6, 7, 8, 9]], 4)
    yield case("the longest of several cached prompts", [5, 5, 5, 5, 6, 6, 6, 6, 1],
               [[5, 5, 9], [5, 5, 5, 5, 6, 6, 6, 6, 2], [5, 5, 5, 5, 6, 1]], 4)
    yield case("first token differs", [3, 1, 1, 1, 1], [[2, 1, 1, 1, 1]], 1)
    yield case("block size 1, prompt cached whole", [4, 4, 4], [[4, 4, 4]], 1)
    for _ in range(6):
        bs = [1, 2, 4, 8][_randint(0, 4, g)]
        head = torch.randint(0, 4, (_randint(0, 20, g),), generator=g).tolist()
        prompt = head + torch.randint(0, 4, (_randint(1, 12, g),), generator=g).tolist()
        cached = [head[:_randint(0, len(head) + 1, g)] + torch.randint(0, 4, (_randint(0, 10, g),), generator=g).tolist()
                  for _ in range(_randint(0, 4, g))]
        yield case("random prompts over 4 token ids", prompt, cached, bs)


def ref_decode_bucket(n: int, max_batch: int) -> int:
    b = 1
    while b < n and b < max_batch:
        b *= 2
    return min(b, max_batch)


@exercise("decode_bucket", reference=ref_decode_bucket,
          hint="the smallest power of two >= n, but never more than max_batch (the largest bucket is max_batch "
               "itself, a power of two or not)")
def _decode_bucket_cases(g):
    yield case("one sequence", 1, 64)
    yield case("a power of two", 16, 64)
    yield case("just past a power of two", 17, 64)
    yield case("max_batch not a power of two", 40, 48)
    yield case("n == max_batch", 48, 48)
    yield case("max_batch 1", 1, 1)
    for _ in range(5):
        m = _randint(1, 300, g)
        yield case("random n <= max_batch", _randint(1, m + 1, g), m)
