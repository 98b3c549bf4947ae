"""Greedy generation with the lab decoder (notebook 01: without a cache; notebook 02 adds one)."""
from __future__ import annotations

import contextlib
import numbers

import torch
from tqdm.auto import tqdm


# ---- argument checks shared by the generation helpers (and labutils.engine) --------------------------
def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int >= minimum, or one clear TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_token_ids(idx, name: str = "idx", vocab_size: int | None = None, device=None) -> tuple[int, int]:
    """(B, T) of token ids ``idx``: a 2-D integer tensor with B >= 1 and T >= 1 (ids in 0..vocab_size-1
    and on ``device`` when given); otherwise one clear TypeError / ValueError naming ``name``."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids (B, T), got {type(idx).__name__}")
    if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {idx.dtype}; "
                        f"use {name}.long() if the values are ids")
    if idx.dim() != 2:
        raise ValueError(f"{name} must be 2-D token ids (B, T), got shape {tuple(idx.shape)}; "
                         f"use {name}[None] for a single sequence (T,)")
    B, T = idx.shape
    if B < 1:
        raise ValueError(f"{name} holds no sequence: shape {tuple(idx.shape)}, need B >= 1")
    if T < 1:
        raise ValueError(f"{name} is an empty prompt: shape {tuple(idx.shape)}, need at least one token (T >= 1)")
    if device is not None and torch.device(device) != idx.device:
        raise ValueError(f"{name} is on {idx.device} but the model is on {torch.device(device)}; "
                         f"move it with {name}.to({str(torch.device(device))!r})")
    if vocab_size is not None:
        lo, hi = (int(t) for t in torch.aminmax(idx))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} holds token ids in {lo}..{hi}, outside the vocabulary 0..{vocab_size - 1}")
    return B, T


def _model_device(model):
    dev = getattr(model, "device", None)
    if dev is None:
        for p in model.parameters():
            return p.device
    return dev


def _vocab(model):
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)


def without_kv_caches(model):
    """A scope in which the lab decoder ``model`` runs with no KV cache, whatever someone else (a
    DecodeEngine, a speculative decoder) attached: theirs are put back afterwards, untouched."""
    scoped = getattr(model, "kv_caches_attached", None)
    return scoped(None) if scoped is not None else contextlib.nullcontext()


def encode_prompt(tokenizer, text: str, chat: bool = True, device=None) -> torch.Tensor:
    """Token ids (1, T) of ``text``, wrapped in the tokenizer's chat template when it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.to(device) if device is not None else ids


@torch.no_grad()
def greedy_no_cache(model, idx: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                    progress: bool = False) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to idx (B, T), re-running the whole sequence each step.

    Step t processes T + t tokens, so n steps cost O(n^2) token-passes in all: the cost the KV cache
    (notebook 02) removes. Stops early once every sequence has produced ``eos_id``.
    """
    check_token_ids(idx, "idx", _vocab(model), _model_device(model))
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
    if max_new_tokens == 0:
        return idx.clone()
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    with without_kv_caches(model):  # each step restarts at position 0: a cache would be wrong here
        for _ in tqdm(range(max_new_tokens), disable=not progress, desc="greedy (no cache)"):
            logits = model(idx, last_only=True)  # (B, 1, vocab): the whole prefix recomputed
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None:
                done |= next_id.squeeze(1) == eos_id
                if bool(done.all()):
                    break
    return idx


@torch.no_grad()
def greedy_cached(model, idx: torch.Tensor, max_new_tokens: int, caches) -> torch.Tensor:
    """The same greedy loop with a KV cache (notebook 02): the prompt once, then one token per step.

    ``caches``: one cache per layer (labutils.kv_cache), attached through the decoder's cache seam
    for the duration of the call (whatever was attached before is put back afterwards).
    ``max_new_tokens=0`` returns a copy of idx.
    """
    B, T = check_token_ids(idx, "idx", _vocab(model), _model_device(model))
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
    n_layer = model.cfg.n_layer
    if caches is None or isinstance(caches, (str, bytes)) or not hasattr(caches, "__len__"):
        raise TypeError(f"caches must be a list of {n_layer} KV caches (one per layer, e.g. "
                        f"labutils.kv_cache.static_caches(model, {B}, {T + max_new_tokens})), got {caches!r}")
    if len(caches) != n_layer:
        raise ValueError(f"caches must hold one cache per layer ({n_layer}), got {len(caches)}")
    need = T + max_new_tokens - 1  # positions written: the prompt, then every new token but the last
    for i, c in enumerate(caches):
        if not callable(getattr(c, "update", None)):
            raise TypeError(f"caches[{i}] has no update(input_pos, k, v) method: {type(c).__name__}")
        cap = getattr(c, "max_seq_len", None)
        if isinstance(cap, int) and need > cap:
            raise ValueError(f"a prompt of {T} tokens plus max_new_tokens={max_new_tokens} needs {need} cache "
                             f"positions, caches[{i}] holds {cap}; build the caches with max_seq_len >= {need}")
        kb = getattr(c, "k", None)
        if isinstance(kb, torch.Tensor) and cap is not None and kb.shape[0] != B:
            raise ValueError(f"caches[{i}] is built for batch {kb.shape[0]}, idx has batch {B}")
    if max_new_tokens == 0:
        return idx.clone()
    with model.kv_caches_attached(caches):
        logits = model(idx, torch.arange(T, device=idx.device), last_only=True)  # prefill: fills the caches
        out = [logits[:, -1].argmax(dim=-1, keepdim=True)]
        for i in range(max_new_tokens - 1):
            pos = torch.tensor([T + i], device=idx.device)
            logits = model(out[-1], pos, last_only=True)  # one new token, attending to the cache
            out.append(logits[:, -1].argmax(dim=-1, keepdim=True))
    return torch.cat([idx, *out], dim=1)


@torch.no_grad()
def decode_step_ms(model, n: int, cached: bool = False, rep_ms: float = 100) -> float:
    """Median ms of one decode step after a context of n tokens (notebooks 01 and 02).

    Without a cache the step runs all n tokens through the model (last position's logits only);
    with one (``cached``) the first n - 1 tokens sit in a static KV cache, filled beforehand and not
    timed, and the step runs the n-th token alone at position n - 1. Both give the same logits.
    Random token ids: the time does not depend on them.
    """
    from . import bench, kv_cache

    max_len = model.cfg.max_seq_len
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n (the context length) must be an integer in 1..{max_len}, got {n!r}")
    if not 1 <= n <= max_len:
        raise ValueError(f"the context must hold 1..{max_len} tokens (the model's context), got n={n}")
    if isinstance(rep_ms, bool) or not isinstance(rep_ms, numbers.Real) or not rep_ms > 0:
        raise ValueError(f"rep_ms must be a positive number of milliseconds, got {rep_ms!r}")
    n = int(n)
    device = next(model.parameters()).device
    x = torch.randint(0, model.cfg.vocab_size, (1, n), device=device)
    if not cached:
        with without_kv_caches(model):  # someone else's caches (a speculative decoder's) stay theirs
            return bench.time_fn(lambda: model(x, last_only=True), rep_ms=rep_ms).median_ms
    with model.kv_caches_attached(kv_cache.static_caches(model, 1, n)):
        if n > 1:
            model(x[:, :-1], torch.arange(n - 1, device=device))  # prefill (not timed)
        pos = torch.tensor([n - 1], device=device)
        return bench.time_fn(lambda: model(x[:, -1:], pos, last_only=True), rep_ms=rep_ms).median_ms
