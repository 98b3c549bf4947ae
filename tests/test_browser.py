"""The book in a real browser (issue 12, item 6): JupyterLab in headless Chromium.

For each notebook notebooks/NN_*.ipynb, on a copy in a temporary folder (the committed files are
never written):

1. Opened, before anything runs, every committed chart renders: a plotly output is a live plotly
   plot whose axes are finite and sane (ranges and tick labels within 1e-12..1e12, which catches the
   log-axis blow-up to 1e270 of a misplaced annotation), or a static image that loaded.
2. Run All (the Run menu) in smoke mode (LAB_SMOKE=1), to an idle kernel: every code cell ran, no
   output is an error (a traceback), and the charts the run drew have sane axes too.
3. Where the notebook has a slider (labutils.notebook.slider), one slider moved with the keyboard
   changes the text of the slider's output, without an error.

Screenshots go to build/browser/<notebook>-*.png (git-ignored test artifacts).

Needs Debian's `chromium` and the `playwright` package (its own browser download is not used).
When either is missing the module is skipped with the reason, unless LAB_BROWSER_TEST=1, where
that is a failure. scripts/test.sh runs this module as its own phase (marker `browser`).
LAB_BROWSER_TIMEOUT: seconds allowed for one notebook's Run All (default 900).
LAB_BROWSER_NOTEBOOKS: a comma-separated list of name prefixes ("00,03") to test only those.
Each notebook's Run All time and its kernel's CPU seconds go to build/browser/timings.txt.
Under pytest-xdist (scripts/test.sh: one worker per core, up to 4) each worker runs its own server
and browser over the notebooks it is given.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
if os.environ.get("LAB_BROWSER_NOTEBOOKS"):  # e.g. "00,03": only the notebooks whose names start so
    NOTEBOOKS = [p for p in NOTEBOOKS if p.name.startswith(tuple(os.environ["LAB_BROWSER_NOTEBOOKS"].split(",")))]
ARTIFACTS = REPO / "build" / "browser"
REQUIRED = os.environ.get("LAB_BROWSER_TEST") == "1"
RUN_TIMEOUT_S = float(os.environ.get("LAB_BROWSER_TIMEOUT", "900"))
SLIDER_TIMEOUT_S = 300.0
SANE = 1e12  # no axis of the book spans values beyond 1e12 or, on a log axis, below 1e-12
PLOTLY_MIME = "application/vnd.plotly.v1+json"

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not shutil.which("chromium"):
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -c constraints-cpu.txt playwright)"
    return None


MISSING = _missing()


def _require_browser():
    """Skip (or, with LAB_BROWSER_TEST=1, fail) when chromium or playwright is missing."""
    if MISSING and REQUIRED:
        pytest.fail(f"LAB_BROWSER_TEST=1 but {MISSING}")
    if MISSING:
        pytest.skip(f"browser test skipped: {MISSING} (LAB_BROWSER_TEST=1 makes this a failure)")


# ---- the server and the browser ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings: Path):
    """A clean user-settings folder: no news pop-up, no autosave, every cell rendered (no windowing)."""
    for plugin, values in {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server (no token) over a copy of the notebooks; yields its base URL."""
    _require_browser()
    root = tmp_path_factory.mktemp("browser")
    books = root / "notebooks"
    books.mkdir()
    for nb in NOTEBOOKS:  # notebooks read data through labutils (paths from the package), not from cwd
        shutil.copy2(nb, books / nb.name)
    _write_settings(root / "settings")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # under pytest-xdist each worker has its own server: keep the others' lines
        (ARTIFACTS / "timings.txt").unlink(missing_ok=True)
    port = _free_port()
    env = {**os.environ, "LAB_SMOKE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "LAB_RESULTS_DIR": str(ARTIFACTS / "results"),  # inside the repo (build/), as a notebook may print its path relative to it
           "JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ip=127.0.0.1", "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={books}", f"--LabApp.user_settings_dir={root / 'settings'}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}"],
        cwd=books, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (root / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()  # SIGTERM: the server shuts its kernels down
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "server.log", ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def _kernel_cpu_s(url: str) -> float | None:
    """CPU seconds used so far by the server's kernels (a measure of the work that the machine's load
    does not stretch, unlike wall time)."""
    try:
        import psutil

        ids = [k["id"] for k in json.loads(urllib.request.urlopen(f"{url}/api/kernels", timeout=10).read())]
        total = 0.0
        for proc in psutil.process_iter(["cmdline"]):
            if any(f"kernel-{i}.json" in arg for i in ids for arg in (proc.info["cmdline"] or [])):
                t = proc.cpu_times()
                total += t.user + t.system
        return total
    except Exception:  # noqa: BLE001  (only a report)
        return None


def _shutdown_sessions(url: str):
    """Shut the notebook's kernel down (freeing its memory and cores) before the next notebook."""
    try:
        for sess in json.loads(urllib.request.urlopen(f"{url}/api/sessions", timeout=10).read()):
            req = urllib.request.Request(f"{url}/api/sessions/{sess['id']}", method="DELETE")
            urllib.request.urlopen(req, timeout=60).read()
    except OSError as e:  # the server's own shutdown still ends every kernel
        print(f"could not shut the kernels down: {e}")


# ---- reading a plot's axes -------------------------------------------------------------------------------
_AXES_JS = """e => {
  const L = e._fullLayout, out = {};
  if (!L) return null;
  for (const k of Object.keys(L)) {
    if (!/^[xy]axis\\d*$/.test(k) || !L[k] || L[k].visible === false) continue;
    out[k] = {type: L[k].type, range: L[k].range, ticks: []};
  }
  // tick labels as drawn, a superscript (10<sup>3</sup>, exponentformat 'power') written as 10^3
  for (const t of e.querySelectorAll('g.xtick text, g.ytick text, g.xtick2 text, g.ytick2 text')) {
    const cls = t.parentNode.getAttribute('class') || '';
    const axis = (cls.match(/[xy]\\d*tick/) || ['?'])[0].replace('tick', 'axis').replace(/^([xy])1$/, '$1');
    let s = '';
    for (const n of t.childNodes) {
      const dy = n.nodeType === 1 ? (n.getAttribute('dy') || '') : '';
      s += dy.startsWith('-') ? '^' + n.textContent : n.textContent;
    }
    (out[axis] = out[axis] || {type: '?', range: null, ticks: []}).ticks.push(s);
  }
  return out;
}"""

_SI = {"y": 1e-24, "z": 1e-21, "a": 1e-18, "f": 1e-15, "p": 1e-12, "n": 1e-9, "μ": 1e-6, "µ": 1e-6,
       "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "Z": 1e21, "Y": 1e24}


def tick_value(text: str) -> float | None:
    """A plotly tick label as a number ('10k', '2.5M', '1e+270', '10^32', '−3', '50%'); None when
    the label is not a number (a category, a date)."""
    s = text.replace("\u200b", "").strip().replace("\u2212", "-").replace(",", "").replace("\u2009", "").rstrip("%")
    if not s:
        return None
    m = re.fullmatch(r"(?:([-+]?\d*\.?\d+)\s*[×x·]\s*)?10\^([-+]?\d+)", s)  # 10^32, 2×10^5
    if m:
        return (float(m.group(1)) if m.group(1) else 1.0) * 10.0 ** int(m.group(2))
    m = re.fullmatch(r"([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*([yzafpnμµmkMGBTPEZY]?)", s)
    if not m:
        return None
    return float(m.group(1)) * _SI.get(m.group(2), 1.0)


def axis_problems(axes: dict) -> list[str]:
    """What is absurd about a plot's axes: non-finite or > 1e12 ranges and tick labels."""
    bad = []
    for name, ax in sorted(axes.items()):
        if ax.get("type") in ("category", "multicategory", "date"):
            continue
        rng = ax.get("range")
        if rng is not None:
            try:
                lo, hi = (float(v) for v in rng)
            except (TypeError, ValueError):
                bad.append(f"{name}: range {rng!r} is not numeric")
                continue
            if not (math.isfinite(lo) and math.isfinite(hi)):
                bad.append(f"{name}: range {rng} is not finite")
            elif ax.get("type") == "log":
                if max(abs(lo), abs(hi)) > math.log10(SANE):
                    bad.append(f"{name}: log axis spans 1e{lo:.0f} to 1e{hi:.0f}")
            elif max(abs(lo), abs(hi)) > SANE:
                bad.append(f"{name}: range {lo:.3g} to {hi:.3g}")
        ticks = ax.get("ticks", [])
        values = [(t, tick_value(t)) for t in ticks]
        values = [(t, v) for t, v in values if v is not None]
        wild = [t for t, v in values if not math.isfinite(v) or abs(v) > SANE
                or (ax.get("type") == "log" and 0 < abs(v) < 1 / SANE)]
        if wild:
            bad.append(f"{name}: tick labels {[t.replace(chr(0x200b), '') for t in wild[:6]]}")
        if ticks and not values:
            bad.append(f"{name}: no tick label reads as a number: {ticks[:6]}")
    return bad


def test_tick_value_and_axis_problems():
    assert tick_value("10k") == 10_000 and tick_value("2.5M") == 2.5e6 and tick_value("\u22123") == -3
    assert tick_value("1e+270") == 1e270 and tick_value("10^32") == 1e32 and tick_value("Qwen") is None
    assert tick_value("1,024") == 1024 and tick_value("50%") == 50
    assert tick_value("10\u200b^32\u200b") == 1e32  # plotly's 10<sup>32</sup>, as the test reads it
    assert axis_problems({"xaxis": {"type": "linear", "range": [0, 10], "ticks": ["0", "10\u200b^32\u200b"]}})
    assert axis_problems({"xaxis": {"type": "log", "range": [-18.1, 295.6], "ticks": ["1", "10^32"]}})
    assert axis_problems({"xaxis": {"type": "linear", "range": [0, float("nan")], "ticks": []}})
    assert axis_problems({"yaxis": {"type": "linear", "range": [0, 10], "ticks": ["0", "1e+270"]}})
    assert not axis_problems({"xaxis": {"type": "log", "range": [-0.18, 3.19], "ticks": ["1", "2", "5", "10", "1000", "10k"]},
                              "yaxis": {"type": "linear", "range": [0, 350], "ticks": ["0", "100", "200", "300"]}})


# ---- the page --------------------------------------------------------------------------------------------
def _code_cells_with_plotly(nb_path: Path) -> list[int]:
    """Indices (among all cells) of the code cells whose committed outputs hold a plotly figure."""
    cells = json.loads(nb_path.read_text())["cells"]
    return [i for i, c in enumerate(cells) if c["cell_type"] == "code"
            and any(PLOTLY_MIME in o.get("data", {}) for o in c.get("outputs", []))]


def _has_slider(nb_path: Path) -> bool:
    cells = json.loads(nb_path.read_text())["cells"]
    return any(c["cell_type"] == "code" and re.search(r"^\s*slider\(", "".join(c["source"]), re.M) for c in cells)


def _check_charts(page, stem: str, tag: str, cell_indices: list[int] | None) -> list[str]:
    """Every plotly plot (in the given cells, or anywhere) renders with sane axes, every image loaded.
    Returns the problems; screenshots each chart."""
    problems = []
    if cell_indices is not None:
        cells = page.locator(".jp-Notebook .jp-Cell")
        scopes = [(f"cell {i}", cells.nth(i)) for i in cell_indices]
    else:
        scopes = [("notebook", page.locator(".jp-Notebook").first)]
    k = 0
    for where, scope in scopes:
        plots = scope.locator(".jp-OutputArea-output.js-plotly-plot")
        # an image output, or the plotly renderer showing the output's static image (img.plot-img: what a
        # saved notebook with an image/png beside its figure shows until the interactive plot is drawn)
        image_css = ".jp-OutputArea-output.jp-RenderedImage img, .jp-OutputArea-output.jp-RenderedPlotly img.plot-img"
        images = scope.locator(image_css)
        if cell_indices is not None:
            try:  # the renderers draw asynchronously
                scope.locator(f".jp-OutputArea-output.js-plotly-plot, {image_css}").first.wait_for(timeout=30_000)
            except Exception:  # noqa: BLE001
                problems.append(f"{where}: a committed plotly output renders as neither a plot nor an image")
                continue
        for j in range(plots.count()):
            plot = plots.nth(j)
            plot.scroll_into_view_if_needed()
            try:
                plot.locator("svg.main-svg").first.wait_for(timeout=30_000)
            except Exception:  # noqa: BLE001
                problems.append(f"{where}: plot {j} drew no svg")
                continue
            axes = plot.evaluate(_AXES_JS)
            plot.screenshot(path=str(ARTIFACTS / f"{stem}-{tag}-{where.replace(' ', '')}-chart{k}.png"))
            k += 1
            if not axes:
                problems.append(f"{where}: plot {j} has no axes")
            problems += [f"{where}, plot {j}: {p}" for p in axis_problems(axes or {})]
        for j in range(images.count()):
            img = images.nth(j)
            try:
                img.scroll_into_view_if_needed()
                w = img.evaluate("e => e.complete ? e.naturalWidth : 0")
                img.screenshot(path=str(ARTIFACTS / f"{stem}-{tag}-{where.replace(' ', '')}-image{k}.png"))
            except Exception as e:  # noqa: BLE001
                # a plotly output's static image is a placeholder that the renderer replaces by the
                # interactive plot when it is drawn: detached then, it is no longer on the page
                if "not attached to the DOM" not in str(e):
                    raise
                continue
            k += 1
            if w < 50:
                problems.append(f"{where}: image {j} did not load (natural width {w})")
    return problems


def _error_outputs(scope) -> list[str]:
    """The text of every error output (a traceback) under scope; stderr warnings are not errors."""
    found = []
    errs = scope.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
    found += [errs.nth(i).inner_text()[-1500:] for i in range(errs.count())]
    outs = scope.locator(".jp-OutputArea-output")
    for i in range(outs.count()):
        text = outs.nth(i).inner_text()
        if "Traceback (most recent call last)" in text and text[-1500:] not in found:
            found.append(text[-1500:])
    return found


def _kernel_status(page) -> str:
    ind = page.locator(".jp-Notebook-ExecutionIndicator")
    return (ind.first.get_attribute("data-status") or "?") if ind.count() else "?"


def _prompts(page) -> list[str]:
    return [t.strip() for t in page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_text_contents()]


def _wait_idle(page, timeout_s: float, what: str):
    """Until the kernel is idle and no cell waits to run, twice in a row a second apart."""
    deadline, calm = time.time() + timeout_s, 0
    while True:
        busy = _kernel_status(page) != "idle" or any("*" in p for p in _prompts(page))
        calm = 0 if busy else calm + 1
        if calm >= 2:
            return
        if time.time() > deadline:
            raise AssertionError(f"{what}: still busy after {timeout_s:.0f} s (prompts {_prompts(page)})")
        page.wait_for_timeout(1000)


def _move_slider(page, stem: str) -> str:
    """Moves the first slider of the first slider widget by one step (down when it can: smaller is
    cheaper) and waits for its output to change. Returns a description; raises on failure."""
    interact = page.locator(".widget-interact").first
    interact.scroll_into_view_if_needed()
    handle = interact.locator(".noUi-handle").first
    out = interact.locator(".widget-output").first
    label = interact.locator(".widget-slider .widget-label").first.inner_text()
    before_text = out.inner_text().strip()
    assert before_text, f"the {label} slider's output is empty before the move"
    before, lo = float(handle.get_attribute("aria-valuenow")), float(handle.get_attribute("aria-valuemin"))
    interact.screenshot(path=str(ARTIFACTS / f"{stem}-slider-before.png"))
    handle.focus()
    handle.press("ArrowLeft" if before > lo else "ArrowRight")
    page.wait_for_function("([h, v]) => parseFloat(h.getAttribute('aria-valuenow')) !== v",
                           arg=[handle.element_handle(), before], timeout=10_000)
    after = float(handle.get_attribute("aria-valuenow"))
    deadline = time.time() + SLIDER_TIMEOUT_S
    while True:
        text = out.inner_text().strip()
        if text and text != before_text and _kernel_status(page) == "idle":
            page.wait_for_timeout(1000)  # let the output settle (more lines may follow)
            if _kernel_status(page) == "idle":
                break
        if time.time() > deadline:
            raise AssertionError(f"moving {label} from {before:g} to {after:g}: the output did not change "
                                 f"within {SLIDER_TIMEOUT_S:.0f} s:\n{text[:500]}")
        page.wait_for_timeout(500)
    interact.screenshot(path=str(ARTIFACTS / f"{stem}-slider-after.png"))
    errors = _error_outputs(interact)
    assert not errors, f"moving {label} to {after:g} raised:\n" + "\n---\n".join(errors)
    return f"{label} {before:g} -> {after:g}"


# Committed outputs known to draw a broken chart (e.g. an annotation on a log axis, whose x plotly
# reads as log10) until their notebook's next GPU run: the check must keep failing on them (an entry
# whose charts pass is reported, so a stale one cannot linger). None at present.
STALE_CHARTS: dict[str, str] = {}  # stem -> what is broken in its committed charts, until its GPU re-run


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_browser(nb_path: Path, lab: str, browser):
    stem = nb_path.stem
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob(f"{stem}-*.png"):
        old.unlink()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{lab}/lab/tree/{nb_path.name}?reset")  # ?reset: only this notebook, no restored tabs
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / f"{stem}-0-opened.png"))

        # 1. the committed charts, before anything runs
        committed = _check_charts(page, stem, "committed", _code_cells_with_plotly(nb_path))
        if stem in STALE_CHARTS:  # known broken until the notebook's GPU re-run: must still fail
            if not committed:
                committed = [f"now renders correctly: remove {stem} from STALE_CHARTS"]
            else:
                print(f"{stem}: committed charts known broken ({STALE_CHARTS[stem]}): {committed}")
                committed = []
        problems = [f"committed chart, {p}" for p in committed]

        # 2. Run All, to an idle kernel, with no error output
        t0 = time.time()
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]"
            ".some(p => p.textContent.includes('*'))", timeout=30_000)
        try:
            _wait_idle(page, RUN_TIMEOUT_S, f"{stem} Run All")
        finally:
            page.screenshot(path=str(ARTIFACTS / f"{stem}-1-ran.png"))
        run_s, cpu = time.time() - t0, _kernel_cpu_s(lab)
        errors = _error_outputs(page.locator(".jp-Notebook").first)
        if errors:
            page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").first \
                .screenshot(path=str(ARTIFACTS / f"{stem}-error.png"))
            # an error stops Run All: the rest (charts, slider) cannot be checked
            pytest.fail("\n".join(problems + [f"error output after Run All ({run_s:.0f} s):"] + errors))
        unrun = [i for i, p in enumerate(_prompts(page)) if not re.fullmatch(r"\[\d+\]:", p)]
        if unrun:
            problems.append(f"code cells {unrun} did not run (prompts {_prompts(page)})")
        problems += [f"chart drawn by the run, {p}" for p in _check_charts(page, stem, "run", None)]

        # 3. one slider moved changes its output
        moved = "no slider"
        if _has_slider(nb_path):
            if not page.locator(".widget-interact .noUi-handle").count():
                problems.append("the notebook calls slider() but no slider widget rendered")
            else:
                try:
                    moved = _move_slider(page, stem)
                except AssertionError as e:
                    problems.append(f"slider: {e}")
        page.screenshot(path=str(ARTIFACTS / f"{stem}-2-done.png"))
        line = (f"{stem}: Run All took {run_s:.0f} s" + (f" (kernel CPU {cpu:.0f} s)" if cpu is not None else "")
                + f"; slider: {moved}")
        print(line)
        with open(ARTIFACTS / "timings.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        assert not problems, f"{stem}:\n" + "\n".join(problems)
    finally:
        page.close()  # unsaved: the page is closed without saving (and the folder is a copy)
        _shutdown_sessions(lab)
