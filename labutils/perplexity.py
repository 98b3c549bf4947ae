"""Perplexity: how well a model predicts held-out text, the quality check for quantization (notebook 04).

perplexity = exp(mean over predicted tokens of -log p(token | the tokens before it in its window)).

The text is tokenized once (no special tokens added) and cut into windows of ``window`` tokens that
start every ``stride`` tokens. Each token is scored once, in the first window that holds it with
at least one token of context before it:

- ``stride == window`` (the default, ``stride=None``): non-overlapping windows, cheapest; the first token of each window
  is context only, so n - (number of windows) tokens are scored, each with 0..window-1 tokens of context.
- ``stride < window``: overlapping windows; every token after the first is scored, each with at
  least ``window - stride`` tokens of context (lower, closer to the model's real perplexity, costlier).

Numbers are only comparable for the same text, tokenizer, window and stride.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    scoped = getattr(model, "kv_caches_attached", None)  # the lab Decoder: each window starts at 0,
    with scoped(None) if scoped is not None else contextlib.nullcontext():  # so no cache, whoever attached one
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out  # a transformers model or the lab Decoder


def _device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def windows(n: int, window: int, stride: int):
    """(begin, end, first): the window ids[begin:end] scores targets ids[first:end]."""
    for name, value in (("n", n), ("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    done = 1  # ids[0] has no context: never scored
    for begin in range(0, max(n - 1, 0), stride):
        end = min(begin + window, n)
        first = max(done, begin + 1)
        if first < end:
            yield begin, end, first
        done = max(done, end)
        if end == n:
            break


@torch.no_grad()
def nll(model, ids, window: int = 512, stride: int | None = None, progress: bool = True) -> tuple[float, int]:
    """(sum of -log p over scored tokens, number of scored tokens) for token ids (n,)."""
    from tqdm.auto import tqdm

    ids = torch.as_tensor(ids)
    if ids.numel() and (ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex):
        raise TypeError(f"ids must be integer token ids, got dtype {ids.dtype}; use .long() if the values are ids")
    if ids.dim() > 1 and sum(s > 1 for s in ids.shape) > 1:
        raise ValueError(f"ids must be one sequence of token ids (n,) or (1, n), got shape {tuple(ids.shape)}")
    ids = ids.long().reshape(-1).to(_device(model))
    spans = list(windows(ids.numel(), window, window if stride is None else stride))
    total, count = 0.0, 0
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress):
        logits = _logits(model, ids[None, begin:end])[0]  # (end - begin, vocab): position t predicts t + 1
        pred = logits[first - 1 - begin : end - 1 - begin].float()  # predictions of ids[first:end]
        total += F.cross_entropy(pred, ids[first:end], reduction="sum").item()
        count += end - first
    return total, count


def perplexity(model, tokenizer, text: str, window: int = 512, stride: int | None = None,
               max_tokens: int | None = None, progress: bool = True) -> float:
    """exp(mean NLL) of ``model`` (the lab Decoder, a transformers model, or any callable mapping ids
    (1, T) to logits (1, T, vocab)) on ``text``. ``stride`` defaults to ``window`` (non-overlapping
    windows); ``max_tokens`` keeps a prefix of the tokens (CPU smoke runs). Run it without a KV cache
    attached: each window starts at position 0."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 2:
            raise ValueError(f"max_tokens must be None or an integer >= 2 (one token of context, one scored), "
                             f"got {max_tokens!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, numbers.Integral)):
        raise TypeError(f"stride must be None or an integer, got {stride!r}")
    list(windows(0, window, window if stride is None else stride))  # window / stride checked before tokenizing
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    total, count = nll(model, ids, window, stride, progress)
    if not count:
        raise ValueError(f"nothing to score: text gave {len(ids)} tokens, need at least 2")
    return math.exp(total / count)
