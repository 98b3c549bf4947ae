"""The repository's own consistency: dependency lists, paired notebooks, committed results, data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
RESULTS = REPO / "results"
RESULT_KEYS = {"notebook", "device", "smoke", "created", "versions", "metrics"}


# ---- dependencies ----------------------------------------------------------------------------------------
def _normalise(req: str) -> str:
    """'Torch >= 2.5' -> 'torch>=2.5' (name lower-cased, '_' as '-', no spaces)."""
    req = re.sub(r"\s+", "", req)
    m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)(.*)$", req)
    name, rest = m.group(1), m.group(2)
    return name.lower().replace("_", "-") + rest


def _pyproject_deps() -> set[str]:
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {_normalise(d) for d in data["project"]["dependencies"]}


def _environment_pip() -> set[str]:
    import yaml

    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, f"environment.yml should have one pip list, found {len(pip_lists)}"
    entries = [e.strip() for e in pip_lists[0]]
    assert "-e ." in entries, "environment.yml should install the package itself (-e .)"
    return {_normalise(e) for e in entries if e != "-e ."}


def test_environment_yml_matches_pyproject():
    env, proj = _environment_pip(), _pyproject_deps()
    assert env == proj, (f"only in environment.yml: {sorted(env - proj)}; "
                         f"only in pyproject.toml: {sorted(proj - env)}")


def test_normalise():
    assert _normalise("Torch >= 2.5") == "torch>=2.5"
    assert _normalise("typing_extensions") == "typing-extensions"
    assert _normalise("torch>=2.5") != _normalise("torch>=2.6")


# ---- paired notebooks ------------------------------------------------------------------------------------------
def cell_list(nb) -> list[tuple[str, str]]:
    """What a notebook says, ignoring metadata and outputs: [(cell_type, stripped source), ...]."""
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def pair_differences(a, b) -> list[str]:
    """Human-readable differences between the cells of two notebooks ([] when they agree)."""
    ca, cb = cell_list(a), cell_list(b)
    out = []
    if len(ca) != len(cb):
        out.append(f"{len(ca)} cells vs {len(cb)} cells")
    for i, (x, y) in enumerate(zip(ca, cb)):
        if x != y:
            out.append(f"cell {i}: {x[0]} {x[1][:60]!r} vs {y[0]} {y[1][:60]!r}")
    return out


def _stems(pattern: str) -> set[str]:
    return {p.stem for p in NOTEBOOKS.glob(pattern)} if NOTEBOOKS.is_dir() else set()


IPYNB = sorted(_stems("[0-9][0-9]_*.ipynb"))
PY = sorted(_stems("[0-9][0-9]_*.py"))


def _notebook_params(stems):
    return stems or [pytest.param(None, marks=pytest.mark.skip(reason="no notebooks yet"))]


def test_pair_comparison_detects_differences():
    import jupytext
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    base = new_notebook(cells=[new_markdown_cell("# Title"), new_code_cell("x = 1\nprint(x)")])
    same = new_notebook(cells=[new_markdown_cell("# Title\n"), new_code_cell("x = 1\nprint(x)\n")],
                        metadata={"jupytext": {"formats": "ipynb,py:percent"}})
    same.cells[1].outputs = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    same.cells[1].metadata["tags"] = ["NBVAL_CHECK_OUTPUT"]
    edited = new_notebook(cells=[new_markdown_cell("# Title"), new_code_cell("x = 2\nprint(x)")])
    longer = new_notebook(cells=base.cells + [new_code_cell("y = 3")])
    retyped = new_notebook(cells=[new_code_cell("# Title"), new_code_cell("x = 1\nprint(x)")])
    assert pair_differences(base, same) == []
    assert pair_differences(base, edited), "an edited cell went unnoticed"
    assert pair_differences(base, longer), "an extra cell went unnoticed"
    assert pair_differences(base, retyped), "a changed cell type went unnoticed"
    # and through jupytext's percent format, as the paired .py files are read
    text = jupytext.writes(base, fmt="py:percent")
    assert "# %%" in text
    assert pair_differences(base, jupytext.reads(text, fmt="py:percent")) == []
    assert pair_differences(base, jupytext.reads(text.replace("x = 1", "x = 5"), fmt="py:percent"))


def test_every_notebook_has_a_pair():
    if not IPYNB and not PY:
        pytest.skip("no notebooks yet")
    assert set(IPYNB) == set(PY), (f".ipynb without .py: {sorted(set(IPYNB) - set(PY))}; "
                                   f".py without .ipynb: {sorted(set(PY) - set(IPYNB))}")


@pytest.mark.parametrize("stem", _notebook_params(sorted(set(IPYNB) & set(PY))))
def test_paired_notebook_agrees(stem):
    import jupytext

    ipynb = jupytext.read(NOTEBOOKS / f"{stem}.ipynb")
    py_path = NOTEBOOKS / f"{stem}.py"
    assert py_path.read_text().lstrip().startswith("# ---") or "# %%" in py_path.read_text(), \
        f"{py_path.name} is not in jupytext percent format"
    py = jupytext.read(py_path, fmt="py:percent")
    diffs = pair_differences(ipynb, py)
    assert not diffs, f"{stem}.ipynb and {stem}.py disagree:\n" + "\n".join(diffs[:10])


@pytest.mark.parametrize("stem", _notebook_params(IPYNB))
def test_notebook_has_no_error_output(stem):
    nb = json.loads((NOTEBOOKS / f"{stem}.ipynb").read_text())
    errors = [(i, o.get("ename"), o.get("evalue")) for i, cell in enumerate(nb["cells"])
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{stem}.ipynb holds error outputs (cell, name, value): {errors[:5]}"


# ---- committed results --------------------------------------------------------------------------------------------
RESULT_FILES = sorted(p.name for p in RESULTS.glob("*.json")) if RESULTS.is_dir() else []


@pytest.mark.parametrize("name", RESULT_FILES or [pytest.param(None, marks=pytest.mark.skip(reason="no results yet"))])
def test_committed_result(name):
    record = json.loads((RESULTS / name).read_text())
    assert RESULT_KEYS <= set(record), f"{name} lacks {sorted(RESULT_KEYS - set(record))}"
    assert record["smoke"] is False, f"{name} comes from a smoke run (smoke={record['smoke']!r})"
    assert record["notebook"] == Path(name).stem, f"{name} says notebook {record['notebook']!r}"
    assert isinstance(record["metrics"], dict) and record["metrics"], f"{name} has no metrics"


# ---- the text data ------------------------------------------------------------------------------------------------
def test_data_texts():
    from labutils import data

    for which in data.FILES:
        text = data.load_text(which)
        assert len(text) > 50_000, f"{which}: only {len(text)} characters"
    assert data.load_text("eval") != data.load_text("calibration")
    with pytest.raises(ValueError, match="which"):
        data.load_text("train")
