"""figures.show: one output with the plotly JSON and a small static PNG drawn by matplotlib."""
from __future__ import annotations

import base64
import io
import sys

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import pytest
from PIL import Image

from labutils import figures
from labutils.figures import PLOTLY_MIME, figure_bundle

MAX_PNG_BYTES = 60_000


def _png(bundle) -> tuple[Image.Image, int]:
    raw = base64.b64decode(bundle["image/png"])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw)).convert("RGB"), len(raw)


def _has_colour(img: Image.Image, hex_colour: str, tol: int = 24, min_pixels: int = 50) -> bool:
    """Whether the image holds at least min_pixels pixels close to hex_colour (a drawn trace)."""
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    close = np.abs(np.asarray(img, dtype=int) - target).max(axis=-1) <= tol
    return int(close.sum()) >= min_pixels


def _check_bundle(fig, title: str | None, size: tuple[int, int]):
    bundle = figure_bundle(fig)
    assert set(bundle) == {PLOTLY_MIME, "image/png", "text/plain"}
    assert bundle[PLOTLY_MIME]["data"] and "layout" in bundle[PLOTLY_MIME]
    assert bundle["text/plain"] == (f"<Figure: {title}>" if title else "<Figure>")
    img, nbytes = _png(bundle)
    assert img.size == size, img.size
    assert nbytes < MAX_PNG_BYTES, f"PNG of {nbytes:,} bytes"
    return img


def test_scatter_log_axes_and_vline():
    b = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=b, y=150.0 * b, mode="lines+markers", name="measured",
                             error_y={"type": "data", "array": 10.0 * b}))
    fig.add_trace(go.Scatter(x=b, y=np.minimum(180.0 * b, 9000), mode="lines", name="roofline", line_dash="dash"))
    fig.update_xaxes(type="log", title="batch size")
    fig.update_yaxes(type="log", title="tokens/s")
    fig.add_vline(x=64, line_dash="dot", annotation_text="ridge")
    fig.update_layout(title="Decode <b>throughput</b> vs batch", height=420)
    img = _check_bundle(fig, "Decode throughput vs batch", (720, 420))
    assert _has_colour(img, "#636efa") and _has_colour(img, "#EF553B"), "a trace was not drawn"


def test_horizontal_bar_with_text_and_category_order():
    df = pd.DataFrame({"method": ["HF generate", "lab eager", "lab compile"], "tok/s": [41.5, 60.2, 179.1]})
    fig = px.bar(df, x="tok/s", y="method", orientation="h", text_auto=".0f", title="Batch-1 decode")
    fig.add_vline(x=213, line_dash="dash", annotation_text="roofline")
    fig.update_layout(height=380, yaxis={"categoryorder": "total ascending"})
    img = _check_bundle(fig, "Batch-1 decode", (720, 380))
    assert _has_colour(img, "#636efa", min_pixels=2000), "the bars were not drawn"


def test_px_line_with_colour_groups_and_facets():
    df = pd.DataFrame({"N": [512, 1024, 2048] * 4, "TFLOP/s": np.arange(12.0) + 1,
                       "kernel": (["triton"] * 3 + ["cudnn"] * 3) * 2, "head_dim": [64] * 6 + [128] * 6})
    line = px.line(df[df.head_dim == 64], x="N", y="TFLOP/s", color="kernel", markers=True, log_x=True)
    img = _check_bundle(line, None, (720, 405))
    assert _has_colour(img, "#636efa") and _has_colour(img, "#EF553B")
    facets = px.line(df, x="N", y="TFLOP/s", color="kernel", facet_col="head_dim", log_x=True, title="fwd")
    _check_bundle(facets, "fwd", (720, 405))


def test_grouped_bars_heatmap_and_subplots_render():
    df = pd.DataFrame({"fmt": ["bf16", "int8"] * 2, "layer": ["qkv", "qkv", "down", "down"], "us": [10, 6.5, 30, 20]})
    _check_bundle(px.bar(df, x="fmt", y="us", color="layer", barmode="group", text_auto=".1f"), None, (720, 405))
    _check_bundle(go.Figure(go.Heatmap(z=np.arange(12.0).reshape(3, 4))), None, (720, 405))
    _check_bundle(px.scatter(df, x="fmt", y="us", color="layer", facet_row="layer"), None, (720, 405))


