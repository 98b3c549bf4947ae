"""Charts that render without a kernel: ``show(fig)`` instead of ``fig.show()``.

GitHub and nbviewer run no JavaScript, so a plotly figure saved in a notebook is blank there.
``show`` displays one output whose MIME bundle holds

- ``application/vnd.plotly.v1+json``: the plotly figure, interactive in JupyterLab;
- ``image/png``: the same chart drawn by matplotlib from the figure object (no kaleido, no browser),
  which GitHub and nbviewer show;
- ``text/plain``: ``<Figure: title>``.

The PNG covers what the book draws: Scatter (lines, markers, dashes, error bars, fills), Bar
(vertical, horizontal, grouped / stacked, text labels), Histogram, Heatmap, plotly express output
with facets (one panel per subplot, facet labels as panel titles), log and categorical axes, axis
and figure titles, legend, hline / vline / rect shapes and annotations. Anything else is left out
with a short grey note in the image, never an exception; without matplotlib the bundle carries the
plotly JSON alone and says so in its text.
"""
from __future__ import annotations

import base64
import html
import io
import re

import numpy as np

PLOTLY_MIME = "application/vnd.plotly.v1+json"
DPI = 90                      # plotly's pixel sizes become the PNG's pixel sizes at this dpi
DEFAULT_SIZE = (8.0, 4.5)     # inches, when the layout gives no width / height
MAX_SIZE = (12.0, 8.0)
PLOTLY_COLORS = ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A",
                 "#19d3f3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52")
_DASH = {"solid": "-", "dot": ":", "dash": "--", "longdash": (0, (8, 3)), "dashdot": "-.",
         "longdashdot": (0, (8, 3, 2, 3))}
_VA = {"top": "top", "middle": "center", "bottom": "bottom"}


def show(fig) -> None:
    """Display ``fig`` as one output: interactive plotly JSON plus a static PNG (see module doc)."""
    from IPython.display import display

    display(figure_bundle(fig), raw=True)


def figure_bundle(fig) -> dict:
    """The MIME bundle ``show`` displays: {plotly JSON, image/png (base64), text/plain}."""
    import plotly.graph_objects as go
    import plotly.io as pio

    if not isinstance(fig, go.Figure):
        fig = go.Figure(fig)
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    _compact(bundle[PLOTLY_MIME])
    title = _text(fig.layout.title.text or "")
    text = f"<Figure: {title}>" if title else "<Figure>"
    try:
        bundle["image/png"] = base64.b64encode(render_png(fig)).decode("ascii")
    except ImportError:
        text += " (no static image: matplotlib is not installed)"
    except Exception as e:  # a chart the converter cannot draw must not stop the notebook
        text += f" (no static image: {type(e).__name__}: {e})"
    bundle["text/plain"] = text
    return bundle


# The template keys a saved figure keeps: its look (colours, background, grid, font). The rest of
# plotly's default template (per-trace-type defaults, ~11 KB per figure as a notebook writes JSON)
# made most of a chapter's size.
TEMPLATE_KEEP = ("colorway", "plot_bgcolor", "paper_bgcolor", "font", "xaxis", "yaxis", "title", "hovermode")
FLOAT_DIGITS = 6  # significant digits kept in a saved figure's numbers (far below what a chart resolves)


def _compact(fig_json: dict) -> dict:
    """Shrink a figure's JSON in place for saving in a notebook: the template cut to its look
    (``TEMPLATE_KEEP``), floats rounded to ``FLOAT_DIGITS`` significant digits."""
    layout = fig_json.get("layout", {})
    template = layout.get("template")
    if isinstance(template, dict):
        look = template.get("layout", {})
        layout["template"] = {"layout": {k: look[k] for k in TEMPLATE_KEEP if k in look}}

    def rounded(x):
        if isinstance(x, float):
            return float(f"{x:.{FLOAT_DIGITS}g}") if np.isfinite(x) else x
        if isinstance(x, list):
            return [rounded(v) for v in x]
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        return x

    fig_json["data"] = rounded(fig_json.get("data", []))
    return fig_json


# ---- plotly -> matplotlib ---------------------------------------------------------------------------------------
def _text(s) -> str:
    """Plotly's HTML-ish label as plain text for matplotlib (no <br>, tags or mathtext)."""
    s = re.sub(r"<br\s*/?>", "\n", str(s), flags=re.I)
    s = html.unescape(re.sub(r"<[^>]+>", "", s))
    return s.replace("$", r"\$")


