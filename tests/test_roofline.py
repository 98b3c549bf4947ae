"""The roofline model: KV-cache bytes, decode intensity, the roof itself and its chart."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

from labutils import configs, roofline

GIB = 2**30


def _kv_tensor_bytes(cfg, seq, batch, dtype, device):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = torch.empty((cfg["num_hidden_layers"], 2, batch, cfg["num_key_value_heads"], seq, hd),
                     dtype=dtype, device=device)
    return kv.numel() * kv.element_size()


@pytest.mark.parametrize("name,seq,batch", [("SmolLM2-135M", 37, 3), ("Qwen2.5-0.5B", 64, 2)])
def test_kv_cache_bytes_equal_allocated_tensor(name, seq, batch):
    cfg = configs.arch(name)
    real = _kv_tensor_bytes(cfg, seq, batch, torch.bfloat16, "cpu")  # actually allocated (small)
    assert roofline.kv_cache_bytes(cfg, seq, batch=batch, dtype_bytes=2) == real, \
        f"{name}: {roofline.kv_cache_bytes(cfg, seq, batch=batch)} vs allocated {real}"
    real32 = _kv_tensor_bytes(cfg, seq, batch, torch.float32, "cpu")
    assert roofline.kv_cache_bytes(cfg, seq, batch=batch, dtype_bytes=4) == real32
    assert roofline.kv_bytes_per_token(cfg) * seq * batch == real


@pytest.mark.parametrize("name", ["Qwen2.5-7B", "Llama-3-8B", "Mistral-7B", "Llama-2-70B"])
def test_kv_cache_bytes_large_configs_on_meta(name):
    cfg = configs.arch(name)
    expected = _kv_tensor_bytes(cfg, 8192, 4, torch.bfloat16, "meta")  # shape only, nothing allocated
    got = roofline.kv_cache_bytes(cfg, 8192, batch=4)
    assert got == expected, f"{name}: {got / GIB:.3f} GiB vs tensor {expected / GIB:.3f} GiB"


def test_llama2_7b_kv_cache_is_2_gib():
    got = roofline.kv_cache_bytes(configs.arch("Llama-2-7B"), 4096, batch=1, dtype_bytes=2)
    assert got == 2 * 32 * 32 * 128 * 2 * 4096 == 2 * GIB, f"Llama-2-7B fp16 at 4096 tokens: {got / GIB} GiB"
    # GQA shrinks it: Llama-2-70B has 8 KV heads and 80 layers -> 80*8 / (32*32) of that per token
    got70 = roofline.kv_cache_bytes(configs.arch("Llama-2-70B"), 4096)
    assert got70 == 2 * GIB * 80 * 8 // (32 * 32), f"Llama-2-70B: {got70 / GIB} GiB"


def _matmul_weight_count(name):
    """Weights (and biases) of every nn.Linear, counted once, in the transformers model on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = configs.arch(name)
    fields.pop("hub_id"), fields.pop("architectures")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name", ["SmolLM2-135M", "Qwen2.5-7B", "Llama-3-8B"])
def test_linear_params_and_decode_flops(name):
    cfg = configs.arch(name)
    n = _matmul_weight_count(name)
    assert roofline.linear_params(cfg) == n, f"{name}: linear_params {roofline.linear_params(cfg):,} vs {n:,}"
    step = roofline.decode_step(cfg, batch=1, context=0, dtype_bytes=2)
    assert step["flops"] == 2 * n and step["bytes"] == 2 * n, step


