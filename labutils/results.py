"""Each notebook's key numbers, with the machine they came from: results/<notebook-stem>.json.

Committed results come from a full GPU run. A smoke run (CPU, CI) writes to build/results/, which
git ignores, so it can never overwrite them. ``$LAB_RESULTS_DIR`` overrides both.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from . import runtime
from .bench import env_record

REPO = Path(__file__).resolve().parent.parent


def results_dir(smoke: bool | None = None) -> Path:
    if os.environ.get("LAB_RESULTS_DIR"):
        return Path(os.environ["LAB_RESULTS_DIR"])
    smoke = runtime.smoke() if smoke is None else smoke
    return REPO / ("build/results" if smoke else "results")


def _plain(x):
    """numpy / torch scalars to plain Python for JSON."""
    if hasattr(x, "tolist"):  # arrays become lists, 0-d arrays and scalars plain numbers
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in a results file")


def save_results(notebook: str, metrics: dict, dtype=None, **extra) -> Path:
    """Write {"notebook", "device", "smoke", "created", "versions", "dtype", "metrics", ...}."""
    env = env_record(dtype)
    record = {"notebook": notebook, "device": env["device"], "smoke": env["smoke"],
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": env["versions"], "dtype": env["dtype"], "metrics": metrics, **extra}
    path = results_dir(env["smoke"]) / f"{notebook}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    return path


def load_results(notebook: str, smoke: bool | None = None) -> dict | None:
    path = results_dir(smoke) / f"{notebook}.json"
    return json.loads(path.read_text()) if path.is_file() else None