def _color(c):
    """A plotly colour as matplotlib takes it, or None (unset, or an array for a colour scale)."""
    from matplotlib.colors import is_color_like

    if not isinstance(c, str):
        return None
    m = re.fullmatch(r"\s*rgba?\(([^)]*)\)\s*", c)
    if m:
        parts = [float(v) for v in m.group(1).split(",")]
        return tuple(v / 255 for v in parts[:3]) + (tuple(parts[3:4]) or (1.0,))
    return c if is_color_like(c) else None


def _axis_names(trace) -> tuple[str, str]:
    return getattr(trace, "xaxis", None) or "x", getattr(trace, "yaxis", None) or "y"


def _layout_axis(layout, ref: str):
    """layout.xaxis for 'x', layout.yaxis3 for 'y3' (None if absent)."""
    if ref[:1] not in ("x", "y") or not (ref[1:] == "" or ref[1:].isdigit()):
        return None
    try:
        return layout[ref[0] + "axis" + ref[1:]]
    except (KeyError, ValueError):
        return None


def _is_categorical(values) -> bool:
    return values is not None and any(isinstance(v, str) for v in np.asarray(values, dtype=object).ravel()[:1000])


def _numbers(values):
    """Values as a float array where possible (None -> nan), else as they are (dates)."""
    if values is None:
        return None
    try:
        return np.asarray([np.nan if v is None else v for v in np.asarray(values, dtype=object).ravel()], dtype=float)
    except (TypeError, ValueError):
        return np.asarray(values, dtype=object)


def _value_axes(trace) -> tuple[str, str]:
    """(value attribute, category attribute) of a bar-like trace: ('x', 'y') if horizontal."""
    return ("x", "y") if getattr(trace, "orientation", None) == "h" else ("y", "x")


class _Categories:
    """Category positions per plotly axis (shared by its facets): order of appearance, or the
    axis' categoryorder."""

    def __init__(self, fig):
        self.order: dict[str, list] = {}
        totals: dict[str, dict] = {}
        for trace in fig.data:
            refs = dict(zip("xy", _axis_names(trace)))
            for letter in "xy":
                vals = getattr(trace, letter, None)
                if vals is None or not _is_categorical(vals):
                    continue
                seen = self.order.setdefault(refs[letter], [])
                other = getattr(trace, "y" if letter == "x" else "x", None)
                other = _numbers(other) if other is not None and not _is_categorical(other) else None
                for j, v in enumerate(np.asarray(vals, dtype=object).ravel()):
                    v = str(v)
                    if v not in seen:
                        seen.append(v)
                    if other is not None and j < len(other) and other.dtype == float and np.isfinite(other[j]):
                        t = totals.setdefault(refs[letter], {})
                        t[v] = t.get(v, 0.0) + other[j]
        for ref, cats in self.order.items():
            ax = _layout_axis(fig.layout, ref)
            how = (ax.categoryorder if ax is not None else None) or "trace"
            if how == "array" and ax.categoryarray is not None:
                first = [str(c) for c in ax.categoryarray]
                cats[:] = first + [c for c in cats if c not in first]
            elif how.startswith("category"):
                cats.sort(reverse=how.endswith("descending"))
            elif how.startswith("total"):
                t = totals.get(ref, {})
                cats.sort(key=lambda c: t.get(c, 0.0), reverse=how.endswith("descending"))
        self.index = {ref: {c: i for i, c in enumerate(cats)} for ref, cats in self.order.items()}

    def positions(self, ref: str, values):
        if values is None:
            return None
        if ref in self.index and _is_categorical(values):
            return np.asarray([self.index[ref].get(str(v), np.nan) for v in np.asarray(values, dtype=object).ravel()])
        return _numbers(values)


def _errors(err, values):
    """An error_x / error_y spec as matplotlib's (2, N) [minus, plus] array, or None."""
    if err is None or err.visible is False or (err.array is None and err.value is None):
        return None
    n = len(values)
    typ = err.type or ("data" if err.array is not None else "percent")
    if typ == "data":
        plus = _numbers(err.array)
        minus = _numbers(err.arrayminus) if err.symmetric is False and err.arrayminus is not None else plus
    elif typ == "constant":
        plus = np.full(n, err.value or 0.0)
        minus = np.full(n, err.valueminus) if err.symmetric is False and err.valueminus is not None else plus
    elif typ == "percent":
        plus = np.abs(values) * (err.value or 0.0) / 100
        minus = np.abs(values) * err.valueminus / 100 if err.symmetric is False and err.valueminus is not None else plus
    else:  # sqrt
        plus = minus = np.sqrt(np.abs(values))
    return np.vstack([np.resize(minus, n), np.resize(plus, n)])


