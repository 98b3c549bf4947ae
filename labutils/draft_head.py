"""An EAGLE-style draft head trained on the target's own features (notebook 05).

A separate draft model runs all of its layers per draft token. EAGLE (Li et al. 2024) drafts with
ONE decoder layer instead: it reads the target's final hidden state ("feature") and the next token,
predicts the target's *next* feature, and lets the target's own lm_head turn that prediction into a
token distribution. Features are more regular than tokens (EAGLE's observation), and the lm_head
is shared, so one layer suffices.

Indexing: committed tokens x_0 .. x_{L-1}; f_j = the target's final (normed) hidden state at
position j, from which the target predicts x_{j+1}. The head at position j reads the pair
(f_j, x_{j+1})::

    u_j      = fc(concat(f_j, embed(x_{j+1})))        fc: Linear(2d -> d); embed: the target's, shared
    f̂_{j+1}  = Block(u_j), RoPE at position j        one layer of the target's shape, causal over the
                                                      head's own pairs 0 .. j (its own KV cache)
    sampling_probs(lm_head(f̂_{j+1}))                 a guess of x_{j+2}; the target's lm_head, shared, frozen

No norm after the layer: f_j is already normed and the layer's residual output is regressed onto it
directly (EAGLE-1's head has no final norm either; a variant with one was not tried here).

Drafting with L committed tokens: the last pair with a real feature is (f_{L-2}, x_{L-1}) at position
L-2; it gives f̂_{L-1} and the first draft d_1 (a guess of x_L). Then (f̂_{L-1}, d_1) at L-1 gives
f̂_L and d_2, and so on: k drafts cost one ingest and k - 1 single-pair steps of one layer.

Training (``train_draft_head``): the target continues prompts cut from the calibration text (the eval
text stays held out) with its own samples (``collect_features``); the head then learns, teacher-forced
on all positions at once, smooth-L1(f̂_{j+1}, f_{j+1}) + w * CE(lm_head(f̂_{j+1}), softmax(lm_head(f_{j+1}))),
with uniform noise on its input features so that it tolerates its own imperfect f̂ when drafting.

``HeadDrafter`` plugs the head into ``labutils.speculative.SpeculativeDecoder`` (drafter contract
there, ``needs_hidden = True``).

Names: B batch, T pairs, S key positions, d hidden size, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import runtime
from .attention import sdpa_attention
from .cuda_graphs import Graphed
from .decoder import Block, rope_cos_sin
from .kv_cache import StaticKVCache, static_caches
from .speculative import draw, sample, sampling_probs

_FORMAT = 1  # bump when the head's architecture or training changes: old cache files stop matching


# ---- the head ------------------------------------------------------------------------------------
class DraftHead(nn.Module):
    """fc(concat(f_j, embed(x_{j+1}))) -> one ``Block`` of the target's config -> f̂_{j+1}.

    The target is held by reference, not registered as a submodule: its embedding and lm_head are
    used, never copied, never trained, and not part of this module's state_dict. Parameters are
    created on ``device`` (default: the target's) in fp32; cast with ``.to(dtype)`` for inference.

    KV-cache seam, as the decoder's: ``set_kv_cache(cache)`` (a ``StaticKVCache`` from ``new_cache``,
    or None for a plain causal forward over the given pairs)."""

    def __init__(self, target, device=None):
        super().__init__()
        object.__setattr__(self, "target", target)  # plain attribute: not a child module, not in state_dict
        self.cfg = cfg = target.cfg
        d = cfg.hidden_size
        with torch.device(device or target.device):
            self.fc = nn.Linear(2 * d, d, bias=True)
            self.layer = Block(cfg)
        self.attn_fn = sdpa_attention

    @property
    def device(self):
        return self.fc.weight.device

    @property
    def dtype(self):
        return self.fc.weight.dtype

    def set_kv_cache(self, cache) -> "DraftHead":
        del self.layer.self_attn.kv_cache  # a StaticKVCache (an nn.Module) registered itself as a child
        self.layer.self_attn.kv_cache = cache
        return self

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        c = self.cfg
        if max_len > c.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the target's context of {c.max_seq_len}")
        return StaticKVCache(batch, c.n_kv_head, max_len, c.head_dim, self.dtype, self.device)

    def forward(self, f: torch.Tensor, next_tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """f (B, T, d): features f_j at positions pos (T,); next_tokens (B, T): x_{j+1} -> f̂_{j+1} (B, T, d)."""
        e = self.target.embed_tokens(next_tokens)  # (B, T, d)
        u = torch.cat([f.to(e.dtype), e], dim=-1)  # (B, T, 2d)
        if not torch.is_autocast_enabled(u.device.type):
            u = u.to(self.dtype)
        x = self.fc(u)  # (B, T, d)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        return self.layer(x, cos, sin, pos, self.attn_fn)

    def logits(self, fhat: torch.Tensor) -> torch.Tensor:
        """The target's lm_head on predicted features: (..., d) -> (..., V)."""
        if not torch.is_autocast_enabled(fhat.device.type):
            fhat = fhat.to(self.target.dtype)
        return self.target.lm_head(fhat)


