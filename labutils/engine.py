"""A greedy decode engine on the lab decoder: static KV cache, then CUDA graphs (notebook 02).

At batch 1 a decode step must read every weight once, so its speed limit is bandwidth / weight
bytes. Python and kernel-launch overhead stand between an eager loop and that limit: a 7B decoder
step launches ~1,400 GPU operations (counted in notebook 02). ``DecodeEngine`` removes that
overhead in stages:

- ``mode="eager"``: static cache, one forward per token, launched from Python;
- ``mode="graph"``: the same step captured once in a ``torch.cuda.CUDAGraph`` and replayed, so the
  CPU launches one graph per token instead of ~1,400 kernels (the step's shapes never change thanks
  to the static cache, which is what makes capture possible);
- ``mode="compile"``: the step compiled by ``torch.compile`` (Inductor fuses norms, RoPE and
  SwiGLU into fewer kernels and writes its own matrix-vector kernels), then captured the same way.
  ``regional=True`` compiles one decoder layer instead of the whole step (``compile_layers``): the
  layers share one compiled graph, so compiling a 28-layer model costs about as much as one layer,
  at the price of no fusion across layer boundaries (the glue around the layers stays eager, inside
  the same CUDA graph).

Inside the captured step the sampled token is written back into the input buffer and the position
advanced, so the loop is ``replay(); record token`` per step.

The prompt's forward (prefill) launches as many kernels per layer as a step, and for a small model
launching them takes longer than running them. ``prefill_bucket=N`` pads the prompt to a multiple of
N tokens (harmless in a static cache: labutils.cuda_graphs) and, in the graph and compile modes,
replays it from one CUDA graph per padded length.

The engine's caches are attached to the model only while prefill / decode run
(``Decoder.kv_caches_attached``), so a plain forward, a perplexity run or another engine on the same
model never sees them. (A captured CUDA graph baked the caches in when it was recorded, with them
attached, so its replays need nothing attached.)
"""
from __future__ import annotations

import contextlib
import time

import torch

from .cuda_graphs import BucketedPrefill
from .generate import check_count, check_token_ids
from .kv_cache import static_caches

MODES = ("eager", "graph", "compile")


def configure_inductor():
    """Inductor settings that suit batch-1 decoding (as in gpt-fast)."""
    import torch._inductor.config as ic

    ic.coordinate_descent_tuning = True
    ic.triton.unique_kernel_names = True
    ic.fx_graph_cache = True


def compile_layers(model, **compile_kw):
    """Regional compilation: ``torch.compile`` each decoder layer *in place* (``nn.Module.compile``).
    Identical layers reuse one compiled graph per input shape, so compile time no longer grows with
    depth. Every later call of these layers runs compiled code; ``torch.compiler.set_stance
    ("force_eager")`` runs them eagerly (as DecodeEngine's prefill does, to avoid one compile per
    prompt length)."""
    import torch._dynamo.config as dynamo_config

    # one graph per kind of layer: a notebook comparing variants of a model (cuBLAS or SmallMLinear,
    # SDPA or Triton attention, another dtype or architecture) needs more than Dynamo's default of 8
    # graphs for the one Block.forward, and with fullgraph=True passing the limit is an error
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    for layer in model.layers:
        layer.compile(**{"fullgraph": True, "dynamic": False, **compile_kw})
    return model