@pytest.mark.parametrize("trace", [go.Pie(values=[1, 2, 3]), go.Box(y=[1, 2, 3, 9]), go.Scatter3d(x=[1], y=[2], z=[3])],
                         ids=["pie", "box", "scatter3d"])
def test_unknown_trace_type_does_not_raise(trace):
    fig = go.Figure([trace, go.Scatter(x=[1, 2, 3], y=[3, 1, 2], name="drawn")])
    bundle = figure_bundle(fig)
    assert "no static image" not in bundle["text/plain"]
    _png(bundle)


def test_without_matplotlib_the_bundle_has_plotly_json_and_a_note(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    bundle = figure_bundle(go.Figure(go.Scatter(y=[1, 2]), layout={"title": "t"}))
    assert set(bundle) == {PLOTLY_MIME, "text/plain"}
    assert bundle["text/plain"] == "<Figure: t> (no static image: matplotlib is not installed)"


def test_show_displays_one_raw_bundle(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append((obj, raw)))
    figures.show(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])))
    assert len(shown) == 1 and shown[0][1] is True and "image/png" in shown[0][0]


def test_diagram_with_hidden_axes_has_no_ticks_or_grid():
    """A diagram (shapes and text, axes hidden in plotly) is drawn without axes in the PNG too."""
    def diagram(visible):
        fig = go.Figure()
        fig.add_shape(type="rect", x0=0, x1=1, y0=0, y1=1, fillcolor="#8fd19e", line_color="#555")
        fig.add_annotation(x=0.5, y=0.5, text="tile", showarrow=False)
        fig.update_xaxes(visible=visible, range=[-0.5, 4])
        fig.update_yaxes(visible=visible, range=[-0.5, 1.5])
        fig.update_layout(title="A diagram", height=300, width=600, plot_bgcolor="white")
        img, _ = _png(figure_bundle(fig))  # no traces: shapes and text only
        assert img.size == (600, 300)
        return img

    hidden, shown = diagram(False), diagram(True)
    assert _has_colour(hidden, "#8fd19e"), "the shape was not drawn"
    dark = lambda img: int((np.asarray(img, dtype=int).max(axis=-1) < 90).sum())  # noqa: E731
    assert dark(hidden) < dark(shown), "hidden axes still drew ticks, labels or spines"


def test_annotation_on_a_log_axis_is_placed_at_ten_to_its_x():
    """plotly reads an annotation's x on a log axis as log10 of the value (shapes use the value):
    the PNG puts the text where plotly does."""
    import matplotlib

    matplotlib.use("Agg")
    fig = go.Figure(go.Scatter(x=[1, 1000], y=[1, 2], mode="lines"))
    fig.update_xaxes(type="log")
    fig.add_annotation(x=2, y=1.5, text="at 100", showarrow=False)  # log10(100)
    captured = {}
    real_draw = figures._draw

    def spy(fig_, mfig, notes):
        real_draw(fig_, mfig, notes)
        captured["texts"] = [(t.get_text(), t.get_position()) for ax in mfig.axes for t in ax.texts]

    figures._draw = spy
    try:
        figure_bundle(fig)
    finally:
        figures._draw = real_draw
    (text, (x, _)), = [t for t in captured["texts"] if t[0] == "at 100"]
    assert x == pytest.approx(100), x


def test_saved_figure_json_is_compact_but_keeps_its_look():
    """A notebook saves each figure's JSON indented, once per chart: plotly's whole default template
    (~11 KB) is cut to the keys that set the look, and list floats to 6 significant digits."""
    import json

    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[0.123456789123, 1 / 3, 2.0], mode="lines"))
    full = fig.to_plotly_json()["layout"]["template"]
    saved = figure_bundle(fig)[PLOTLY_MIME]
    assert saved["data"][0]["y"] == [0.123457, 0.333333, 2.0]
    look = saved["layout"]["template"]["layout"]
    assert look["colorway"] == list(full["layout"]["colorway"]) and "plot_bgcolor" in look
    assert "data" not in saved["layout"]["template"]
    assert len(json.dumps(saved, indent=1)) < 2500, len(json.dumps(saved, indent=1))
    assert len(json.dumps(full, indent=1)) > 8000  # what it would have cost
