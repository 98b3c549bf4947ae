"""Model loading (offline behaviour, the embedded model), the architecture table and shape twins."""
from __future__ import annotations

import time

import pytest
import torch

from labutils import configs, models


def _rope_theta(config):
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def _hf_config(fields: dict):
    from transformers import AutoConfig

    fields = dict(fields)
    fields.pop("hub_id")
    fields.pop("architectures")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _meta_param_count(config) -> int:
    """Unique parameters of the transformers model for ``config``, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert all(p.is_meta for p in model.parameters()), "something was allocated"
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# ---- loading ----------------------------------------------------------------------------------------------
def test_offline_hub_id_fails_fast_with_guidance(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(models.ModelUnavailableError) as info:
        models.load_model("Qwen/Qwen2.5-7B-Instruct")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"took {elapsed:.1f} s to fail"
    msg = str(info.value)
    for needle in ("SmolLM2-135M-Instruct", "shape_twin", "Qwen/Qwen2.5-7B-Instruct"):
        assert needle in msg, f"{needle!r} missing from the message: {msg}"


def test_missing_gguf_raises(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    monkeypatch.setenv("LABUTILS_GGUF", str(missing))
    monkeypatch.setenv("LABUTILS_CACHE", str(empty_cache))
    assert models.cache_dir() == empty_cache
    with pytest.raises(models.ModelUnavailableError, match="LABUTILS_GGUF"):
        models.load_model()
    assert not any(empty_cache.iterdir()), "a failed load left files in the cache"


def test_embedded_config_matches_table(embedded):
    config = embedded[0].config
    table = configs.ARCHITECTURES["SmolLM2-135M"]
    assert config.model_type == table["model_type"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(config, key) == table[key], f"{key}: model {getattr(config, key)} vs table {table[key]}"
    assert _rope_theta(config) == pytest.approx(table["rope_theta"]), \
        f"rope theta: model {_rope_theta(config)} vs table {table['rope_theta']}"
    assert config.rms_norm_eps == pytest.approx(table["rms_norm_eps"], rel=1e-6), \
        f"rms_norm_eps: model {config.rms_norm_eps} vs table {table['rms_norm_eps']}"


def test_embedded_model_is_fp32_eval_and_tied(embedded):
    model, tokenizer = embedded
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    assert ids.shape[1] >= 2 and tokenizer.decode(ids[0]).strip().endswith("world")


# ---- the architecture table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(configs.ARCHITECTURES))
def test_param_count_matches_transformers(name):
    fields = configs.ARCHITECTURES[name]
    expected = _meta_param_count(_hf_config(fields))
    got = configs.param_count(fields)
    assert got == expected, f"{name}: param_count {got:,} vs transformers {expected:,} ({got - expected:+,})"


@pytest.mark.parametrize("family", ["llama-gqa-tied", "llama-mha-untied", "qwen2-gqa-tied", "mistral-gqa-untied",
                                    "llama-gqa-attn-bias"])
def test_param_count_tiny_configs(family):
    from conftest import tiny_config

    config = tiny_config(family)
    fields = {k: getattr(config, k) for k in ("model_type", "hidden_size", "intermediate_size",
                                              "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "vocab_size",
                                              "tie_word_embeddings")}
    fields["attention_bias"] = getattr(config, "attention_bias", False)
    expected = _meta_param_count(config)
    got = configs.param_count(fields)
    assert got == expected, f"{family}: param_count {got:,} vs transformers {expected:,} ({got - expected:+,})"


def test_arch_lookup():
    assert configs.arch("Qwen2.5-7B")["hidden_size"] == 3584
    assert configs.arch("Qwen/Qwen2.5-7B-Instruct") == configs.ARCHITECTURES["Qwen2.5-7B"]
    a = configs.arch("Llama-3-8B")
    a["hidden_size"] = 1
    assert configs.ARCHITECTURES["Llama-3-8B"]["hidden_size"] == 4096, "arch() returned the table's own dict"
    with pytest.raises(KeyError) as info:
        configs.arch("unknown")
    msg = str(info.value)
    assert "unknown" in msg and all(key in msg for key in configs.ARCHITECTURES), f"message: {msg}"


def test_twins_are_in_table():
    assert set(configs.TWINS) <= set(configs.ARCHITECTURES), set(configs.TWINS) - set(configs.ARCHITECTURES)


# ---- shape twins --------------------------------------------------------------------------------------------
def test_shape_twin_smollm2_matches_embedded(embedded):
    twin = models.shape_twin("SmolLM2-135M", dtype=torch.float32, device="cpu")
    table = configs.ARCHITECTURES["SmolLM2-135M"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(twin.config, key) == table[key], f"twin {key}: {getattr(twin.config, key)} vs {table[key]}"
    assert _rope_theta(twin.config) == pytest.approx(table["rope_theta"])
    assert twin.shape_twin_of == table["hub_id"]
    assert not twin.training
    n_twin = sum(p.numel() for p in twin.parameters())
    n_real = sum(p.numel() for p in embedded[0].parameters())
    assert n_twin == n_real == configs.param_count(table), \
        f"twin {n_twin:,} vs embedded {n_real:,} vs table {configs.param_count(table):,}"
    assert {p.dtype for p in twin.parameters()} == {torch.float32}
    assert {p.device.type for p in twin.parameters()} == {"cpu"}
    del twin


@pytest.mark.parametrize("name", configs.TWINS)
def test_shape_twin_on_meta_has_table_shape(monkeypatch, name):
    """Every twin, built on the meta device (nothing allocated): table config, table parameter count."""
    monkeypatch.setattr(models, "_free_bytes", lambda device: 1 << 50)
    twin = models.shape_twin(name, dtype=torch.bfloat16, device="meta")
    table = configs.ARCHITECTURES[name]
    assert twin.config.model_type == table["model_type"]
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(twin.config, key) == table[key], f"{name} {key}: {getattr(twin.config, key)} vs {table[key]}"
    assert _rope_theta(twin.config) == pytest.approx(table["rope_theta"])
    n = sum(p.numel() for p in twin.parameters())
    assert n == configs.param_count(table), f"{name}: twin {n:,} vs table {configs.param_count(table):,}"
    assert {p.dtype for p in twin.parameters()} == {torch.bfloat16}


def test_shape_twin_refuses_before_allocating(monkeypatch):
    import transformers

    monkeypatch.setattr(models, "_free_bytes", lambda device: 1 << 20)  # 1 MiB free

    def must_not_build(*args, **kwargs):
        raise AssertionError("shape_twin started building the model")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", must_not_build)
    with pytest.raises(MemoryError, match="GiB"):
        models.shape_twin("Qwen2.5-7B", dtype=torch.bfloat16, device="cpu")
    with pytest.raises(MemoryError):
        models.shape_twin("SmolLM2-135M", dtype=torch.float32, device="cpu")


def test_shape_twin_memory_threshold(monkeypatch):
    """The check compares the weight bytes (param_count * dtype size) with the free memory."""
    import transformers

    need = configs.param_count(configs.ARCHITECTURES["Qwen2.5-7B"]) * 2
    built = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: built.append(1) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(models, "_free_bytes", lambda device: int(need * 0.95))  # weights barely fit: refused
    with pytest.raises(MemoryError):
        models.shape_twin("Qwen2.5-7B", dtype=torch.bfloat16, device="cpu")
    monkeypatch.setattr(models, "_free_bytes", lambda device: need * 2)
    models.shape_twin("Qwen2.5-7B", dtype=torch.bfloat16, device="cpu")
    assert built == [1], "with twice the needed memory free the twin should be built"
    monkeypatch.setattr(models, "_free_bytes", lambda device: int(need * 1.25))  # fits in bf16
    models.shape_twin("Qwen2.5-7B", dtype=torch.bfloat16, device="cpu")
    with pytest.raises(MemoryError):  # but not in fp32, which needs twice the bytes
        models.shape_twin("Qwen2.5-7B", dtype=torch.float32, device="cpu")


def test_first_use_dequantizes_quietly(tmp_path, monkeypatch, capfd):
    """The first load converts the GGUF once (~20 s) and says so in one line, without a progress bar
    (it would stay in a notebook's saved output) or an absolute path."""
    from labutils import models

    monkeypatch.setenv("LABUTILS_CACHE", str(tmp_path))
    path = models._embedded_cache()
    assert (path / "model.safetensors").is_file() and path.parent == tmp_path
    out, err = capfd.readouterr()
    assert out.startswith("first use: dequantizing SmolLM2-135M-Instruct.Q4_1.gguf") and str(tmp_path) not in out
    assert "Converting" not in err and "%|" not in err, err[-500:]
