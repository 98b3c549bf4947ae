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
    run exercises the same code). ``ranges``: name=(min, max, step, value)."""
    import ipywidgets as widgets

    controls = {name: widgets.IntSlider(min=lo, max=hi, step=step, value=value,
                                        continuous_update=False, description=name)
                for name, (lo, hi, step, value) in ranges.items()}
    return widgets.interactive(fn, **controls)
