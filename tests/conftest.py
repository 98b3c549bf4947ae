"""Shared fixtures: the embedded model (loaded once per session) and tiny random HF models.

The environment is set *before* labutils (and huggingface_hub) are imported: HF_HUB_OFFLINE is read
by huggingface_hub at import time, and LAB_SMOKE keeps every size small.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LAB_SMOKE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import labutils  # noqa: E402,F401  (sets TRITON_INTERPRET=1 on a machine without GPU)

# one thread per pytest-xdist worker (scripts/test.sh runs one worker per core): two workers of two
# threads each on two cores slow each other far more than they gain
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


# ---- numerical helpers --------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}"
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_same_tokens(lab: torch.Tensor, ref: torch.Tensor, prompt_len: int, what: str):
    assert lab.shape == ref.shape, f"{what}: shapes {tuple(lab.shape)} vs {tuple(ref.shape)}"
    assert torch.equal(lab[:, :prompt_len], ref[:, :prompt_len]), f"{what}: the prompt was altered"
    diff = (lab[:, prompt_len:] != ref[:, prompt_len:]).nonzero()
    if len(diff):
        b, t = diff[0].tolist()
        raise AssertionError(
            f"{what}: {len(diff)} generated tokens differ; first at sequence {b}, step {t}: "
            f"got {lab[b, prompt_len:].tolist()} vs reference {ref[b, prompt_len:].tolist()}")


def assert_rel_close(out, ref, tol: float, what: str = ""):
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: max|diff|/max|ref| = {err:.3e} > {tol:.0e}"


def norm_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def prompts_of(lengths, vocab: int, seed: int) -> list:
    """Seeded random prompts, one list of token ids per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


# ---- the embedded model -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def embedded():
    """(hf_model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32, CPU, eval mode."""
    from labutils.models import load_model

    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# ---- tiny random models of each family ------------------------------------------------------------
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
            vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            bos_token_id=None, eos_token_id=None, pad_token_id=0)

# name -> (model_type, extra config fields). Every family, GQA and MHA, tied and untied embeddings.
TINY_FAMILIES = {
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True)),
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, num_hidden_layers=3, tie_word_embeddings=False)),
    "llama-gqa-attn-bias": ("llama", dict(num_key_value_heads=2, num_hidden_layers=2,
                                           tie_word_embeddings=False, attention_bias=True)),
    "qwen2-gqa-tied": ("qwen2", dict(num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True,
                                     use_sliding_window=False)),
    "qwen2-mha-untied": ("qwen2", dict(num_key_value_heads=4, num_hidden_layers=3, tie_word_embeddings=False,
                                       use_sliding_window=False)),
    "mistral-gqa-untied": ("mistral", dict(num_key_value_heads=2, num_hidden_layers=3,
                                           tie_word_embeddings=False, sliding_window=None)),
    "mistral-mha-tied": ("mistral", dict(num_key_value_heads=4, num_hidden_layers=2,
                                         tie_word_embeddings=True, sliding_window=None)),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    model_type, extra = TINY_FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**TINY, **extra, **overrides})


@torch.no_grad()
def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A seeded random transformers *ForCausalLM of the tiny family, fp32, eval mode.

    Every parameter is re-drawn (norm weights around 1, biases non-zero) so that no part of the
    computation (norm weights, q/k/v biases, ...) can be skipped without changing the logits.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    model.eval()
    model.requires_grad_(False)
    return model


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: JupyterLab in headless Chromium (tests/test_browser.py; "
                                       "scripts/test.sh runs it as its own phase)")


def assert_fails_naming_the_case(name, fn, label, detail, capsys):
    """A wrong answer to exercise ``name`` fails its check, and the message names the failing case
    (``label``), what differs (``detail``), the inputs and the exercise's hint."""
    from labutils.exercises import EXERCISES, check

    assert not check(name, fn)
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: failed "), out
    assert label in out and detail in out, out
    assert "inputs: " in out and f"hint: {EXERCISES[name].hint}" in out, out
