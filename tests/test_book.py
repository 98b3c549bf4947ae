"""The book runner: a notebook stopped by the run's deadline is written, partially, to build/; the
student edition stubs solutions and clears outputs."""
from __future__ import annotations

import time

import nbformat
import pytest

from labutils import book


def test_deadline_stops_a_cell_and_keeps_the_outputs(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('first cell ran')"),
                nbformat.v4.new_code_cell("import time\ntime.sleep(60)"),
                nbformat.v4.new_code_cell("print('never')")]
    path = tmp_path / "99_sleepy.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setattr(book, "BUILD", tmp_path / "build")
    t0 = time.time()
    ok, out, seconds = book.execute(path, timeout=600, deadline=time.time() + 8)
    assert not ok and time.time() - t0 < 40, f"ok={ok} after {time.time() - t0:.0f} s"
    assert out == tmp_path / "build" / path.name, f"partial notebook written to {out}"
    done = nbformat.read(out, as_version=4)
    assert "first cell ran" in done.cells[0].outputs[0]["text"]
    assert not done.cells[2].get("outputs"), "a cell after the stopped one ran"


def test_run_saves_no_widget_state_and_keeps_the_sliders_text(tmp_path, monkeypatch):
    """A slider's saved view would point at widget state the notebook does not keep: the runner
    saves neither, leaving the slider's text (and the output of the direct call above it). A
    progress bar leaves nothing (its saved text would be its first frame, "0%|")."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from labutils.notebook import slider\n"
        "def f(n=3):\n    print('n squared is', n * n)\n"
        "f()\nslider(f, n=(1, 9, 1, 3))"),
        nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='work'):\n    pass\n"
                                  "print('after the loop')")]
    path = tmp_path / "99_slider.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setattr(book, "BUILD", tmp_path / "build")
    ok, out, _ = book.execute(path, timeout=120)
    assert ok
    done = nbformat.read(out, as_version=4)
    assert "widgets" not in done.metadata
    outputs = done.cells[0].outputs
    assert "n squared is 9" in outputs[0]["text"]
    views = [o for o in outputs if book.WIDGET_VIEW in o.get("data", {})]
    assert not views, views
    texts = [o["data"]["text/plain"] for o in outputs if "data" in o]
    assert any(t.startswith("[slider over n") for t in texts), texts
    bar = done.cells[1].outputs
    assert [o.get("text") for o in bar] == ["after the loop\n"], bar


# ---- the student edition ------------------------------------------------------------------------------------
SOLVED = '''import math


def expected_tokens(a, k):
    """Tokens per target pass."""
    if a == 1:
        ### BEGIN SOLUTION
        return k + 1
        ### END SOLUTION
    ### BEGIN SOLUTION
    return (1 - a ** (k + 1)) / (1 - a)
    ### END SOLUTION


print(expected_tokens(0.5, 3))'''

STUBBED = '''import math


def expected_tokens(a, k):
    """Tokens per target pass."""
    if a == 1:
        # your code here
        raise NotImplementedError("exercise: expected_tokens")
    # your code here
    raise NotImplementedError("exercise: expected_tokens")


print(expected_tokens(0.5, 3))'''


def _write_notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · A chapter\n### BEGIN SOLUTION (in prose: left alone)")]
    for i, src in enumerate(sources):
        cell = nbformat.v4.new_code_cell(src, execution_count=i + 1)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1.875\n")]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_student_edition_stubs_solutions_and_clears_outputs(tmp_path, capsys):
    src = _write_notebook(tmp_path / "99_chapter.ipynb", SOLVED, "x = 1  # no exercise here\nprint(x)")
    out, n = book.student_edition(src, tmp_path / "student")
    assert out == tmp_path / "student" / "99_chapter.ipynb" and n == 2
    nb = nbformat.read(out, as_version=4)
    assert nb.cells[0].source == "# 99 · A chapter\n### BEGIN SOLUTION (in prose: left alone)"
    assert nb.cells[1].source == STUBBED
    assert nb.cells[2].source == "x = 1  # no exercise here\nprint(x)"
    for cell in nb.cells[1:]:
        assert cell.outputs == [] and cell.execution_count is None and "execution" not in cell.metadata
    original = nbformat.read(src, as_version=4)
    assert original.cells[1].source == SOLVED and original.cells[1].outputs, "the source notebook was changed"
    stub_ns = {}
    exec(nb.cells[1].source.rsplit("\n\n\n", 1)[0], stub_ns)  # the stubbed cell, without its print
    with pytest.raises(NotImplementedError, match="exercise: expected_tokens"):
        stub_ns["expected_tokens"](0.5, 3)


def test_strip_solutions_top_level_and_counts():
    text, n = book.strip_solutions("x = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION\n")
    assert n == 1 and text == 'x = 1\n# your code here\nraise NotImplementedError("exercise: fill in this part")\n'
    assert book.strip_solutions("print('no markers')") == ("print('no markers')", 0)


@pytest.mark.parametrize("source, message", [
    ("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "line 2: '### BEGIN SOLUTION' without a matching"),
    ("def f():\n    return 1\n    ### END SOLUTION\n", "line 3: '### END SOLUTION' without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "line 2: '### BEGIN SOLUTION' inside"),
])
def test_unbalanced_markers_name_the_notebook_and_cell(tmp_path, source, message):
    src = _write_notebook(tmp_path / "98_broken.ipynb", "x = 1", source)
    with pytest.raises(ValueError) as e:
        book.student_edition(src, tmp_path / "student")
    assert "98_broken.ipynb, cell 2" in str(e.value) and message in str(e.value), str(e.value)
    assert not (tmp_path / "student" / "98_broken.ipynb").exists()


def test_student_command(tmp_path, monkeypatch, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _write_notebook(notebooks / "05_spec.ipynb", SOLVED)
    _write_notebook(notebooks / "06_serve.ipynb", "print(1)")
    monkeypatch.setattr(book, "NOTEBOOKS", notebooks)
    book.main(["student", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "05_spec.ipynb: 2 exercises stubbed" in printed and "06_serve.ipynb: 0 exercises stubbed" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["05_spec.ipynb", "06_serve.ipynb"]


def test_only_runs_in_the_order_given(tmp_path, monkeypatch):
    for stem in ("00_a", "01_b", "05_c"):
        (tmp_path / f"{stem}.ipynb").write_text("{}")
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    assert [p.stem for p in book.notebooks()] == ["00_a", "01_b", "05_c"]
    assert [p.stem for p in book.notebooks(["05", "00"])] == ["05_c", "00_a"]
    assert [p.stem for p in book.notebooks(["0", "05"])] == ["00_a", "01_b", "05_c"]
