"""Run the whole book headless and print its headline results.

    python -m labutils.book run [--only 00,01] [--timeout 3600]
    python -m labutils.book headlines
    python -m labutils.book student [--out build/student]

A full run (GPU) executes each notebook in place, so its outputs can be committed, and writes
results/. A smoke run (CPU, CI=true or LAB_SMOKE=1) writes executed copies to build/notebooks/ and
results to build/results/, leaving the committed notebooks and results untouched. A notebook that
fails is written to build/notebooks/ with its error, never over the committed one.

``student`` writes the student edition: every notebook with each exercise's solution (the lines
between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in a code cell, markers included) replaced
by a stub that raises NotImplementedError, and every output cleared (see labutils/exercises.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from . import runtime
from .results import REPO, results_dir

NOTEBOOKS = REPO / "notebooks"
BUILD = REPO / "build" / "notebooks"
STUDENT = REPO / "build" / "student"

# The headline metric(s) of each notebook: (metric key, label, format).
HEADLINES = {
    "00_roofline": [("copy_gbps", "copy bandwidth (GB/s, read+write)", "{:,.4g}"),
                    ("matmul_bf16_tflops", "dense bf16 matmul (TFLOP/s)", "{:,.4g}")],
    "01_naive_attention": [("decoder_vs_hf_max_rel_err", "lab decoder vs HF, max rel err (fp32)", "{:.1e}"),
                           ("no_cache_ms_per_token", "no-cache ms/token by length", None)],
    "02_kv_cache": [("engine_bs1_tok_s", "lab engine, batch 1 (tok/s, shape twin)", "{:,.1f}"),
                    ("hf_generate_bs1_tok_s", "HF generate, batch 1 (tok/s, shape twin)", "{:,.1f}"),
                    ("engine_vs_roofline", "engine / (copy BW / model bytes)", "{:.1%}"),
                    ("engine_vs_roofline_bytes_read", "engine / (copy BW / bytes read)", "{:.1%}"),
                    ("kv_bytes_measured", "KV cache bytes measured / predicted", None)],
    "03_flash_attention": [("fwd_vs_cudnn_min", "Triton fwd / cuDNN, d128 fp16 N>=4096 non-causal (worst)", "{:.2f}"),
                           ("fwd_vs_flash_min", "Triton fwd / SDPA flash, d128 fp16 N>=4096 non-causal (worst)", "{:.2f}"),
                           ("decode_gbps", "decode attention (GB/s of K+V)", "{:,.0f}")],
    "04_quantization": [("layer_us", "3584->18944 layer at batch 1 (us)", None),
                        ("engine_tok_s", "engine batch 1 (tok/s, shape twin)", None),
                        ("ppl", "perplexity on real weights (results: ppl_model)", None)],
    "05_speculative": [("speedup", "best speedup over the plain engine, embedded model, batch 1 (with prefill)", None),
                       ("decode_speedup", "the same, decode only (after the prompt's forward)", None),
                       ("hf_prompt_lookup_speedup", "HF prompt lookup over HF plain (best task)", "{:.2f}"),
                       ("verify_cost_ratio", "verify T tokens / 1 token (shape twin)", None),
                       ("predicted_speedup_7b", "predicted speedup at 7B (shape twin costs)", None),
                       ("greedy_identical", "greedy text identical to plain decoding", None)],
    "06_serving": [("throughput_tok_s", "output tok/s on one trace (shape twin)", None),
                   ("kv_utilization", "paged KV utilization (positions / allocated slots)", "{:.1%}"),
                   ("prefix_cache_ttft_speedup", "TTFT cold / warm, shared 1k-token prefix", "{:.2f}"),
                   ("outputs_match_alone", "every output equals the request alone", None)],
}


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The book's notebooks in order, or those whose names start with one of ``only``, in the order
    given (``--only 05,00`` runs 05 first: a long notebook that reads no other's results can go before
    the deadline of a shared run is near)."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for o in only for p in paths if p.stem.startswith(o)]
        paths = list(dict.fromkeys(paths))
    return paths


def execute(path: Path, timeout: int, deadline: float | None = None) -> tuple[bool, Path, float]:
    """Run one notebook; ``deadline`` (time.time() value): stop the cell running when it passes, so a
    run on a machine with a hard time limit still writes what it computed (to build/notebooks/)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    def cell_timeout(cell):
        left = timeout if deadline is None else min(timeout, deadline - time.time())
        return max(int(left), 1)

    started = {}

    def cell_started(cell, cell_index, **_):
        started["t"] = time.perf_counter()

    def cell_done(cell, cell_index, **_):  # progress for long runs: the cells that took a while
        took = time.perf_counter() - started.get("t", time.perf_counter())
        if took >= 10:
            first = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
            print(f"    cell {cell_index}: {took:.0f} s  ({first})", flush=True)

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, timeout_func=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_execute=cell_started, on_cell_executed=cell_done)
    t0 = time.perf_counter()
    ok = True
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        ok = False
        print(str(e)[-3000:], file=sys.stderr)
    seconds = time.perf_counter() - t0
    drop_widget_views(nb)
    out = path if (ok and not runtime.smoke()) else BUILD / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return ok, out, seconds


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def drop_widget_views(nb) -> int:
    """Remove widget views from a notebook's saved outputs (and any saved widget state), keeping
    their text: a saved view points at widget state that a saved notebook does not keep (kept, the
    state of a notebook's sliders weighed ~270 KB), so no viewer could draw it; the text says what
    the slider is, and the function's output for its default values sits above it. A progress bar
    (tqdm's widget) goes whole: its text is its first frame, "0%|", which says nothing once the run
    is over. Returns how many views were removed."""
    n = 0
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                n += 1
                if PROGRESS_BAR.search(_text(data.get("text/plain", "")).split("\n", 1)[0]):
                    continue  # a progress bar: its saved text is its first frame ("0%|"), dead without the widget
                del data[WIDGET_VIEW]
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept
    nb.metadata.pop("widgets", None)
    return n


PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's text: "desc:  40%|████      | 2/5 [...]"


def _text(v) -> str:
    return "".join(v) if isinstance(v, list) else str(v)


def headlines(stems: list[str]) -> str:
    rows = []
    for stem in stems:
        path = results_dir() / f"{stem}.json"
        if not path.is_file():
            rows.append((stem, "(no results file)", "", ""))
            continue
        rec = json.loads(path.read_text())
        for key, label, fmt in HEADLINES.get(stem, []):
            value = rec["metrics"].get(key)
            if key == "kv_bytes_measured" and value is not None:
                text = f"{value:,} / {rec['metrics']['kv_bytes_predicted']:,}"
            elif isinstance(value, dict):
                text = ", ".join(f"{k}: {v:.2f}" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in value.items())
            else:
                text = fmt.format(value) if (fmt and value is not None) else str(value)
            rows.append((stem, label, text, f"{rec['device']}{' (smoke)' if rec['smoke'] else ''}"))
    widths = [max(len(str(r[i])) for r in rows + [("notebook", "metric", "value", "device")]) for i in range(4)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(("notebook", "metric", "value", "device")), line(["-" * w for w in widths])]
                     + [line(r) for r in rows])


# ---- the student edition ---------------------------------------------------------------------------------------
_MARKER = re.compile(r"^(?P<indent>[ \t]*)###[ \t]*(?P<which>BEGIN|END) SOLUTION[ \t]*$")
_DEF = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+)?def[ \t]+(?P<name>\w+)")


def strip_solutions(source: str) -> tuple[str, int]:
    """Replace each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region of a code cell (marker
    lines included) with a stub at the BEGIN marker's indentation. Returns (source, regions);
    ValueError, naming the line, for a marker without its partner."""
    lines, out, regions = source.split("\n"), [], 0
    begin = None  # (line number, indentation) of an open region
    for number, line in enumerate(lines, 1):
        m = _MARKER.match(line)
        if m and m["which"] == "BEGIN":
            if begin:
                raise ValueError(f"line {number}: '### BEGIN SOLUTION' inside the solution opened on line {begin[0]}")
            begin = (number, m["indent"])
            indent = m["indent"]
            # the exercise's name: the nearest def above, less indented than the marker
            name = next((d["name"] for prev in reversed(out) if (d := _DEF.match(prev))
                         and len(d["indent"]) < len(indent)), None)
            out += [f"{indent}# your code here",
                    f'{indent}raise NotImplementedError("exercise: {name or "fill in this part"}")']
        elif m:
            if not begin:
                raise ValueError(f"line {number}: '### END SOLUTION' without a '### BEGIN SOLUTION' before it")
            begin, regions = None, regions + 1
        elif not begin:
            out.append(line)
    if begin:
        raise ValueError(f"line {begin[0]}: '### BEGIN SOLUTION' without a matching '### END SOLUTION'")
    return "\n".join(out), regions


def student_edition(path: Path, out_dir: Path) -> tuple[Path, int]:
    """Write ``path``'s student edition to ``out_dir``: solutions stubbed, outputs cleared.
    Returns (written path, number of exercises)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    total = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            cell.source, n = strip_solutions(cell.source)
        except ValueError as e:
            first = cell.source.strip().split("\n")[0][:60]
            raise ValueError(f"{path.name}, cell {i} ({first!r}): {e}") from None
        total += n
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)  # nbclient's timestamps
    nb.metadata.pop("widgets", None)  # widget state belongs to the cleared outputs
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    nbformat.write(nb, out)
    return out, total


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m labutils.book")
    ap.add_argument("command", choices=["run", "headlines", "student"])
    ap.add_argument("--only", default="", help="comma-separated notebook prefixes, e.g. 00,01")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    ap.add_argument("--deadline", type=int, default=0,
                    help="seconds for the whole run (0: none); a cell still running then is stopped and the "
                         "partial notebook written to build/notebooks/")
    ap.add_argument("--out", type=Path, default=STUDENT, help="student: where to write (default build/student)")
    args = ap.parse_args(argv)
    only = [o for o in args.only.split(",") if o]
    paths = notebooks(only)
    if not paths:
        sys.exit(f"no notebooks match {only!r} in {NOTEBOOKS}")
    if args.command == "student":
        for path in paths:
            out, n = student_edition(path, args.out)
            print(f"{_shown(out)}: {n} exercise{'' if n == 1 else 's'} stubbed, outputs cleared")
        return
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    failed = []
    deadline = time.time() + args.deadline if args.deadline else None
    if args.command == "run":
        print(runtime.describe())
        for path in paths:
            print(f"running {path.name} ...", flush=True)
            ok, out, seconds = execute(path, args.timeout, deadline)
            print(f"  {'ok' if ok else 'FAILED'} in {seconds:.0f} s -> {out.relative_to(REPO)}", flush=True)
            if not ok:
                failed.append(path.name)
    print()
    print(headlines([p.stem for p in paths]))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