# ---- training data: the target's own continuations ----------------------------------------------
@dataclass
class Features:
    tokens: torch.Tensor  # (N, S) int64: x_0 .. x_{L-1} of each sequence, right-padded with 0
    feats: torch.Tensor  # (N, S, d): f_j, the target's final hidden state at position j
    valid: torch.Tensor  # (N, S) bool: a real position (not padding, not after a generated end-of-sequence)

    @property
    def n_tokens(self) -> int:
        return int(self.valid.sum())


# Instructions around calibration passages, and standalone questions: chat-style prompts.
PASSAGE_INSTRUCTIONS = (
    "Summarize this passage in two sentences:", "Explain this passage in plain modern English:",
    "What is the author arguing here?", "Continue this text in the same style:",
    "List the main ideas of this passage:", "Rewrite this passage for a ten-year-old:",
    "Which words in this passage are old-fashioned, and what do they mean?",
    "Write three questions a student could ask about this passage:",
)
QUESTIONS = (
    "Explain how a rainbow forms.", "Write a short story about a lighthouse keeper.",
    "Give three tips for learning to cook.", "What is the difference between weather and climate?",
    "Write a haiku about autumn.", "How does a bicycle stay upright?",
    "Describe the water cycle step by step.", "What are the benefits of regular exercise?",
    "Write a polite email asking to reschedule a meeting.", "Explain what a computer program is.",
    "Name five fruits and one fact about each.", "Why is the sky blue?",
    "Give a recipe for a simple tomato soup.", "What makes a good friend?",
    "Explain photosynthesis to a child.", "Write a limerick about a cat.",
    "How do vaccines work?", "Plan a one-day trip to a city of your choice.",
    "What is the Pythagorean theorem?", "Describe your ideal house.",
    "List four ways to save energy at home.", "Why do leaves change color in the fall?",
    "Tell me about the history of the printing press.", "How do I make a paper airplane?",
)


def calibration_prompts(tokenizer, n: int, prompt_len: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """n prompts (each (T,) int64) from the calibration text: half raw passages of ``prompt_len``
    tokens (plain continuation), the rest chat-style through the tokenizer's chat template: the
    ``QUESTIONS`` once each, then passages of ``prompt_len`` tokens under an instruction."""
    from .data import load_text
    from .generate import encode_prompt

    ids = tokenizer(load_text("calibration"), add_special_tokens=False, verbose=False).input_ids
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - prompt_len, size=n)
    prompts, n_raw = [], (n + 1) // 2
    for i in range(n):
        piece = ids[starts[i]: starts[i] + prompt_len]
        if i < n_raw:
            prompts.append(torch.tensor(piece, dtype=torch.long))
            continue
        c = i - n_raw
        if c < len(QUESTIONS):
            text = QUESTIONS[c]
        else:
            text = f"{PASSAGE_INSTRUCTIONS[c % len(PASSAGE_INSTRUCTIONS)]}\n\n{tokenizer.decode(piece).strip()}"
        prompts.append(encode_prompt(tokenizer, text, chat=True)[0])
    return prompts


