"""labutils.notebook.slider: ranges and option lists, one clear error for anything else."""
from __future__ import annotations

import ipywidgets as widgets
import pytest

from labutils.notebook import slider


def _controls(s):
    return {c.description: c for c in s.widget.children[:-1]}


def test_ranges_and_options():
    seen = []

    def f(n, g, gpu, group=128):
        seen.append((n, g, gpu))

    s = slider(f, n=(1, 9, 1, 3), g=(0.0, 1.0, 0.1, 0.5), gpu=["H200", "H100 80GB HBM3", "A100-SXM4-80GB"],
               group=[32, 64, 128, 256])
    c = _controls(s)
    assert isinstance(c["n"], widgets.IntSlider) and c["n"].value == 3
    assert isinstance(c["g"], widgets.FloatSlider) and c["g"].value == 0.5
    assert isinstance(c["gpu"], widgets.SelectionSlider) and c["gpu"].options == ("H200", "H100 80GB HBM3", "A100-SXM4-80GB")
    assert c["gpu"].value == "H200"  # no default: the first option
    assert c["group"].value == 128  # the function's default, where it is an option
    c["gpu"].value = "A100-SXM4-80GB"  # moving it calls the function with the option itself
    assert seen[-1] == (3, 0.5, "A100-SXM4-80GB")
    text = s._repr_mimebundle_()
    text = (text[0] if isinstance(text, tuple) else text)["text/plain"]
    assert text.startswith("[slider over n, g, gpu, group")


@pytest.mark.parametrize("spec, message", [([], "empty list"), ((1, 9, 1), r"\(min, max, step, value\)"),
                                           (5, "a list of options")])
def test_bad_specs_say_what_to_give(spec, message):
    with pytest.raises(ValueError, match=message):
        slider(lambda x: None, x=spec)
