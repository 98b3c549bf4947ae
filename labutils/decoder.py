"""The lab's decoder, written from scratch for the Llama / Qwen2 / Mistral family (notebook 01).

RMSNorm, rotary position embeddings (RoPE), grouped-query attention, a SwiGLU MLP, optional q/k/v
bias (Qwen2) and tied or untied embeddings. It is built from a Hugging Face model's weights
(``Decoder.from_hf``) and shares their storage, so a 7B model is never held twice.

One ``input_pos`` argument runs through the model from the start (as in gpt-fast), and three narrow
seams let later notebooks extend this one decoder instead of forking it:

1. attention:    ``model.set_attention(fn)``, ``fn(q, k, v, q_pos)``   (labutils.attention)
2. KV cache:     ``model.set_kv_caches([cache, ...])``, one per layer, each with
                 ``attend(q, k, v, input_pos, attn_fn) -> y``: the cache owns its layout
                 and its attention call (a paged cache runs its own kernel, notebook 06),
                 or only ``update(input_pos, k, v) -> (k_all, v_all)``, then ``attn_fn``
                 over (k_all, v_all)                                   (notebook 02)
                 A paged cache (labutils.paged_attention) takes a ragged batch of sequences
                 flattened as idx (1, N) with per-token input_pos (1, N); ``logits_at`` picks
                 each sequence's last token                            (notebook 06)
3. linear layers: ``model.swap_linears(make)``, ``make(name, nn.Linear) -> nn.Module``
                                                                       (notebook 04)
Names: B batch, T new tokens, S key positions, n_head, n_kv_head, head_dim, d (hidden size).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import get_backend


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    max_seq_len: int
    o_bias: bool = False  # Llama's attention_bias also biases o_proj; Qwen2 biases q/k/v only

    @classmethod
    def from_hf(cls, c) -> "DecoderConfig":
        """Read a transformers config (LlamaConfig, Qwen2Config, MistralConfig) and check it fits."""
        if c.model_type not in ("llama", "qwen2", "mistral"):
            raise NotImplementedError(f"the lab decoder covers llama / qwen2 / mistral, not {c.model_type!r}")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"only the SwiGLU (silu) MLP is implemented, not {c.hidden_act!r}")
        rope = _rope_parameters(c)
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise NotImplementedError(
                f"RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not implemented; "
                "the lab decoder uses plain RoPE (Llama-3, Qwen2.5, Mistral-7B-v0.3, SmolLM2)")
        n_head = c.num_attention_heads
        n_kv_head = getattr(c, "num_key_value_heads", None) or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={n_kv_head}")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        o_bias = c.model_type != "qwen2" and bool(getattr(c, "attention_bias", False))
        window = getattr(c, "sliding_window", None)
        if window is not None and window < c.max_position_embeddings and (
                c.model_type == "mistral" or getattr(c, "use_sliding_window", False)):
            raise NotImplementedError(f"sliding-window attention (window {window}) is not implemented")
        if getattr(c, "mlp_bias", False):
            raise NotImplementedError("MLP biases are not implemented")
        return cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                   intermediate_size=c.intermediate_size, n_layer=c.num_hidden_layers,
                   n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim,
                   rope_theta=float(rope["rope_theta"]), rms_norm_eps=c.rms_norm_eps,
                   qkv_bias=qkv_bias, tie_embeddings=bool(c.tie_word_embeddings),
                   max_seq_len=c.max_position_embeddings, o_bias=o_bias)


def _rope_parameters(c) -> dict:
    """transformers >= 5 keeps RoPE settings in ``config.rope_parameters``; older ones use attributes."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    scaling = getattr(c, "rope_scaling", None) or {}
    rope.update({k: v for k, v in scaling.items() if k not in rope})
    rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    return rope


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as the reference implementations do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(input_pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of angle pos * theta^(-2i/head_dim) for each position: (..., T, head_dim), fp32 math."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=input_pos.device, dtype=torch.float32) / head_dim))
    angles = input_pos[..., None].float() * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim): the "half-split" layout of HF
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i + head_dim/2}) pair of x (B, heads, T, head_dim) by its angle."""
    if cos.dim() == 3:  # per-sequence positions (B, T, head_dim): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        d, q_dim, kv_dim = cfg.hidden_size, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=cfg.o_bias)
        self.kv_cache = None  # seam 2: attend(q, k, v, input_pos, attn_fn) -> y, or update(input_pos, k, v)

    def forward(self, x, cos, sin, input_pos, attn_fn):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):  # fused by Decoder.fuse_projections: one matmul instead of three
            q, k, v = self.qkv_proj(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                              self.n_kv_head * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = self.kv_cache
        if cache is not None and hasattr(cache, "attend"):  # the cache owns its layout and attention call
            y = cache.attend(q, k, v, input_pos, attn_fn)  # (B, n_head, T, head_dim)
        else:
            if cache is not None:  # a plain cache: update(...) -> (k_all, v_all)
                k, v = cache.update(input_pos, k, v)  # (B, n_kv_head, S, head_dim)
            y = attn_fn(q, k, v, input_pos)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # fused by Decoder.fuse_projections
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos, attn_fn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, attn_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """A decoder-only transformer; module names follow Hugging Face so weights map one to one."""

    def __init__(self, cfg: DecoderConfig, attention="sdpa"):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.attn_fn = get_backend(attention)

    # ---- the three seams -------------------------------------------------------------------
    def set_attention(self, name_or_fn) -> "Decoder":
        """Seam 1: use another attention backend (a name in labutils.attention.BACKENDS or a function)."""
        self.attn_fn = get_backend(name_or_fn)
        return self

    def set_kv_caches(self, caches) -> "Decoder":
        """Seam 2: one KV cache per layer (or None to run without a cache)."""
        caches = [None] * self.cfg.n_layer if caches is None else list(caches)
        if len(caches) != self.cfg.n_layer:
            raise ValueError(f"need one cache per layer ({self.cfg.n_layer}), got {len(caches)}")
        for layer, cache in zip(self.layers, caches):
            del layer.self_attn.kv_cache  # a StaticKVCache (an nn.Module) registered itself as a child
            layer.self_attn.kv_cache = cache
        return self

    @contextlib.contextmanager
    def kv_caches_attached(self, caches):
        """Seam 2, scoped: ``with model.kv_caches_attached(caches): ...`` attaches the caches for the
        block and then puts back whatever was attached before (nothing, or another user's caches, as
        when a model drafts for itself)."""
        before = [layer.self_attn.kv_cache for layer in self.layers]
        self.set_kv_caches(caches)
        try:
            yield self
        finally:
            self.set_kv_caches(before)

    def swap_linears(self, make) -> "Decoder":
        """Seam 3: replace every nn.Linear by ``make(name, linear)`` (e.g. a quantized module).

        ``make`` may return the linear unchanged to keep it. With tied embeddings the lm_head shares
        its weight with the embedding table, so it is left alone.
        """
        for name, module in list(self.named_modules()):
            if isinstance(module, nn.Linear) and not (name == "lm_head" and self.cfg.tie_embeddings):
                parent_name, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent_name) if parent_name else self, child, make(name, module))
        return self

    def fuse_projections(self) -> "Decoder":
        """Concatenate q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj`` per layer.

        Same arithmetic, fewer and larger matmuls: at batch 1 each matmul is a pass over its weights,
        and a long pass wastes less time ramping up and down. The fused weights are new tensors (the
        originals stay with whoever else holds them, e.g. the HF model). Call before swap_linears.
        """
        def cat(linears):
            fused = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears),
                              bias=linears[0].bias is not None, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([l.weight for l in linears]))
                if fused.bias is not None:
                    fused.bias.copy_(torch.cat([l.bias for l in linears]))
            return fused

        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            if not hasattr(a, "qkv_proj"):
                a.qkv_proj = cat([a.q_proj, a.k_proj, a.v_proj])
                del a.q_proj, a.k_proj, a.v_proj
                m.gate_up_proj = cat([m.gate_proj, m.up_proj])
                del m.gate_proj, m.up_proj
        return self

    def first_layers(self, n: int) -> "Decoder":
        """A decoder made of this one's first n layers, its final norm and its lm_head, every module
        shared (nothing copied): an early-exit draft model for self-speculation (notebook 05). The
        layers are the same modules, so caches must be attached in a scope
        (``kv_caches_attached``), never left on."""
        if not 1 <= n <= self.cfg.n_layer:
            raise ValueError(f"n must be in 1..{self.cfg.n_layer}, got {n}")
        view = Decoder.__new__(Decoder)
        nn.Module.__init__(view)
        view.cfg = replace(self.cfg, n_layer=n)
        view.embed_tokens, view.norm, view.lm_head = self.embed_tokens, self.norm, self.lm_head
        view.layers = nn.ModuleList(list(self.layers[:n]))
        view.attn_fn = self.attn_fn
        return view

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False, logits_at: torch.Tensor | None = None):
        """idx (B, T) token ids at positions input_pos ((T,) or (B, T); default 0 .. T-1) -> logits.

        Returns (B, T, vocab), or (B, 1, vocab) for the last position only when ``last_only``, or
        (B, M, vocab) at the M token indices ``logits_at`` (M,) (e.g. each sequence's last token in
        a flattened ragged batch (1, N) of a paged step, labutils.paged_attention).
        ``return_hidden``: also the final hidden states, after the last norm (what the lm_head reads),
        as ``(logits, hidden)`` with hidden (B, T or 1, d): the features a draft head learns from
        (notebook 05).
        """
        if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"idx must be integer token ids (B, T) with T >= 1, got shape {tuple(idx.shape)} "
                             f"and dtype {idx.dtype}; use idx[None] for one sequence, idx.long() for ids")
        B, T = idx.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        x = self.embed_tokens(idx)  # (B, T, d)
        cos, sin = rope_cos_sin(input_pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, self.attn_fn)
        if logits_at is not None:
            if last_only:
                raise ValueError("pass last_only or logits_at, not both")
            x = x[:, logits_at]  # (B, M, d)
        elif last_only:
            x = x[:, -1:]
        h = self.norm(x)  # (B, T, d)
        logits = self.lm_head(h)  # (B, T, vocab)
        return (logits, h) if return_hidden else logits

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, attention="sdpa") -> "Decoder":
        """The lab decoder with the weights of a transformers *ForCausalLM (storage shared, not copied)."""
        cfg = DecoderConfig.from_hf(hf_model.config)
        with torch.device("meta"):
            model = cls(cfg, attention=attention)
        state = {key.removeprefix("model."): t for key, t in hf_model.state_dict().items()}
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def extra_repr(self):
        c = self.cfg
        return (f"layers={c.n_layer}, d={c.hidden_size}, heads={c.n_head}/{c.n_kv_head} (q/kv), "
                f"head_dim={c.head_dim}, ffn={c.intermediate_size}, vocab={c.vocab_size}")