def _bar_labels(trace, values, cats) -> list[str] | None:
    """The text drawn on bars: ``text``, or ``texttemplate`` with %{x|y|value|label:fmt} filled in."""
    n = len(values)
    if trace.text is not None and not (isinstance(trace.text, str) and trace.text == ""):
        t = trace.text
        return [_text(t)] * n if isinstance(t, (str, int, float)) else [_text(v) for v in t][:n]
    tpl = trace.texttemplate
    if not isinstance(tpl, str) or not tpl:
        return None
    value_letter = _value_axes(trace)[0]

    def fill(j):
        def sub(m):
            key, fmt = m.group(1), m.group(2)
            v = values[j] if key in (value_letter, "value") else cats[j] if key in ("x", "y", "label") else m.group(0)
            try:
                return format(v, fmt[1:]) if fmt else str(v)
            except (ValueError, TypeError):
                return str(v)
        return _text(re.sub(r"%\{(\w+)(:[^}]*)?\}", sub, tpl))

    return [fill(j) for j in range(n)]


def render_png(fig) -> bytes:
    """The plotly figure drawn by matplotlib, as PNG bytes (ImportError without matplotlib)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = fig.layout
    width = min((layout.width or DEFAULT_SIZE[0] * DPI) / DPI, MAX_SIZE[0])
    height = min((layout.height or DEFAULT_SIZE[1] * DPI) / DPI, MAX_SIZE[1])
    mfig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(mfig)  # the non-interactive Agg canvas; pyplot (and its figure registry) is never touched
    notes: list[str] = []
    with matplotlib.rc_context({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8,
                                "axes.spines.top": False, "axes.spines.right": False}):
        _draw(fig, mfig, notes)
        if notes:
            mfig.text(0.005, 0.995, "not drawn: " + "; ".join(sorted(set(notes)))[:160],
                      fontsize=7, color="0.5", va="top", ha="left")
        buf = io.BytesIO()
        mfig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return _smaller_png(buf.getvalue())


def _smaller_png(png: bytes) -> bytes:
    """The same image with a palette of at most 32 colours when that is smaller: charts have few, and
    32 keep their lines and text clean at about a third less than 256 (a notebook must stay under
    300 KB with every chart stored twice, as plotly JSON and as this image)."""
    try:
        from PIL import Image
    except ImportError:
        return png
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(png) else png


def _draw(fig, mfig, notes: list[str]) -> None:
    from matplotlib import transforms
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    layout = fig.layout
    colorway = tuple(layout.template.layout.colorway or ()) if layout.template else ()
    colorway = tuple(layout.colorway or ()) or colorway or PLOTLY_COLORS
    cats = _Categories(fig)

    # one matplotlib panel per (xaxis, yaxis) pair, on a grid from the plotly domains
    traces = list(fig.data)
    drawable = [i for i, t in enumerate(traces) if hasattr(t, "xaxis") and t.visible not in (False, "legendonly")]
    notes += [f"{t.type} trace" for t in traces if not hasattr(t, "xaxis")]
    pairs = list(dict.fromkeys(_axis_names(traces[i]) for i in drawable)) or [("x", "y")]

    def domain(ref):
        ax = _layout_axis(layout, ref)
        d = ax.domain if ax is not None and ax.domain is not None else (0.0, 1.0)
        return tuple(round(float(v), 3) for v in d)

    cols = sorted({domain(x) for x, _ in pairs})
    rows = sorted({domain(y) for _, y in pairs}, reverse=True)
    grid = mfig.subplots(len(rows), len(cols), squeeze=False)
    axes = {p: grid[rows.index(domain(p[1]))][cols.index(domain(p[0]))] for p in pairs}
    for ax in grid.ravel():
        if ax not in axes.values():
            ax.set_axis_off()
    # facets that plotly 'matches' share limits
    for (xr, yr), ax in axes.items():
        for letter, ref in (("x", xr), ("y", yr)):
            lax = _layout_axis(layout, ref)
            other = lax.matches if lax is not None else None
            target = next((a for (ox, oy), a in axes.items() if (ox if letter == "x" else oy) == other), None)
            if target is not None and target is not ax:
                try:
                    (ax.sharex if letter == "x" else ax.sharey)(target)
                except ValueError:
                    pass

    # legend: plotly shows one when two or more traces have an entry, or when asked
    entries = [i for i in drawable if traces[i].showlegend is not False and traces[i].name]
    legend_on = layout.showlegend if layout.showlegend is not None else len(entries) >= 2

    barmode = layout.barmode or "group"
    bars_per_axes: dict = {}
    for i in drawable:
        if traces[i].type == "bar":
            bars_per_axes.setdefault(_axis_names(traces[i]), []).append(i)
    stacks: dict = {}
    last_y: dict = {}
    heat_axes: set = set()

    for i in drawable:
        t = traces[i]
        pair = _axis_names(t)
        ax = axes[pair]
        label = _text(t.name) if (legend_on and t.showlegend is not False and t.name) else None
        marker = getattr(t, "marker", None)
        color = (_color(getattr(getattr(t, "line", None), "color", None))
                 or _color(getattr(marker, "color", None)) or colorway[i % len(colorway)])
        try:
            if t.type in ("scatter", "scattergl"):
                _scatter(ax, t, pair, cats, color, label, last_y)
            elif t.type == "bar":
                group = bars_per_axes[pair]
                _bar(ax, t, pair, cats, color, label, barmode, group.index(i), len(group), stacks)
            elif t.type == "histogram":
                vals = t.x if t.x is not None else t.y
                ax.hist(_numbers(vals), bins=t.nbinsx or t.nbinsy or "auto", color=color, alpha=0.8, label=label,
                        orientation="vertical" if t.x is not None else "horizontal")
            elif t.type == "heatmap":
                _heatmap(mfig, ax, t, pair, cats)
                heat_axes.add(pair)
            else:
                notes.append(f"{t.type} trace")
        except Exception as e:  # draw what we can
            notes.append(f"{t.type} trace ({type(e).__name__})")

    # axes: scale, categories, titles, ranges
    for (xr, yr), ax in axes.items():
        for letter, ref in (("x", xr), ("y", yr)):
            lax = _layout_axis(layout, ref)
            if lax is None:
                continue
            if lax.type == "log":
                (ax.set_xscale if letter == "x" else ax.set_yscale)("log")
            if ref in cats.order:
                names = [_text(c) for c in cats.order[ref]]
                (ax.set_xticks if letter == "x" else ax.set_yticks)(range(len(names)), names)
                if letter == "x" and sum(map(len, names)) > 60:
                    ax.tick_params(axis="x", labelrotation=30)
            if lax.title and lax.title.text:
                (ax.set_xlabel if letter == "x" else ax.set_ylabel)(_text(lax.title.text))
            if lax.range is not None and None not in lax.range:
                lo, hi = (10 ** float(v) for v in lax.range) if lax.type == "log" else lax.range
                (ax.set_xlim if letter == "x" else ax.set_ylim)(lo, hi)
            if lax.autorange == "reversed":
                (ax.invert_xaxis if letter == "x" else ax.invert_yaxis)()
            if lax.visible is False:  # a diagram: no ticks, labels or spine on this axis
                (ax.xaxis if letter == "x" else ax.yaxis).set_visible(False)
                for side in (("bottom", "top") if letter == "x" else ("left", "right")):
                    ax.spines[side].set_visible(False)
        hidden = [(_layout_axis(layout, r) or {}) for r in (xr, yr)]
        if any(getattr(a, "visible", None) is False for a in hidden):
            continue  # no grid behind a diagram
        if (xr, yr) not in heat_axes:
            ax.grid(True, alpha=0.3, linewidth=0.6)
            ax.set_axisbelow(True)

    first_ax = axes[pairs[0]]

    def place(xref, yref):
        """(axes, transform) for a shape or annotation's coordinate references."""
        xr, yr = (xref or "x").replace(" domain", ""), (yref or "y").replace(" domain", "")
        ax = next((a for (px_, py_), a in axes.items() if (xr == "paper" or px_ == xr) and (yr == "paper" or py_ == yr)),
                  first_ax)
        xt = ax.transAxes if (xref or "x") == "paper" or " domain" in (xref or "") else ax.transData
        yt = ax.transAxes if (yref or "y") == "paper" or " domain" in (yref or "") else ax.transData
        return ax, transforms.blended_transform_factory(xt, yt), xr, yr

    def coord(v, ref):
        return cats.index[ref].get(str(v), v) if isinstance(v, str) and ref in cats.index else v

    for s in layout.shapes or ():
        try:
            ax, tr, xr, yr = place(s.xref, s.yref)
            x0, x1 = coord(s.x0, xr), coord(s.x1, xr)
            y0, y1 = coord(s.y0, yr), coord(s.y1, yr)
            lc = _color(s.line.color) if s.line else None
            ls = _DASH.get(s.line.dash, "-") if s.line and s.line.dash else "-"
            lw = 0.75 * (s.line.width if s.line and s.line.width is not None else 2)
            if (s.type or "rect") == "line":
                ax.add_line(Line2D([x0, x1], [y0, y1], transform=tr, color=lc or "0.25", linestyle=ls, linewidth=lw))
            elif (s.type or "rect") == "rect":
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, transform=tr, facecolor=_color(s.fillcolor) or "0.5",
                                       alpha=s.opacity if s.opacity is not None else 1.0,  # plotly's default
                                       edgecolor=lc or "none", linewidth=lw if lc else 0))
            else:
                notes.append(f"{s.type} shape")
        except Exception as e:
            notes.append(f"shape ({type(e).__name__})")
    for ax in axes.values():
        ax.autoscale_view()  # plotly's autorange takes in the shapes (limits set from the layout stay)

    for a in layout.annotations or ():
        if not a.text:
            continue
        try:
            if a.xref == "paper" and a.yref == "paper":  # a facet's label sits just above its panel
                panel = next((ax for (xr, yr), ax in axes.items()
                              if domain(xr)[0] - 0.01 <= (a.x or 0) <= domain(xr)[1] + 0.01
                              and abs((a.y if a.y is not None else 0) - domain(yr)[1]) < 0.05), None)
                if panel is not None:
                    panel.set_title(_text(a.text))
                    continue
            ax, tr, xr, yr = place(a.xref, a.yref)
            ha = a.xanchor if a.xanchor in ("left", "right") else "center"
            va = _VA.get(a.yanchor, "center" if a.showarrow is False else "bottom")
            xy = [coord(a.x, xr), coord(a.y, yr)]
            for i, (ref, r) in enumerate(((a.xref, xr), (a.yref, yr))):  # plotly: an annotation's x on a
                lax = _layout_axis(layout, r)                            # log axis is log10 of the value
                if (ref or "").endswith(("paper", "domain")) is False and lax is not None and lax.type == "log" \
                        and isinstance(xy[i], (int, float)):
                    xy[i] = 10 ** xy[i]
            if a.showarrow is False:
                ax.text(*xy, _text(a.text), transform=tr, ha=ha, va=va, fontsize=8, clip_on=False)
            else:
                ax.annotate(_text(a.text), xy=xy, xycoords=tr, ha=ha, va=va, fontsize=8,
                            xytext=(0.75 * (a.ax if a.ax is not None else -10), -0.75 * (a.ay if a.ay is not None else -30)),
                            textcoords="offset points", arrowprops={"arrowstyle": "->", "lw": 0.8})
        except Exception as e:
            notes.append(f"annotation ({type(e).__name__})")

    if layout.title and layout.title.text:
        mfig.suptitle(_text(layout.title.text), fontsize=11)
    if legend_on:
        handles, labels = {}, []
        for ax in axes.values():
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        if handles:
            title = layout.legend.title.text if layout.legend and layout.legend.title else None
            mfig.legend([handles[lab] for lab in labels], labels, loc="outside right upper", frameon=False,
                        title=_text(title) if title else None)


