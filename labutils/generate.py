"""Greedy generation with the lab decoder (notebook 01: without a cache; notebook 02 adds one)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


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
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
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
    for the duration of the call.
    """
    model.set_kv_caches(caches)
    try:
        T = idx.shape[1]
        logits = model(idx, torch.arange(T, device=idx.device), last_only=True)  # prefill: fills the caches
        out = [logits[:, -1].argmax(dim=-1, keepdim=True)]
        for i in range(max_new_tokens - 1):
            pos = torch.tensor([T + i], device=idx.device)
            logits = model(out[-1], pos, last_only=True)  # one new token, attending to the cache
            out.append(logits[:, -1].argmax(dim=-1, keepdim=True))
    finally:
        model.set_kv_caches(None)
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
    if not 1 <= n <= max_len:
        raise ValueError(f"the context must hold 1..{max_len} tokens (the model's context), got {n}")
    device = next(model.parameters()).device
    x = torch.randint(0, model.cfg.vocab_size, (1, n), device=device)
    if not cached:
        model.set_kv_caches(None)  # a DecodeEngine leaves its caches attached
        return bench.time_fn(lambda: model(x, last_only=True), rep_ms=rep_ms).median_ms
    model.set_kv_caches(kv_cache.static_caches(model, 1, n))
    try:
        if n > 1:
            model(x[:, :-1], torch.arange(n - 1, device=device))  # prefill (not timed)
        pos = torch.tensor([n - 1], device=device)
        return bench.time_fn(lambda: model(x[:, -1:], pos, last_only=True), rep_ms=rep_ms).median_ms
    finally:
        model.set_kv_caches(None)