@pytest.mark.parametrize("name", ["SmolLM2-135M", "Qwen2.5-7B", "Llama-3-8B", "Mistral-7B"])
def test_decode_intensity(name):
    cfg = configs.arch(name)
    i1 = roofline.decode_step(cfg, batch=1, dtype_bytes=2)["intensity"]
    assert 0.9 <= i1 <= 1.1, f"{name}: batch-1 decode intensity {i1:.3f} FLOP/B in bf16"
    for b in (2, 8, 64, 256):
        ib = roofline.decode_step(cfg, batch=b, context=0, dtype_bytes=2)["intensity"]
        assert ib / i1 == pytest.approx(b, rel=0.01), f"{name}: intensity at batch {b} is {ib / i1:.2f}x batch 1"
    # with a long context each sequence also reads its own KV cache: growth is sub-linear
    c1 = roofline.decode_step(cfg, batch=1, context=4096)["intensity"]
    c64 = roofline.decode_step(cfg, batch=64, context=4096)["intensity"]
    assert c64 / c1 < 64 * 0.95, f"{name}: {c1:.2f} -> {c64:.2f} FLOP/B grows ~linearly despite the KV reads"
    # the extra bytes at context c are exactly the batch's KV cache
    for b in (1, 8):
        extra = (roofline.decode_step(cfg, batch=b, context=4096)["bytes"]
                 - roofline.decode_step(cfg, batch=b, context=0)["bytes"])
        assert extra == roofline.kv_cache_bytes(cfg, 4096, batch=b), f"{name}: KV bytes read {extra}"
    # int8 weights and cache: half the bytes, twice the intensity
    i1_8 = roofline.decode_step(cfg, batch=1, dtype_bytes=1)["intensity"]
    assert i1_8 == pytest.approx(2 * i1)


def test_prefill_is_compute_bound_territory():
    cfg = configs.arch("Llama-3-8B")
    p = roofline.prefill(cfg, 2048)
    d = roofline.decode_step(cfg)
    assert p["intensity"] > 500 * d["intensity"], f"prefill {p['intensity']:.0f} vs decode {d['intensity']:.2f}"
    assert p["flops"] > 2048 * d["flops"], "prefill must add the attention FLOPs on top of 2*N per token"


def test_ridge_and_attainable():
    assert roofline.ridge_point(100.0, 1000.0) == pytest.approx(100.0)  # 100 TFLOP/s over 1 TB/s
    assert roofline.ridge_point(989.0, 3350.0) == pytest.approx(989e12 / 3350e9)
    assert roofline.attainable_tflops(1.0, 100.0, 1000.0) == pytest.approx(1.0)  # 1 TB/s * 1 FLOP/B
    assert roofline.attainable_tflops(50.0, 100.0, 1000.0) == pytest.approx(50.0)
    assert roofline.attainable_tflops(100.0, 100.0, 1000.0) == pytest.approx(100.0)
    assert roofline.attainable_tflops(1e4, 100.0, 1000.0) == pytest.approx(100.0)  # the flat roof
    ridge = roofline.ridge_point(989.0, 3350.0)
    assert roofline.attainable_tflops(ridge, 989.0, 3350.0) == pytest.approx(989.0)


@pytest.mark.parametrize("name", ["SmolLM2-135M", "Qwen2.5-7B"])
def test_decode_tok_s_bound_batch1(name):
    cfg = configs.arch(name)
    bw = 3350.0
    weight_bytes = 2 * _matmul_weight_count(name)
    got = roofline.decode_tok_s_bound(cfg, 989.0, bw, batch=1, dtype_bytes=2)
    assert got == pytest.approx(bw * 1e9 / weight_bytes, rel=1e-9), \
        f"{name}: bound {got:.1f} tok/s vs bandwidth / weight bytes {bw * 1e9 / weight_bytes:.1f}"
    # compute-bound at a huge batch: tokens/s = peak / flops-per-token
    big = roofline.decode_tok_s_bound(cfg, 989.0, bw, batch=100_000)
    assert big == pytest.approx(989e12 / (2 * _matmul_weight_count(name)), rel=1e-3)


def test_chart():
    import plotly.graph_objects as go

    pts = pd.DataFrame({"label": ["decode b=1", "decode b=64", "prefill"],
                        "intensity": [1.0, 64.0, 2000.0], "group": ["decode", "decode", "prefill"]})
    fig = roofline.chart(989.0, 3350.0, pts, title="H100")
    assert isinstance(fig, go.Figure)
    roof = [t for t in fig.data if t.name == "roof"]
    assert len(roof) == 1, [t.name for t in fig.data]
    xs, ys = list(roof[0].x), list(roof[0].y)
    for x, y in zip(xs, ys):
        assert y == pytest.approx(min(989.0, 3350.0 * x / 1e3)), f"roof at {x}: {y}"
    assert max(ys) == pytest.approx(989.0) and min(xs) < 1.0 < roofline.ridge_point(989.0, 3350.0) < max(xs)
    by_name = {t.name: t for t in fig.data if t.name != "roof"}
    assert set(by_name) == {"decode", "prefill"}, set(by_name)
    assert list(by_name["decode"].text) == ["decode b=1", "decode b=64"]
    # no tflops column: the points sit on the roof
    assert list(by_name["decode"].y) == pytest.approx([3.35, 3.35 * 64])
    assert list(by_name["prefill"].y) == pytest.approx([989.0])
    assert fig.layout.title.text == "H100"
    # achieved numbers are plotted as given; no points -> only the roof
    fig2 = roofline.chart(100.0, 1000.0, pd.DataFrame({"label": ["k"], "intensity": [10.0], "tflops": [2.5]}))
    assert [list(t.y) for t in fig2.data if t.name != "roof"] == [[2.5]]
    assert [t.name for t in roofline.chart(100.0, 1000.0).data] == ["roof"]


