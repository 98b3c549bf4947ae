"""Attention backends: the decoder's first seam (introduced in notebook 01).

Every backend has one signature, so later notebooks swap it with ``model.set_attention(fn)``::

    fn(q, k, v, q_pos) -> out
      q:     (B, n_head,    T, head_dim)   queries of the T new tokens
      k, v:  (B, n_kv_head, S, head_dim)   keys/values at positions 0 .. S-1 (the whole cache)
      q_pos: (T,) or (B, T) int64          the position of each query
      out:   (B, n_head,    T, head_dim)

Query ``i`` may look at key ``j`` iff ``j <= q_pos[i]`` (causal). ``n_head`` is a multiple of
``n_kv_head`` (grouped-query attention): query head ``h`` reads KV head ``h // (n_head // n_kv_head)``.
The softmax scale is ``1 / sqrt(head_dim)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(q_pos: torch.Tensor, S: int) -> torch.Tensor:
    """Boolean mask, True where key j is visible to the query at q_pos: (T, S) or (B, 1, T, S)."""
    k_pos = torch.arange(S, device=q_pos.device)
    mask = k_pos <= q_pos[..., None]  # (T, S) or (B, T, S)
    return mask if q_pos.dim() == 1 else mask[:, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_head, S, head_dim) -> (B, n_kv_head * n_rep, S, head_dim), each KV head n_rep times."""
    if n_rep == 1:
        return x
    B, n_kv_head, S, head_dim = x.shape
    return x[:, :, None].expand(B, n_kv_head, n_rep, S, head_dim).reshape(B, n_kv_head * n_rep, S, head_dim)


def _check_shapes(q, k, v, name: str):
    """The backend contract on shapes, in plain Python ints (free, and transparent to torch.compile)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be 4-D (B, heads, seq, head_dim), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n_head, n_kv = q.shape[1], k.shape[1]
    if n_kv == 0 or n_head % n_kv or v.shape[1] != n_kv:
        raise ValueError(f"{name}: n_head={n_head} must be a multiple of n_kv_head={n_kv} (k) and v must have "
                         f"the same KV heads as k (got {v.shape[1]})")
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{name}: head_dim and lengths must agree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (q, k, v share head_dim; k and v share S)")


def naive_attention(q, k, v, q_pos):
    """softmax(Q K^T / sqrt(d) + causal mask) V, materialising the (T, S) score matrix.

    The reference: scores, softmax and the product with V are computed in fp32 (fp64 for fp64 inputs),
    so fp16 inputs whose scores exceed fp16's range do not overflow; the result is in q's dtype."""
    _check_shapes(q, k, v, "naive_attention")
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, n_head, S, head_dim)
    ct = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, n_head, T, S)
    scores = scores.masked_fill(~causal_mask(q_pos, k.shape[2]), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.to(ct)).to(q.dtype)  # (B, n_head, T, head_dim)


def sdpa_attention(q, k, v, q_pos):
    """torch's fused scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels)."""
    _check_shapes(q, k, v, "sdpa_attention")
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == S:  # a prompt that starts at position 0: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_pos, S), enable_gqa=gqa)


BACKENDS = {"naive": naive_attention, "sdpa": sdpa_attention}
# Backends built from Triton kernels, imported on first use (name -> (module, function)).
LAZY_BACKENDS = {"flash": ("labutils.flash_attention", "flash_backend")}  # notebook 03


def get_backend(name_or_fn):
    """A backend by name ('naive', 'sdpa', 'flash', or one a later notebook registers) or the function itself."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in BACKENDS and name_or_fn in LAZY_BACKENDS:
        import importlib

        module, fn = LAZY_BACKENDS[name_or_fn]
        BACKENDS[name_or_fn] = getattr(importlib.import_module(module), fn)
    try:
        return BACKENDS[name_or_fn]
    except KeyError:
        known = ", ".join([*BACKENDS, *(n for n in LAZY_BACKENDS if n not in BACKENDS)])
        raise ValueError(f"unknown attention backend {name_or_fn!r}; known: {known}") from None