@torch.no_grad()
def collect_features(target, prompts: list[torch.Tensor], n_new: int, temperature: float = 0.8,
                     top_p: float = 1.0, batch: int = 64, eos_id: int | None = None, seed: int = 0,
                     progress: bool = True) -> Features:
    """The target continues each prompt by ``n_new`` tokens of its own sampling; returns the tokens
    and the target's feature f_j at every position (prompt included).

    Prompts are batched by length (sorted; the result is in that order) with a static KV cache:
    prompts shorter than the longest in a batch are right-padded and their rows decode at their own
    positions ((B, 1) input_pos); the pad slots in the cache are overwritten by the row's own tokens
    before any query could attend to them (causal mask), as rejected drafts are in speculation."""
    from tqdm.auto import tqdm

    dev, d = target.device, target.cfg.hidden_size
    gen = torch.Generator(device=dev).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    bar = tqdm(total=len(prompts) * n_new, desc="collect features", unit="tok", disable=not progress)
    try:
        for b0 in range(0, len(order), batch):
            chunk = [prompts[i].reshape(-1) for i in order[b0: b0 + batch]]
            B, T_max = len(chunk), max(len(p) for p in chunk)
            S = T_max + n_new
            lengths = torch.tensor([len(p) for p in chunk], device=dev)  # (B,)
            rows = torch.arange(B, device=dev)
            tokens = torch.zeros(B, S, dtype=torch.long, device=dev)
            for r, p in enumerate(chunk):
                tokens[r, : len(p)] = p.to(dev)
            feats = torch.zeros(B, S, d, dtype=target.dtype, device=dev)
            target.set_kv_caches(static_caches(target, B, S))
            try:
                logits, h = target(tokens[:, :T_max], torch.arange(T_max, device=dev), return_hidden=True)
                feats[:, :T_max] = h  # pad slots hold garbage here; decoding overwrites them
                last = logits[rows, lengths - 1]  # (B, V): each row's prediction after its own prompt
                del logits
                pos = lengths.clone()  # (B,): the next position of each row
                for _ in range(n_new):
                    tok = sample(sampling_probs(last, temperature, top_p), gen)  # (B,)
                    tokens[rows, pos] = tok
                    logits, h = target(tok[:, None], pos[:, None], return_hidden=True)  # (B, 1, V), (B, 1, d)
                    feats[rows, pos] = h[:, 0]
                    last = logits[:, 0]
                    pos = pos + 1
                    bar.update(B)
            finally:
                target.set_kv_caches(None)
            j = torch.arange(S, device=dev)
            valid = j[None] < (lengths + n_new)[:, None]  # (B, S)
            if eos_id is not None:  # keep a generated end-of-sequence, drop what follows it
                eos = (tokens == eos_id) & (j[None] >= lengths[:, None])
                valid &= (eos.long().cumsum(1) - eos.long()) == 0
            out.append((tokens, feats, valid))
    finally:
        bar.close()
    S = max(t.shape[1] for t, _, _ in out)
    pad = lambda x: F.pad(x, (0, 0, 0, S - x.shape[1]) if x.dim() == 3 else (0, S - x.shape[1]))  # noqa: E731
    return Features(torch.cat([pad(t) for t, _, _ in out]), torch.cat([pad(f) for _, f, _ in out]),
                    torch.cat([pad(v) for _, _, v in out]))


# ---- training -------------------------------------------------------------------------------------
def default_settings() -> dict:
    """Training sizes. Full (GPU): 640 prompts continued by 192 tokens (~160k tokens), 1500 steps of 8
    sequences (about a minute on an H200; the loss still falls slowly after 1500: 0.56 there, 0.55 at
    2000). Smoke (CPU): 16 prompts of 96 tokens continued by 16 (~1.3k tokens), 60 steps of 4, the
    cross-entropy term on a tenth of the positions (~10 s on two cores)."""
    return dict(
        n_prompts=runtime.pick(640, 16), prompt_len=runtime.pick(64, 96), n_new=runtime.pick(192, 16),
        steps=runtime.pick(1500, 60), batch_size=runtime.pick(8, 4), lr=runtime.pick(2e-3, 3e-3),
        ce_fraction=runtime.pick(1.0, 0.1), weight_ce=0.1, noise=0.1, temperature=0.8, collect_batch=128, seed=0)


