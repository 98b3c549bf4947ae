"""KV caches for the decoder's cache seam (notebook 02).

A cache holds each layer's keys and values for every position seen so far, so a decode step
computes q, k, v for the new token only and attends over the stored past. Both classes implement
the one method the seam calls::

    update(input_pos, k, v) -> (k_all, v_all)
      k, v:         (B, n_kv_head, T, head_dim)   the new tokens' keys/values
      input_pos:    (T,) or (B, T)                their positions
      k_all, v_all: (B, n_kv_head, S, head_dim)   keys/values at positions 0 .. S-1

and, as every cache of the seam may, ``attend(q, k, v, input_pos, attn_fn) -> y``: the decoder
calls it when present, so a cache owns its attention call. Here it is ``update`` then ``attn_fn``
over the returned keys/values (exactly the plain path); a paged cache (labutils.paged_attention,
notebook 06) writes into its block pool and runs its own kernel instead.

``StaticKVCache`` preallocates ``max_seq_len`` positions and writes at ``input_pos``: shapes never
change, so a decode step can be captured once in a CUDA graph and replayed. Positions not yet
written hold zeros; the causal mask (key position <= query position) hides them.
``ConcatKVCache`` grows by concatenation: simple, but every step allocates and copies the whole
cache, and its shapes change every step.
"""
from __future__ import annotations

import torch


def _capturing_or_compiling() -> bool:
    """True while torch.compile traces or a CUDA graph records: no host-side check may run then."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    is_capturing = getattr(torch.cuda, "is_current_stream_capturing", None)
    try:
        return bool(is_capturing is not None and torch.cuda.is_available() and is_capturing())
    except RuntimeError:
        return False


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

    def _check_positions(self, input_pos, k):
        """Clear errors for positions the cache cannot hold (instead of index_copy_'s raw one). Skipped
        while compiling or while a CUDA graph records (a value check would sync / break the graph).
        The range is checked only for positions on the CPU: on a GPU it would cost a host sync per
        layer and step (eager decoding slows measurably); the engines and generation helpers check
        lengths against the cache before they write."""
        if _capturing_or_compiling():
            return
        T = k.shape[2]
        if input_pos.dim() not in (1, 2) or input_pos.shape[-1] != T or \
                (input_pos.dim() == 2 and input_pos.shape[0] != k.shape[0]):
            raise ValueError(f"input_pos must be (T,) or (B, T) = ({k.shape[0]}, {T}) for {T} new keys, "
                             f"got shape {tuple(input_pos.shape)}")
        if input_pos.dtype.is_floating_point or input_pos.dtype == torch.bool:
            raise TypeError(f"input_pos must hold integer positions, got dtype {input_pos.dtype}")
        if input_pos.numel() and input_pos.device.type == "cpu":
            lo, hi = (int(t) for t in torch.aminmax(input_pos))
            if lo < 0 or hi >= self.max_seq_len:
                raise ValueError(f"input_pos {lo}..{hi} is outside this StaticKVCache's {self.max_seq_len} "
                                 f"positions (0..{self.max_seq_len - 1}); build the cache with "
                                 f"max_seq_len >= {hi + 1}")

    def update(self, input_pos, k, v):
        self._check_positions(input_pos, k)
        if input_pos.dim() == 1:  # the same positions for every sequence
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:  # (B, T): each sequence at its own positions
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is (B, T, n_kv_head, head_dim)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v

    def attend(self, q, k, v, input_pos, attn_fn):
        k_all, v_all = self.update(input_pos, k, v)  # (B, n_kv_head, max_seq_len, head_dim)
        return attn_fn(q, k_all, v_all, input_pos)  # (B, n_head, T, head_dim)

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

    def attend(self, q, k, v, input_pos, attn_fn):
        k_all, v_all = self.update(input_pos, k, v)  # (B, n_kv_head, S, head_dim)
        return attn_fn(q, k_all, v_all, input_pos)

    def reset(self):
        self.k = self.v = None


def static_caches(model, batch: int, max_seq_len: int, dtype=None, device=None) -> list[StaticKVCache]:
    """One StaticKVCache per layer of the lab decoder ``model``, in its dtype and on its device."""
    c = model.cfg
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
    if max_seq_len > c.max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {c.max_seq_len}")
    dtype, device = dtype or model.dtype, device or model.device
    return [StaticKVCache(batch, c.n_kv_head, max_seq_len, c.head_dim, dtype, device) for _ in range(c.n_layer)]


def concat_caches(model) -> list[ConcatKVCache]:
    return [ConcatKVCache() for _ in range(model.cfg.n_layer)]