class DecodeEngine:
    # "thread_local" lets other threads make CUDA calls during the capture (NCCL's watchdog thread
    # polls its events: a tensor-parallel shard's engine, labutils.tp, sets it)
    capture_error_mode = "global"

    def __init__(self, model, batch: int = 1, max_seq_len: int = 1024, mode: str = "eager",
                 regional: bool = False, prefill_bucket: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if regional and mode != "compile":
            raise ValueError("regional=True is a way of compiling: it needs mode='compile'")
        if mode != "eager" and model.device.type != "cuda":
            raise RuntimeError(f"mode={mode!r} captures CUDA graphs and needs a GPU; use mode='eager' on the CPU")
        batch = check_count(batch, "batch", minimum=1)
        max_seq_len = check_count(max_seq_len, "max_seq_len", minimum=2)
        self.model, self.batch, self.mode = model, batch, mode
        self.max_seq_len = max_seq_len
        self.caches = static_caches(model, batch, max_seq_len)
        dev = model.device
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the step's input token
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position
        self.graph = None
        self._ready = False  # True once prefill has filled the cache: decode continues from there
        step = self._step
        self.regional = regional
        if mode == "compile":
            configure_inductor()
            if regional:
                compile_layers(model)
            else:
                step = torch.compile(self._step, fullgraph=True, dynamic=False)
        self.step_fn = step
        self._prefill = None if prefill_bucket is None else BucketedPrefill(
            model, max_seq_len, check_count(prefill_bucket, "prefill_bucket", minimum=1), graph=mode != "eager",
            capture_error_mode=self.capture_error_mode)

    def _step(self, tok, pos):
        """One decode step: logits for the new token, argmax, feed it back, advance the position."""
        logits = self.model(tok, pos, last_only=True)  # (B, 1, vocab)
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        tok.copy_(nxt)
        pos.add_(1)
        return nxt

    def _attached(self):
        """The engine's caches on the model for one call, then whatever was there before put back."""
        return self.model.kv_caches_attached(self.caches)

    def _check_prompt(self, idx, name="idx") -> int:
        """T of the prompt idx (B, T), or one clear error: not 2-D integer ids, wrong batch or device,
        ids outside the vocabulary, empty, or no room left in the cache."""
        B, T = check_token_ids(idx, name, self.model.cfg.vocab_size, self.model.device)
        if B != self.batch:
            raise ValueError(f"engine built for batch {self.batch}, got {name} of batch {B} (shape {tuple(idx.shape)})")
        if T >= self.max_seq_len:
            raise ValueError(f"a prompt of {T} tokens leaves no room in the cache's {self.max_seq_len} positions; "
                             f"build the engine with max_seq_len > {T}")
        return T

    def _capture(self):
        """Compile (and autotune) with one step on the default stream, warm up on a side stream, then
        record the step once. (On the H100, a regional compile of the 7B twin whose first step ran on
        the side stream stalled for over 7 minutes in one notebook run; on the default stream it
        takes 20-60 s: scripts/probes/probe_e2e.py.)"""
        saved_tok, saved_pos = self.tok.clone(), self.pos.clone()  # warm-up steps advance both
        self.step_fn(self.tok, self.pos)  # also in "graph" mode: the model's layers may be compiled (compile_layers)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.step_fn(self.tok, self.pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode=self.capture_error_mode):
            self.step_fn(self.tok, self.pos)
        self.tok.copy_(saved_tok)
        self.pos.copy_(saved_pos)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the prompt idx (B, T) through the model, filling the cache; returns the first new token."""
        T = self._check_prompt(idx)
        self._ready = False  # until this prefill completes, decode refuses to run on a half-filled cache
        for c in self.caches:
            c.reset()
        # compiled layers (regional): the prompt runs eagerly, not one compile per prompt length
        with self._attached(), \
                torch.compiler.set_stance("force_eager") if self.regional else contextlib.nullcontext():
            if self._prefill is not None:  # padded, and replayed from a CUDA graph on the GPU
                self._prefill.capture_error_mode = self.capture_error_mode
                logits = self._prefill(idx)
            else:
                logits = self.model(idx, torch.arange(T, device=idx.device), last_only=True)
        self.tok.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        self.pos.fill_(T)
        self._ready = True
        return self.tok.clone()

    @torch.no_grad()
    def decode(self, n: int) -> torch.Tensor:
        """n more tokens after prefill (or after the last decode): (B, n); n = 0 gives (B, 0)."""
        n = check_count(n, "n")
        if not self._ready:
            raise RuntimeError("decode continues a prompt: call prefill(idx) first (or use generate(idx, n))")
        if int(self.pos) + n > self.max_seq_len:
            raise ValueError(f"{int(self.pos)} + {n} tokens exceed the cache's {self.max_seq_len} positions")
        out = torch.empty(self.batch, n, dtype=torch.long, device=self.tok.device)
        if n == 0:
            return out
        with self._attached():  # capture records the step with the caches attached
            if self.mode != "eager" and self.graph is None:
                self._capture()
            for i in range(n):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.step_fn(self.tok, self.pos)
                out[:, i : i + 1].copy_(self.tok)
        return out

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: idx (B, T) -> (B, T + max_new_tokens); 0 new tokens gives a copy of idx."""
        T = self._check_prompt(idx)
        max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        if max_new_tokens < 1:
            return idx.clone()
        if T + max_new_tokens - 1 > self.max_seq_len:  # checked before prefill touches the cache
            raise ValueError(f"a prompt of {T} tokens plus max_new_tokens={max_new_tokens} needs "
                             f"{T + max_new_tokens - 1} cache positions, the engine holds {self.max_seq_len}")
        first = self.prefill(idx)
        return torch.cat([idx, first, self.decode(max_new_tokens - 1)], dim=1)

    @torch.no_grad()
    def decode_tok_s(self, idx: torch.Tensor, n: int = 128, repeats: int = 3) -> float:
        """Decode throughput in tokens/s for all sequences together (prefill not counted); best of
        ``repeats`` timed runs after one warm-up run."""
        T = self._check_prompt(idx)
        n = check_count(n, "n", minimum=1)
        repeats = check_count(repeats, "repeats", minimum=1)
        if T + n > self.max_seq_len:
            raise ValueError(f"a prompt of {T} tokens plus n={n} decode steps needs {T + n} cache positions, "
                             f"the engine holds {self.max_seq_len}")
        best = float("inf")
        for r in range(repeats + 1):
            self.prefill(idx)
            if self.mode != "eager" and self.graph is None:
                with self._attached():
                    self._capture()
            sync = torch.cuda.synchronize if idx.is_cuda else (lambda: None)
            sync()
            t0 = time.perf_counter()
            self.decode(n)
            sync()
            if r:
                best = min(best, time.perf_counter() - t0)
        return self.batch * n / best


@torch.no_grad()
def hf_decode_tok_s(hf_model, idx: torch.Tensor, n: int = 64, repeats: int = 2,
                    static_cache_len: int | None = None) -> float:
    """Decode throughput of ``hf_model.generate`` (greedy, exactly n new tokens), prefill excluded:
    (n - 1) * batch / (t(n tokens) - t(1 token)), each time the best of ``repeats`` after a warm-up.

    ``static_cache_len``: give every call a fresh transformers ``StaticCache`` of that many positions
    (one shape for all calls, so the forward that transformers then compiles is compiled once).
    """
    device = next(hf_model.parameters()).device
    B, T = check_token_ids(idx, "idx", getattr(hf_model.config, "vocab_size", None), device)
    n = check_count(n, "n", minimum=2)  # the rate is a difference between n tokens and 1 token
    repeats = check_count(repeats, "repeats", minimum=1)
    if static_cache_len is not None:
        static_cache_len = check_count(static_cache_len, "static_cache_len", minimum=1)
        if static_cache_len < T + n:
            raise ValueError(f"static_cache_len={static_cache_len} cannot hold a prompt of {T} tokens plus "
                             f"n={n} new ones: use static_cache_len >= {T + n}")

    def timed(k):
        best = float("inf")
        for _ in range(repeats):
            kwargs = {}
            if static_cache_len is not None:  # a fresh cache per call: a used one holds the last call's tokens
                from transformers import StaticCache
                kwargs["past_key_values"] = StaticCache(config=hf_model.config, max_cache_len=static_cache_len)
            if idx.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, pad_token_id=0, **kwargs)
            if idx.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    timed(2)  # warm-up (and compilation, if the model is compiled)
    return idx.shape[0] * (n - 1) / (timed(n) - timed(1))