def head_loss(head: DraftHead, tokens, feats, valid, noise_amp: float = 0.0, weight_ce: float = 0.1,
              ce_fraction: float = 1.0, generator: torch.Generator | None = None) -> dict:
    """Teacher-forced loss on all positions of (B, S) sequences at once: pairs (f_j + noise, x_{j+1})
    at positions j = 0 .. S-2 predict f_{j+1}; the cross-entropy term on a random ``ce_fraction`` of
    them (each costs two (d x V) matmuls, the layer itself far less). Returns 0-d tensors: loss,
    feat (smooth-L1), ce, top1 (agreement of lm_head(f̂_{j+1}) with the target's argmax at j+1)."""
    B, S = tokens.shape
    f_in, x_next, f_next = feats[:, :-1], tokens[:, 1:], feats[:, 1:]  # (B, S-1, d), (B, S-1), (B, S-1, d)
    m = valid[:, 1:]  # pair j counts iff x_{j+1} is real (then x_j is too)
    if noise_amp:
        u = torch.rand(f_in.shape, device=f_in.device, generator=generator, dtype=torch.float32)
        f_in = f_in.float() + (2 * u - 1) * noise_amp  # uniform in [-a, a] (EAGLE's trick)
    fhat = head(f_in, x_next, torch.arange(S - 1, device=tokens.device))  # (B, S-1, d)
    l_feat = F.smooth_l1_loss(fhat.float(), f_next.float(), reduction="none").mean(-1)  # (B, S-1)
    l_feat = l_feat[m].mean()
    ce_mask = m
    if ce_fraction < 1:
        ce_mask = m & (torch.rand(m.shape, device=m.device, generator=generator) < ce_fraction)
    with torch.no_grad():
        p = torch.softmax(head.logits(f_next[ce_mask]).float(), dim=-1)  # (n, V): the target's distribution
    logp_hat = torch.log_softmax(head.logits(fhat[ce_mask]).float(), dim=-1)  # (n, V)
    l_ce = -(p * logp_hat).sum(-1).mean() if len(p) else l_feat.new_zeros(())  # cross-entropy, soft labels
    top1 = (logp_hat.argmax(-1) == p.argmax(-1)).float().mean() if len(p) else l_feat.new_zeros(())
    return dict(loss=l_feat + weight_ce * l_ce, feat=l_feat.detach(), ce=l_ce.detach(), top1=top1)


def _cache_key(target, prompts, settings) -> str:
    """Hash of the target's config and dtype, a strided sample of a few of its weights, the prompts'
    token ids and the training settings."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(target.cfg), sort_keys=True).encode())
    h.update(str(target.dtype).encode())
    weights = [target.embed_tokens.weight, target.norm.weight, target.layers[0].input_layernorm.weight,
               target.layers[-1].post_attention_layernorm.weight]
    if not target.cfg.tie_embeddings and hasattr(target.lm_head, "weight"):
        weights.append(target.lm_head.weight)
    for w in weights:
        flat = w.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    for p in prompts:
        h.update(p.reshape(-1).to(torch.int64).cpu().numpy().tobytes() + b"|")
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def head_path(key: str):
    from .models import cache_dir

    return cache_dir() / "draft_heads" / f"{key}.safetensors"


def _save(head: DraftHead, path, meta: dict):
    """Atomically: a temp file in the same folder, then a rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, tmp, metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(target, path) -> DraftHead:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    head = DraftHead(target)
    head.load_state_dict(load_file(str(path), device=str(target.device)))
    for k, v in meta.items():
        setattr(head, k, v)
    return head