def test_ceilings_read_notebook_00_of_this_device_else_measure(tmp_path, monkeypatch):
    from labutils import hardware, runtime
    from labutils.results import save_results

    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path))
    measured = hardware.ceilings()  # no results yet: measured (small sizes on a CPU)
    assert measured["source"] == "measured now" and measured["copy_gbps"] > 0 and measured["matmul_bf16_tflops"] > 0
    save_results("00_roofline", {"copy_gbps": 1234.5, "matmul_bf16_tflops": 67.8})
    read = hardware.ceilings()
    assert (read["copy_gbps"], read["matmul_bf16_tflops"]) == (1234.5, 67.8)
    assert read["source"].startswith("notebook 00")
    rec = (tmp_path / "00_roofline.json").read_text().replace(runtime.device_name(), "another GPU")
    (tmp_path / "00_roofline.json").write_text(rec)  # another device's numbers are not used
    assert hardware.ceilings()["source"] == "measured now"


def _log_axis_positions_are_sane(fig):
    """Every shape and annotation placed in data coordinates on a log x axis lies within the x range
    of the figure's data (shapes take data units there; annotations take log10 units, so an
    annotation at x=250 means 1e250)."""
    import numpy as np

    xs = np.concatenate([np.asarray(t.x, dtype=float) for t in fig.data if t.x is not None])
    lo, hi = xs.min(), xs.max()
    assert fig.layout.xaxis.type == "log"
    for s in fig.layout.shapes:
        if (s.xref or "x") == "x":
            for x in (s.x0, s.x1):
                assert lo <= float(x) <= hi, f"shape at x={x}, outside the data's {lo:g}..{hi:g}"
    for a in fig.layout.annotations:
        if (a.xref or "x") == "x":
            assert lo <= 10 ** float(a.x) <= hi, f"annotation at x={a.x} (log10 units: {10 ** float(a.x):g})"
    if fig.layout.xaxis.range is not None:
        assert lo / 10 <= 10 ** fig.layout.xaxis.range[1] <= hi * 10, fig.layout.xaxis.range


@pytest.mark.parametrize("peak, bw", [(989.0, 3350.0), (989.0, 4800.0), (65.0, 320.0), (0.5, 20.0)])
def test_chart_ridge_marks_sit_at_the_ridge_on_log_axes(peak, bw):
    pts = pd.DataFrame({"label": ["a", "b"], "intensity": [1.0, 3000.0], "group": ["g", "g"]})
    fig = roofline.chart(peak, bw, pts)
    _log_axis_positions_are_sane(fig)
    ridge = roofline.ridge_point(peak, bw)
    assert [float(s.x0) for s in fig.layout.shapes] == pytest.approx([ridge])
    roof = next(t for t in fig.data if t.name == "roof")
    labelled = [(x, s) for x, s in zip(roof.x, roof.text) if s]
    assert len(labelled) == 1 and labelled[0][0] == pytest.approx(ridge) and "ridge" in labelled[0][1], labelled


def test_sanity_check_catches_a_vline_annotation_on_a_log_axis():
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0.1, 1e4], y=[1, 2]))
    fig.update_xaxes(type="log")
    fig.add_vline(x=250, annotation_text="ridge")  # the annotation's x is 250, read as 1e250
    with pytest.raises(AssertionError, match="annotation at x=250"):
        _log_axis_positions_are_sane(fig)
