"""Notebook 02 (the KV cache): where a static cache writes, how big a cache is, and the decode
speed limit that memory bandwidth sets."""
from __future__ import annotations

import torch

from . import case, exercise


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (), generator=g))


# ---- 1. a static cache write ------------------------------------------------------------------------------------------
def ref_static_cache_write(cache: torch.Tensor, input_pos: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    out = cache.clone()
    out[:, :, input_pos] = new  # dim 2 holds the positions
    return out[:, :, : int(input_pos.max()) + 1]


def _cache(B, H, S, D, filled, g, dtype=torch.float32):
    """A (B, H, S, D) cache with positions 0..filled-1 holding values (a prompt and earlier steps)
    and the rest zeros, as a StaticKVCache holds them."""
    c = torch.zeros(B, H, S, D, dtype=dtype)
    c[:, :, :filled] = torch.randn(B, H, filled, D, generator=g).to(dtype)
    return c


def _new(B, H, T, D, g, dtype=torch.float32):
    return (torch.randn(B, H, T, D, generator=g) + 3.0).to(dtype)  # + 3: never mistaken for a zero slot


@exercise("static_cache_write", reference=ref_static_cache_write,
          hint="positions are dim 2 of the (B, n_kv_head, max_seq_len, head_dim) cache: write new[:, :, t] at "
               "position input_pos[t] for every sequence and head (on a copy: cache.clone()), then return "
               "positions 0 .. max(input_pos), that is [:, :, :max + 1]")
def _static_cache_write_cases(g):
    B, H, S, D = 2, 3, 12, 4  # H != T and S != D, so a write along the wrong dim cannot line up
    yield case("prefill: 5 positions into an empty cache", _cache(B, H, S, D, 0, g), torch.arange(5),
               _new(B, H, 5, D, g))
    yield case("one decode step at position 7 after 7 filled", _cache(B, H, S, D, 7, g), torch.tensor([7]),
               _new(B, H, 1, D, g))
    yield case("a step at the last slot: the whole cache is valid", _cache(B, H, S, D, S - 1, g),
               torch.tensor([S - 1]), _new(B, H, 1, D, g))
    yield case("a chunk 6..8 after 6 filled (chunked prefill)", _cache(B, H, S, D, 6, g), torch.arange(6, 9),
               _new(B, H, 3, D, g))
    yield case("rewrite 3..4 with stale entries beyond (a rolled-back draft)", _cache(B, H, S, D, 9, g),
               torch.tensor([3, 4]), _new(B, H, 2, D, g))
    yield case("position 0 alone: a prefix of one", _cache(1, 2, 8, 8, 0, g), torch.tensor([0]), _new(1, 2, 1, 8, g))
    yield case("bfloat16 cache, batch 3, 2 KV heads", _cache(3, 2, 10, 6, 4, g, torch.bfloat16), torch.tensor([4]),
               _new(3, 2, 1, 6, g, torch.bfloat16))
    for _ in range(3):
        B, H, S, D = _randint(1, 4, g), _randint(1, 5, g), _randint(4, 24, g), _randint(2, 9, g)
        filled = _randint(0, S, g)
        T = _randint(1, S - filled + 1, g)
        yield case("random shapes: T positions right after the filled ones", _cache(B, H, S, D, filled, g),
                   torch.arange(filled, filled + T), _new(B, H, T, D, g))


# ---- 2. the size of a KV cache ----------------------------------------------------------------------------------------
def ref_kv_cache_size_bytes(n_layer: int, n_head: int, n_kv_head: int, hidden_size: int, context: int,
                            batch: int, dtype_bytes: int) -> int:
    head_dim = hidden_size // n_head
    return 2 * n_layer * n_kv_head * head_dim * context * batch * dtype_bytes  # 2: K and V


@exercise("kv_cache_size_bytes", reference=ref_kv_cache_size_bytes,
          hint="K and V (2) for every layer, every KV head (n_kv_head, not n_head: grouped-query attention "
               "stores fewer heads than it queries), head_dim = hidden_size // n_head values each, for every "
               "position of every sequence, times the bytes per value")
def _kv_cache_size_cases(g):
    # (label, n_layer, n_head, n_kv_head, hidden_size, context, batch, dtype_bytes)
    yield case("multi-head attention (Llama-2-7B), 4096 tokens, bf16", 32, 32, 32, 4096, 4096, 1, 2)
    yield case("GQA: Qwen2.5-7B (28 query heads, 4 KV heads), 32k tokens, bf16", 28, 28, 4, 3584, 32768, 1, 2)
    yield case("GQA: Llama-3-8B, 128k tokens, batch 1, fp8", 32, 32, 8, 4096, 131072, 1, 1)
    yield case("multi-query attention (1 KV head), batch 8, fp32", 24, 16, 1, 2048, 2048, 8, 4)
    yield case("the embedded model (SmolLM2-135M), batch 4, 1 token, fp16", 30, 9, 3, 576, 1, 4, 2)
    yield case("Llama-2-70B (64 query heads, 8 KV heads), batch 16", 80, 64, 8, 8192, 4096, 16, 2)
    for _ in range(3):
        n_kv_head = _randint(1, 9, g)
        n_head = n_kv_head * _randint(1, 8, g)
        yield case("random GQA config", _randint(1, 81, g), n_head, n_kv_head, n_head * 2 ** _randint(5, 8, g),
                   _randint(1, 65536, g), _randint(1, 33, g), [1, 2, 4][_randint(0, 3, g)])


# ---- 3. the bandwidth bound on decode speed ---------------------------------------------------------------------------
def ref_decode_tok_s_memory_bound(weight_bytes: float, kv_bytes_per_token: float, batch: int, context: int,
                                  bandwidth_gbps: float) -> float:
    step_bytes = weight_bytes + batch * context * kv_bytes_per_token  # weights once, every sequence's cache
    return batch * bandwidth_gbps * 1e9 / step_bytes  # batch tokens per step


@exercise("decode_tok_s_memory_bound", reference=ref_decode_tok_s_memory_bound,
          hint="one step reads the weights once (shared by the batch) plus each sequence's KV cache (batch x "
               "context x bytes per token); at bandwidth_gbps * 1e9 bytes/s that takes step_bytes / bandwidth "
               "seconds, and it emits one token per sequence: batch / seconds")
def _decode_bound_cases(g):
    qwen_w, qwen_kv = 14.15e9, 57344  # Qwen2.5-7B in bf16: bytes read per step, KV bytes per token
    # (label, weight_bytes, kv_bytes_per_token, batch, context, bandwidth_gbps)
    yield case("batch 1, empty cache: the weights alone", qwen_w, qwen_kv, 1, 0, 3000.0)
    yield case("batch 1, 32k tokens of cache", qwen_w, qwen_kv, 1, 32768, 3000.0)
    yield case("batch 64, 4k tokens each: the caches outweigh the weights", qwen_w, qwen_kv, 64, 4096, 4000.0)
    yield case("batch 256, 100 tokens each", qwen_w, qwen_kv, 256, 100, 4000.0)
    yield case("a small model on a laptop GPU", 2.7e8, 46080, 1, 512, 300.0)
    for _ in range(3):
        yield case("random", float(_randint(10**8, 10**11, g)), float(_randint(10**4, 10**6, g)),
                   _randint(1, 513, g), _randint(0, 32769, g), float(_randint(100, 8001, g)))
