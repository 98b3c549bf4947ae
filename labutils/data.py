"""The book's text data (data/README.md gives provenance): held-out evaluation and calibration text."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
FILES = {"eval": "eb1911-shakespeare.txt", "calibration": "milton-areopagitica.txt"}


def load_text(which: str) -> str:
    """'eval' (held-out, for perplexity) or 'calibration' (for activation-aware quantization)."""
    if which not in FILES:
        raise ValueError(f"which must be one of {list(FILES)}, got {which!r}")
    return (DATA / FILES[which]).read_text(encoding="utf-8")
