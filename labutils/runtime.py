"""Where the book runs: the device, the run mode (full or smoke) and Triton's interpreter.

Imported first by ``labutils/__init__.py`` so that ``TRITON_INTERPRET=1`` is set *before* any
Triton kernel is defined: Triton decides at decoration time whether a kernel is compiled for the
GPU or run by its NumPy interpreter on the CPU.

Smoke mode shrinks every size so that the whole book runs on a 2-core CPU in CI. It is on when
there is no GPU, when ``CI`` is set, or when ``LAB_SMOKE=1``; ``LAB_SMOKE=0`` forces full sizes
(for instance on a CPU machine with a lot of patience).
"""
from __future__ import annotations

import os

import torch

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def has_cuda() -> bool:
    return torch.cuda.is_available()


# Triton's interpreter must be chosen before any @triton.jit runs; an explicit setting wins.
if not has_cuda() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if has_cuda() else "cpu")


def device_name() -> str:
    """A human-readable device name, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu (2 cores)'."""
    if has_cuda():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def smoke() -> bool:
    """True when every size should be small: no GPU, CI=true, or LAB_SMOKE=1 (LAB_SMOKE=0 forces off)."""
    forced = os.environ.get("LAB_SMOKE", "").strip().lower()
    if forced in _TRUE:
        return True
    if forced in _FALSE:
        return False
    if os.environ.get("CI", "").strip().lower() not in ("", *_FALSE):
        return True
    return not has_cuda()


def triton_interpreted() -> bool:
    """True when Triton kernels run in the NumPy interpreter (CPU) instead of compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def pick(full, smoke_value):
    """``full`` in a full run, ``smoke_value`` in a smoke run: ``pick([512, 4096, 16384], [64, 128])``."""
    return smoke_value if smoke() else full


def default_dtype() -> torch.dtype:
    """bf16 on a GPU that supports it (the book's working dtype), fp32 on the CPU."""
    if has_cuda() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def describe() -> str:
    mode = "smoke" if smoke() else "full"
    tri = ", Triton interpreter" if triton_interpreted() else ""
    return f"device: {device_name()} | mode: {mode}{tri} | torch {torch.__version__}"
