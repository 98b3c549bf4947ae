"""The book runner: a notebook stopped by the run's deadline is written, partially, to build/."""
from __future__ import annotations

import time

import nbformat

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
