"""Run mode (smoke / full), Triton's interpreter on the CPU, and a Triton kernel tested in CI."""
from __future__ import annotations

import os

import pytest
import torch

import labutils
from labutils import runtime

# (LAB_SMOKE, CI, has_cuda) -> smoke()
CASES = [
    ("1", None, True, True), ("1", "true", True, True), ("true", None, True, True),
    ("0", None, False, False), ("0", "true", False, False), ("off", "true", True, False),
    (None, "true", True, True), (None, "1", True, True), (None, "false", True, False),
    (None, None, True, False), (None, None, False, True), ("", None, True, False),
]


@pytest.mark.parametrize("lab_smoke,ci,cuda,expected", CASES)
def test_smoke(monkeypatch, lab_smoke, ci, cuda, expected):
    for var, value in (("LAB_SMOKE", lab_smoke), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    monkeypatch.setattr(runtime, "has_cuda", lambda: cuda)
    assert runtime.smoke() is expected, f"LAB_SMOKE={lab_smoke} CI={ci} cuda={cuda}: smoke()={runtime.smoke()}"
    assert runtime.pick("full", "small") == ("small" if expected else "full")
    assert labutils.pick([1, 2, 3], [1]) == ([1] if expected else [1, 2, 3])


def test_smoke_on_this_machine(monkeypatch):
    monkeypatch.delenv("LAB_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert runtime.smoke() is (not torch.cuda.is_available())


@pytest.mark.skipif(torch.cuda.is_available(), reason="only on a machine without GPU")
def test_triton_interpreter_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1", os.environ.get("TRITON_INTERPRET")
    assert runtime.triton_interpreted()
    assert runtime.device() == torch.device("cpu")
    assert runtime.default_dtype() == torch.float32
    assert "cpu" in runtime.describe() and "smoke" in runtime.describe()


def test_triton_interpreted_reads_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not runtime.triton_interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert runtime.triton_interpreted()


# ---- a Triton kernel, run by the interpreter on the CPU (compiled on a GPU) ----------------------------------
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


def triton_add(x, y, block=128):
    out = torch.empty_like(x)
    n = x.numel()
    _add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1000, 4096])
def test_triton_vector_add(dtype, n):
    dev = runtime.device()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dev, dtype)
    y = torch.randn(n, generator=g).to(dev, dtype)
    out = triton_add(x, y)
    assert out.dtype == dtype and out.shape == x.shape
    err = (out.float() - (x + y).float()).abs().max().item()
    assert err == 0.0, f"Triton add vs torch ({dtype}, n={n}): max|diff| = {err}"