def _scatter(ax, t, pair, cats, color, label, last_y):
    x = cats.positions(pair[0], t.x)
    y = cats.positions(pair[1], t.y)
    if y is None and x is None:
        return
    if x is None:
        x = np.arange(len(y))
    if y is None:
        y = np.arange(len(x))
    mode = t.mode or ("lines+markers" if len(x) < 20 else "lines")
    line, marker = t.line, t.marker
    ls = _DASH.get(line.dash, "-") if line is not None and line.dash else "-"
    lw = 0.75 * (line.width if line is not None and line.width is not None else 2)
    drew_label = False
    if "lines" in mode:
        ax.plot(x, y, linestyle=ls, linewidth=lw, color=color, label=label,
                marker="o" if "markers" in mode else None, markersize=4)
        drew_label = True
    if "markers" in mode and "lines" not in mode:
        mc = marker.color if marker is not None else None
        size = marker.size if marker is not None else None
        s = None
        if size is not None and not np.isscalar(size):
            sz = _numbers(size)
            s = 10 + 150 * sz / np.nanmax(sz) if np.nanmax(sz) > 0 else None
        elif size is not None:
            s = (0.75 * size) ** 2
        if mc is not None and not isinstance(mc, str) and not np.isscalar(mc) and not _is_categorical(mc):
            ax.scatter(x, y, c=_numbers(mc), cmap="viridis", s=s if s is not None else 20, label=label)
        else:
            ax.scatter(x, y, color=color, s=s if s is not None else 20, label=label)
        drew_label = True
    if "text" in mode and t.text is not None:
        texts = [t.text] * len(x) if isinstance(t.text, str) else list(t.text)
        for xi, yi, s_ in zip(x, y, texts):
            ax.annotate(_text(s_), (xi, yi), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    if not drew_label and label:
        ax.plot([], [], color=color, label=label)
    yerr = _errors(t.error_y, _numbers(y))
    xerr = _errors(t.error_x, _numbers(x))
    if yerr is not None or xerr is not None:
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt="none", ecolor=color, elinewidth=0.8, capsize=2)
    if t.fill in ("tozeroy", "tonexty"):
        base = last_y.get(pair) if t.fill == "tonexty" and last_y.get(pair) is not None else 0
        if np.ndim(base) == 0 or len(base) == len(y):
            ax.fill_between(x, base, y, color=_color(t.fillcolor) or color, alpha=0.25, linewidth=0)
    last_y[pair] = y


