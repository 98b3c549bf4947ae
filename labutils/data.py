"""The book's text data (data/README.md gives provenance): held-out evaluation and calibration text,
and WikiText-2 where the `datasets` package and the hub (or its cache) are available."""
from __future__ import annotations

import os
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
FILES = {"eval": "eb1911-shakespeare.txt", "calibration": "milton-areopagitica.txt"}


def load_text(which: str) -> str:
    """'eval' (held-out, for perplexity) or 'calibration' (for activation-aware quantization)."""
    if which not in FILES:
        raise ValueError(f"which must be one of {list(FILES)}, got {which!r}")
    return (DATA / FILES[which]).read_text(encoding="utf-8")


class DataUnavailableError(RuntimeError):
    """A dataset that cannot be had on this machine (package missing, hub unreachable and not cached)."""


def load_wikitext2(split: str = "test") -> str:
    """WikiText-2 (raw) ``split`` as one text, through `datasets` (``pip install -e .[data]``), from the
    hub or its local cache. Offline and uncached it fails within seconds with DataUnavailableError;
    the book's offline evaluation text is ``load_text('eval')``."""
    try:
        import datasets
    except ImportError as e:
        raise DataUnavailableError("WikiText-2 needs the `datasets` package (pip install -e .[data]); "
                                   "the offline evaluation text is load_text('eval')") from e
    from .models import _hub_reachable

    if not _hub_reachable():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the cache only, no waiting on the network
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001  (offline and not cached, or a hub error: say so in one line)
        raise DataUnavailableError(f"WikiText-2 is not available here ({type(e).__name__}: {str(e)[:160]}); "
                                   "the offline evaluation text is load_text('eval')") from e
    return "\n\n".join(ds["text"])
