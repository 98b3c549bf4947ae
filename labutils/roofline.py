"""The roofline model for LLM inference (notebook 00): FLOPs, bytes and KV-cache size per model.

A kernel that does F FLOPs and moves M bytes has arithmetic intensity I = F / M. On a device with
peak rate P (FLOP/s) and bandwidth W (B/s) it can at best run at min(P, W * I): memory-bound below
the ridge point I* = P / W, compute-bound above it.
"""
from __future__ import annotations

from . import configs


def _dims(cfg: dict):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], hd


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """K and V, every layer, every KV head: 2 * n_layer * n_kv_head * head_dim * bytes."""
    n_layer, _, n_kv_head, head_dim = _dims(cfg)
    return 2 * n_layer * n_kv_head * head_dim * dtype_bytes


def kv_cache_bytes(cfg: dict, seq_len: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    return batch * seq_len * kv_bytes_per_token(cfg, dtype_bytes)


def linear_params(cfg: dict) -> int:
    """Parameters that take part in a matmul for each token: every projection plus the lm_head."""
    d = cfg["hidden_size"]
    embedding_only = 0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * d
    norms = (2 * cfg["num_hidden_layers"] + 1) * d
    return configs.param_count(cfg) - embedding_only - norms


def decode_step(cfg: dict, batch: int = 1, context: int = 0, dtype_bytes: int = 2) -> dict:
    """One decode step for ``batch`` sequences, each attending to ``context`` cached tokens.

    FLOPs: 2 per weight per token, plus attention (QK^T and PV: 4 * n_head * head_dim per cached
    token per layer). Bytes: every weight once (shared by the batch) plus each sequence's KV cache.
    """
    n_layer, n_head, _, head_dim = _dims(cfg)
    n = linear_params(cfg)
    flops = 2 * n * batch + 4 * n_layer * n_head * head_dim * context * batch
    nbytes = n * dtype_bytes + batch * context * kv_bytes_per_token(cfg, dtype_bytes)
    return {"flops": flops, "bytes": nbytes, "intensity": flops / nbytes}


def prefill(cfg: dict, seq_len: int, dtype_bytes: int = 2) -> dict:
    """A prompt of ``seq_len`` tokens: weights read once, causal attention over the prompt."""
    n_layer, n_head, _, head_dim = _dims(cfg)
    n = linear_params(cfg)
    flops = 2 * n * seq_len + 2 * n_layer * n_head * head_dim * seq_len**2  # causal: half of 4*T^2*hd
    nbytes = n * dtype_bytes + seq_len * kv_bytes_per_token(cfg, dtype_bytes)
    return {"flops": flops, "bytes": nbytes, "intensity": flops / nbytes}


def attainable_tflops(intensity: float, peak_tflops: float, bw_gbps: float) -> float:
    """min(peak, bandwidth * intensity): the roof over a kernel of that intensity."""
    return min(peak_tflops, bw_gbps * intensity / 1e3)


def ridge_point(peak_tflops: float, bw_gbps: float) -> float:
    """FLOP/byte where the two roofs meet."""
    return peak_tflops * 1e3 / bw_gbps


def decode_tok_s_bound(cfg: dict, peak_tflops: float, bw_gbps: float, batch: int = 1,
                       context: int = 0, dtype_bytes: int = 2) -> float:
    """Upper bound on tokens per second (all sequences together) for decode at this batch size."""
    step = decode_step(cfg, batch, context, dtype_bytes)
    seconds = max(step["bytes"] / (bw_gbps * 1e9), step["flops"] / (peak_tflops * 1e12))
    return batch / seconds


def chart(peak_tflops: float, bw_gbps: float, points=None, title: str = "Roofline"):
    """A log-log plotly roofline; ``points`` is a DataFrame with columns label, intensity and
    optionally tflops (achieved; else the point sits on the roof) and group (legend/colour)."""
    import numpy as np
    import plotly.graph_objects as go

    ridge = ridge_point(peak_tflops, bw_gbps)
    xs = np.union1d(np.logspace(-1, np.log10(max(ridge * 30, 1e4)), 200), [ridge])
    fig = go.Figure()
    # The ridge is labelled by the roof's own text at its corner, in data units. Not
    # add_vline(annotation_text=...): an annotation's x on a log axis is read as log10(x), so plotly
    # would put the label at 10^ridge and stretch the axis out to it.
    fig.add_trace(go.Scatter(x=xs, y=[attainable_tflops(x, peak_tflops, bw_gbps) for x in xs],
                             mode="lines+text", text=[f"ridge {ridge:.0f} FLOP/B" if x == ridge else "" for x in xs],
                             textposition="top center", name="roof", line=dict(color="black")))
    fig.add_vline(x=ridge, line_dash="dot", line_color="grey")  # a shape: data units on a log axis
    if points is not None and len(points):
        df = points.copy()
        if "tflops" not in df:
            df["tflops"] = [attainable_tflops(i, peak_tflops, bw_gbps) for i in df["intensity"]]
        groups = df["group"].unique() if "group" in df else [None]
        for g in groups:
            sub = df if g is None else df[df["group"] == g]
            fig.add_trace(go.Scatter(x=sub["intensity"], y=sub["tflops"], mode="markers+text",
                                     text=sub["label"], textposition="top center", name=g or "points",
                                     marker=dict(size=9)))
    fig.update_xaxes(type="log", title="arithmetic intensity (FLOP / byte)")
    fig.update_yaxes(type="log", title="TFLOP/s")
    fig.update_layout(title=title, height=480)
    return fig