def _bar(ax, t, pair, cats, color, label, barmode, j, n, stacks):
    value_letter, cat_letter = _value_axes(t)
    refs = dict(zip("xy", pair))
    values = _numbers(getattr(t, value_letter))
    raw_cats = getattr(t, cat_letter)
    if values is None:
        return
    pos = cats.positions(refs[cat_letter], raw_cats) if raw_cats is not None else np.arange(len(values), dtype=float)
    pos = np.asarray(pos, dtype=float)
    gaps = np.diff(np.unique(pos[np.isfinite(pos)]))
    slot = 0.8 * (gaps.min() if len(gaps) else 1.0)
    width, offset, base = slot, np.zeros(len(pos)), None
    if barmode == "group" and n > 1:
        width = slot / n
        offset = np.full(len(pos), (j - (n - 1) / 2) * width)
    elif barmode in ("stack", "relative"):
        key = (pair, cat_letter)
        acc = stacks.setdefault(key, {})
        base = np.array([acc.get(p, 0.0) for p in pos])
        for p, v in zip(pos, values):
            acc[p] = acc.get(p, 0.0) + (v if np.isfinite(v) else 0.0)
    mc = t.marker.color if t.marker is not None else None
    colors = [(_color(c) or color) for c in mc] if (mc is not None and not isinstance(mc, str)
                                                   and _is_categorical(mc)) else color
    err_values = _errors(t.error_y if value_letter == "y" else t.error_x, values)
    kwargs = {"color": colors, "label": label, "alpha": t.opacity if t.opacity is not None else 1.0}
    if value_letter == "y":
        container = ax.bar(pos + offset, values, width=width, bottom=base, yerr=err_values, **kwargs)
    else:
        container = ax.barh(pos + offset, values, height=width, left=base, xerr=err_values, **kwargs)
    labels = _bar_labels(t, values, list(np.asarray(raw_cats, dtype=object)) if raw_cats is not None else list(pos))
    if labels:
        inside = t.textposition == "inside" or barmode in ("stack", "relative") and n > 1
        ax.bar_label(container, labels=labels, label_type="center" if inside else "edge", padding=2, fontsize=7)


def _heatmap(mfig, ax, t, pair, cats):
    z = _numbers(t.z).reshape(len(t.z), -1) if t.z is not None else None
    if z is None:
        return
    x = cats.positions(pair[0], t.x) if t.x is not None else None
    y = cats.positions(pair[1], t.y) if t.y is not None else None
    numeric = (x is not None and y is not None and x.dtype == float and y.dtype == float
               and len(x) == z.shape[1] and len(y) == z.shape[0])
    if numeric:
        mesh = ax.pcolormesh(x, y, z, shading="nearest", cmap="viridis")
    else:
        mesh = ax.imshow(z, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
    mfig.colorbar(mesh, ax=ax, fraction=0.05)
    if t.texttemplate and z.size <= 200:
        for (r, c), v in np.ndenumerate(z):
            ax.text(x[c] if numeric else c, y[r] if numeric else r, f"{v:.3g}", ha="center", va="center", fontsize=6)
