"""Small helpers for the notebooks: one setup line, showing package source, and sliders."""
from __future__ import annotations

import inspect

from . import runtime


def setup(seed: int = 0):
    """Seed, plotly renderer, quieter transformers; prints where the notebook runs. Returns the device."""
    import plotly.io as pio
    import torch
    import transformers

    torch.manual_seed(seed)
    # Interactive in JupyterLab (mimetype) and viewable as saved HTML elsewhere (notebook_connected).
    pio.renderers.default = "plotly_mimetype+notebook_connected"
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(runtime.describe())
    return runtime.device()


def show_source(obj):
    """Display the source of a labutils function or class: the notebook reads the package's code
    rather than keeping a second copy of it."""
    from IPython.display import Markdown, display

    while not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)) and hasattr(obj, "fn"):
        obj = obj.fn  # a Triton kernel (JITFunction, its interpreter form, an Autotuner) wraps its function
    display(Markdown(f"```python\n{inspect.getsource(obj)}```"))


def slider(fn, **ranges):
    """An ipywidgets slider over ``fn`` (the notebook also calls ``fn`` once directly, so a headless
    run exercises the same code). ``ranges``: name=(min, max, step, value), a float among them
    making a FloatSlider; or name=[option, ...] (a list: the valid values only, e.g. group sizes or
    GPU names), a slider over those values that starts at ``fn``'s default when it is one of them."""
    import ipywidgets as widgets

    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def control(name, spec):
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"slider {name!r}: an empty list of options")
            value = defaults[name] if defaults.get(name, object()) in spec else spec[0]
            return widgets.SelectionSlider(options=spec, value=value, continuous_update=False, description=name)
        if not (isinstance(spec, tuple) and len(spec) == 4):
            raise ValueError(f"slider {name!r}: give (min, max, step, value) or a list of options, got {spec!r}")
        lo, hi, step, value = spec
        kind = widgets.FloatSlider if any(isinstance(v, float) for v in (lo, hi, step, value)) else widgets.IntSlider
        return kind(min=lo, max=hi, step=step, value=value, continuous_update=False, description=name)

    controls = {name: control(name, r) for name, r in ranges.items()}
    return _Slider(widgets.interactive(fn, **controls))


class _Slider:
    """Shows the interactive widget in a live kernel; where no kernel runs (GitHub, nbviewer, a
    saved notebook) its text says what it is instead of ``interactive(children=...)``."""

    def __init__(self, widget):
        self.widget = widget

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        names = ", ".join(c.description for c in self.widget.children[:-1] if getattr(c, "description", ""))
        data["text/plain"] = f"[slider over {names}: run the notebook to move it; its output for the default values is above]"
        return bundle
