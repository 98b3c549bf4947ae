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