class _Frozen:
    """The target's parameters with requires_grad off for the duration (restored after)."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


def train_draft_head(target, tokenizer=None, steps: int | None = None, *, prompts: list[torch.Tensor] | None = None,
                     cache: bool = True, progress: bool = True, **overrides) -> DraftHead:
    """A draft head for ``target`` trained on its own continuations; cached in ``$LABUTILS_CACHE``.

    ``prompts``: token-id tensors to continue (default: ``calibration_prompts(tokenizer, n_prompts,
    prompt_len)``). ``steps`` and ``overrides`` change ``default_settings()`` (n_prompts, prompt_len,
    n_new, batch_size, temperature, lr, weight_ce, noise, collect_batch, seed). AdamW (betas 0.9, 0.95,
    no weight decay), 5 % linear warm-up then cosine decay to 10 % of lr, gradients clipped at 1;
    bf16 autocast on CUDA (fp32 master weights), fp32 on CPU. ``cache=False`` forces training.

    Returns the head in eval mode, in the target's dtype, with ``losses`` and ``top1`` (per step),
    ``settings``, ``train_seconds`` and ``from_cache``."""
    settings = default_settings()
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown training settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update(overrides)
    if steps is not None:
        settings["steps"] = steps
    if prompts is None:
        if tokenizer is None:
            raise ValueError("need a tokenizer to cut prompts from the calibration text (or pass prompts=)")
        prompts = calibration_prompts(tokenizer, settings["n_prompts"], settings["prompt_len"], settings["seed"])
    eos_id = getattr(tokenizer, "eos_token_id", None)
    s = settings
    key_settings = {**s, "eos_id": eos_id, "device": target.device.type, "format": _FORMAT}
    path = head_path(_cache_key(target, prompts, key_settings))
    if cache and path.is_file():
        head = _load(target, path).to(target.dtype).eval().requires_grad_(False)
        head.from_cache = True
        return head

    t0 = time.perf_counter()
    data = collect_features(target, prompts, s["n_new"], temperature=s["temperature"], batch=s["collect_batch"],
                            eos_id=eos_id, seed=s["seed"], progress=progress)
    fit = {k: s[k] for k in ("steps", "batch_size", "lr", "weight_ce", "noise", "ce_fraction", "seed")}
    head, log = fit_head(target, data, progress=progress, **fit)
    meta = dict(log, settings=s, n_tokens=data.n_tokens, train_seconds=time.perf_counter() - t0)
    if cache:
        _save(head, path, meta)
    head = head.to(target.dtype).eval().requires_grad_(False)
    for k, val in meta.items():
        setattr(head, k, val)
    head.from_cache = False
    return head


def fit_head(target, data: Features, steps: int, batch_size: int, lr: float, weight_ce: float = 0.1,
             noise: float = 0.1, ce_fraction: float = 1.0, seed: int = 0, progress: bool = True):
    """Train a fresh head on collected features: ``steps`` steps of ``batch_size`` sequences drawn at
    random. ``noise``: the half-width of the uniform input noise, relative to the features' RMS.
    Returns (head in train mode and fp32, log of per-step lists: losses, feat, ce, top1)."""
    from tqdm.auto import tqdm

    dev = target.device
    with torch.random.fork_rng(devices=[]):  # the head's initial weights from the CPU generator: same on any device
        torch.manual_seed(seed)
        head = DraftHead(target, device="cpu").to(dev)
    head.train()
    rms = float(data.feats[data.valid].float().pow(2).mean().sqrt())  # the features' scale
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)

    def lr_factor(i):  # linear warm-up, then cosine from lr down to lr / 10
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    cuda = dev.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    log = {"losses": [], "feat": [], "ce": [], "top1": []}
    N = data.tokens.shape[0]
    bar = tqdm(range(steps), desc="train draft head", disable=not progress)
    with _Frozen(target):
        for i in bar:
            sel = torch.randint(0, N, (batch_size,), device=dev, generator=gen)
            toks, feats, valid = data.tokens[sel], data.feats[sel], data.valid[sel]
            S = int(valid.sum(1).max())  # crop the common padding
            with autocast:
                out = head_loss(head, toks[:, :S], feats[:, :S], valid[:, :S], noise * rms, weight_ce, ce_fraction, gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            for k, name in (("loss", "losses"), ("feat", "feat"), ("ce", "ce"), ("top1", "top1")):
                log[name].append(out[k].detach())
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{float(log['losses'][-1]):.3f}", top1=f"{float(log['top1'][-1]):.2f}")
    bar.close()
    return head, {k: torch.stack(v).tolist() if v else [] for k, v in log.items()}


# ---- the drafter ----------------------------------------------------------------------------------
class HeadDrafter:
    """Drafts with a ``DraftHead`` on the target's features (drafter contract in labutils.speculative).

    ``state.hidden[j]`` holds f_j for j < L - 1 (L = len(state.tokens)). Each round the head ingests
    the pairs (f_j, x_{j+1}) it has not yet ingested with real features (the rows its own drafting
    wrote from f̂ last round are stale and overwritten), then drafts k tokens from its own f̂.

    ``graph=True`` (CUDA): one fixed shape, so the whole propose is one CUDA-graph replay per
    (k, temperature, top_p): the last k + 1 pairs (positions L-2-k .. L-2) are always re-ingested
    (a round adds at most k + 1 tokens, so they cover all that is new); rounds where that does not
    hold (the first, or L - 2 - k < 0) run eagerly. The graph draws from the default CUDA generator
    (``state.generator`` is not used there). ``propose_device`` does the same re-ingest in tensors
    only, for ``SpeculativeDecoder.generate_on_device`` (whose rounds it captures itself)."""

    needs_hidden = True

    def __init__(self, head: DraftHead, name: str = "draft head", graph: bool = False):
        if graph and head.device.type != "cuda":
            raise RuntimeError("graph=True captures CUDA graphs and needs a GPU")
        self.head, self.name, self.graph = head, name, graph
        self.cache, self.fed, self._graphs = None, [], {}
        self.last_features = None  # (k, d): f̂_{L-1} .. f̂_{L+k-2} of the last proposal

    def reset(self, max_len: int, device=None):
        if self.cache is None or self.cache.max_seq_len < max_len:
            self.cache, self._graphs = self.head.new_cache(max_len), {}
        self.fed = []  # the tokens x_0 .. x_n whose pairs (f_j, x_{j+1}), j < n, sit in the cache with real f_j

    def _draft_loop(self, f_in, x_in, pos, k, temperature, top_p, generator):
        """Ingest pairs (f_in (1, T, d), x_in (1, T)) at positions pos (T,), then draw k tokens, each
        fed back with its f̂ at the next position. Returns drafts (k,), q (k, V) or None, f̂ (k, d)."""
        head = self.head
        head.set_kv_cache(self.cache)
        try:
            h = head(f_in, x_in, pos)[:, -1:]  # (1, 1, d): f̂_{L-1}
            pos = pos[-1:]
            drafts, qs, fs = [], [], []
            for i in range(k):
                fs.append(h[0, 0])
                tok, q = draw(head.logits(h)[0, 0], temperature, top_p, generator)  # from (V,) logits
                drafts.append(tok)
                if q is not None:
                    qs.append(q)
                if i < k - 1:
                    pos = pos + 1
                    h = head(h, tok.view(1, 1), pos)  # the pair (f̂, draft) at the next position
        finally:
            head.set_kv_cache(None)
        return torch.stack(drafts), (torch.stack(qs) if qs else None), torch.stack(fs)

    @torch.no_grad()
    def propose_device(self, toks, L, k, temperature=0.0, top_p=1.0, hidden=None):
        """For an on-device round (``SpeculativeDecoder.generate_on_device``): toks (capacity,) the
        committed tokens at positions < L ((1,) int64), hidden the target's features. Re-ingests the
        last k + 1 pairs, positions L-2-k .. L-2 (clamped at 0: a repeated pair (f_0, x_1) writes
        the same values twice), then drafts k. Needs the cache valid below L-2-k, which a first
        ``propose`` round after the prompt guarantees."""
        pos = (L - 2 - k + torch.arange(k + 1, device=toks.device)).clamp_min(0)  # (k + 1,)
        f_in = hidden.index_select(0, pos)[None]  # (1, k + 1, d): f_j
        x_in = toks.index_select(0, pos + 1)[None]  # (1, k + 1): x_{j+1}
        draft, q, self.last_features = self._draft_loop(f_in, x_in, pos, k, temperature, top_p, None)
        return draft, (None if temperature == 0 else q)

    @torch.no_grad()
    def propose(self, state, k: int):
        tokens, L = state.tokens, len(state.tokens)
        dev = self.head.device
        if k < 1 or L < 2:
            return torch.empty(0, dtype=torch.long, device=dev), None
        if state.hidden is None:
            raise ValueError("HeadDrafter needs the target's hidden states (state.hidden)")
        common = 0
        for a, b in zip(self.fed, tokens):
            if a != b:
                break
            common += 1
        start = max(0, min(common - 1, L - 2))  # first pair not ingested with real f; the last (L-2) always is
        s = L - 2 - k
        args = (k, state.temperature, state.top_p)
        if self.graph and s >= 0 and start >= s:  # fixed shape: the last k + 1 pairs
            f_in = state.hidden[s: L - 1][None].to(self.head.dtype)
            x_in = torch.tensor([tokens[s + 1: L]], device=dev)
            pos = torch.arange(s, L - 1, device=dev)
            if args not in self._graphs:
                self._graphs[args] = Graphed(lambda f, x, p: self._draft_loop(f, x, p, *args, None),
                                              f_in.clone(), x_in.clone(), pos.clone())
            draft, q, fhat = (None if t is None else t.clone() for t in self._graphs[args](f_in, x_in, pos))
        else:
            f_in = state.hidden[start: L - 1][None]
            x_in = torch.tensor([tokens[start + 1: L]], device=dev)
            draft, q, fhat = self._draft_loop(f_in, x_in, torch.arange(start, L - 1, device=dev), *args,
                                              state.generator)
        self.fed = list(tokens)
        self.last_features = fhat
        return draft, (None if state.temperature == 0 else q)
