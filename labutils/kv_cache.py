"""KV caches for the decoder's cache seam (notebook 02).

A cache holds each layer's keys and values for every position seen so far, so a decode step
computes q, k, v for the new token only and attends over the stored past. Both classes implement
the one method the seam calls::

    update(input_pos, k, v) -> (k_all, v_all)
      k, v:         (B, n_kv_head, T, head_dim)   the new tokens' keys/values
      input_pos:    (T,) or (B, T)                their positions
      k_all, v_all: (B, n_kv_head, S, head_dim)   keys/values at positions 0 .. S-1

``StaticKVCache`` preallocates ``max_seq_len`` positions and writes at ``input_pos``: shapes never
change, so a decode step can be captured once in a CUDA graph and replayed. Positions not yet
written hold zeros; the causal mask (key position <= query position) hides them.
``ConcatKVCache`` grows by concatenation: simple, but every step allocates and copies the whole
cache, and its shapes change every step.
"""
from __future__ import annotations

import torch


class StaticKVCache(torch.nn.Module):
    def __init__(self, batch: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos, k, v):
        if input_pos.dim() == 1:  # the same positions for every sequence
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:  # (B, T): each sequence at its own positions
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is (B, T, n_kv_head, head_dim)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v

    def reset(self):
        self.k.zero_()
        self.v.zero_()


class ConcatKVCache:
    """Appends each step's keys/values with torch.cat; positions must arrive in order from 0."""

    def __init__(self):
        self.k = self.v = None

    def update(self, input_pos, k, v):
        start = 0 if self.k is None else self.k.shape[2]
        if int(input_pos.reshape(-1)[0]) != start:
            raise ValueError(f"ConcatKVCache expects position {start} next, got {int(input_pos.reshape(-1)[0])}")
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reset(self):
        self.k = self.v = None


def static_caches(model, batch: int, max_seq_len: int, dtype=None, device=None) -> list[StaticKVCache]:
    """One StaticKVCache per layer of the lab decoder ``model``, in its dtype and on its device."""
    c = model.cfg
    if max_seq_len > c.max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {c.max_seq_len}")
    dtype, device = dtype or model.dtype, device or model.device
    return [StaticKVCache(batch, c.n_kv_head, max_seq_len, c.head_dim, dtype, device) for _ in range(c.n_layer)]


def concat_caches(model) -> list[ConcatKVCache]:
    return [ConcatKVCache() for _ in range(model.cfg.n_layer)]
