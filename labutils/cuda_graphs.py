"""CUDA-graph helpers shared by the decode engine (notebook 02) and speculative decoding (notebook 05).

``Graphed``: a function of static buffers recorded once and replayed on new contents.

``BucketedPrefill``: the prompt's forward replayed from a CUDA graph. A prompt's length changes from
call to call, and a graph replays fixed shapes, so the prompt is padded to a whole number of
``bucket`` tokens and one graph is recorded per padded length. Padding is harmless in a static KV
cache: the pad tokens sit at positions T .. T_pad - 1, after every real token, so the causal mask
(key position <= query position) hides them from the prompt's queries, and decoding writes over
them position by position before any later query could see them (as rejected drafts are
overwritten in speculative decoding). What padding costs is the pad tokens' compute; what the graph
saves is the CPU time to launch a forward of a few hundred kernels, which for a small model is
longer than the forward itself.
"""
from __future__ import annotations

import torch


class Graphed:
    """``fn(*buffers)`` captured once in a CUDA graph and replayed on new contents of its static
    input buffers (outputs are static tensors too: read or clone them before the next replay)."""

    def __init__(self, fn, *buffers, pool=None, capture_error_mode: str = "global"):
        self.fn, self.buffers = fn, buffers
        fn(*buffers)  # compiles and autotunes on the default stream
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, on a side stream as capture wants
            fn(*buffers)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=capture_error_mode):
            self.out = fn(*buffers)

    def __call__(self, *values):
        for buf, v in zip(self.buffers, values):
            buf.copy_(v)
        self.graph.replay()
        return self.out


def padded_length(T: int, bucket: int) -> int:
    """T rounded up to a whole number of ``bucket`` tokens."""
    return -(-T // bucket) * bucket


class BucketedPrefill:
    """The prompt's forward through ``model``, padded to a multiple of ``bucket`` tokens and, with
    ``graph=True``, replayed from one CUDA graph per padded length (recorded on first use).

    Call it with the caches it writes attached to the model (a recorded graph keeps writing to the
    caches attached when it was recorded: make a new ``BucketedPrefill`` for new caches).
    ``capacity``: the caches' positions; a prompt whose padded length exceeds it runs unpadded, eagerly.

    ``__call__(idx)`` with idx (B, T) returns, as the model would for the unpadded prompt:
    ``full=False``: logits (B, 1, vocab) at the last prompt position;
    ``full=True``: (logits (B, T, vocab), hidden (B, T, d)) at every prompt position.
    """

    def __init__(self, model, capacity: int, bucket: int = 64, graph: bool = False, full: bool = False,
                 capture_error_mode: str = "global"):
        if not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"prefill bucket must be a positive number of tokens, got {bucket!r}")
        if graph and model.device.type != "cuda":
            raise RuntimeError("a graphed prefill records CUDA graphs and needs a GPU")
        self.model, self.capacity, self.bucket = model, capacity, bucket
        self.graph, self.full, self.capture_error_mode = graph, full, capture_error_mode
        self._graphs = {}  # (B, T_pad) -> Graphed
        self._pool = torch.cuda.graph_pool_handle() if graph else None  # one memory pool for all lengths

    def _forward(self, idx, last):
        pos = torch.arange(idx.shape[1], device=idx.device)
        if self.full:
            return self.model(idx, pos, return_hidden=True)
        return self.model(idx, pos, logits_at=last)

    def __call__(self, idx: torch.Tensor):
        B, T = idx.shape
        Tp = padded_length(T, self.bucket)
        if Tp > self.capacity:  # no room for the padding: the prompt as it is
            pos = torch.arange(T, device=idx.device)
            return self.model(idx, pos, return_hidden=True) if self.full else self.model(idx, pos, last_only=True)
        padded = torch.zeros(B, Tp, dtype=idx.dtype, device=idx.device)
        padded[:, :T] = idx
        last = torch.full((1,), T - 1, dtype=torch.long, device=idx.device)
        if not self.graph:
            out = self._forward(padded, last)
        else:
            key = (B, Tp)
            if key not in self._graphs:
                self._graphs[key] = Graphed(self._forward, padded.clone(), last.clone(), pool=self._pool,
                                              capture_error_mode=self.capture_error_mode)
            out = self._graphs[key](padded, last)
        if self.full:
            logits, hidden = out
            return logits[:, :T], hidden[:, :T]
        return out
