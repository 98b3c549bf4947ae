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


# ---- prompts for speculative decoding (notebook 05) -----------------------------------------------------
def _code_snippets() -> list[str]:
    """Small functions of this package, as code for the reader's model to edit."""
    import inspect

    from . import attention, kv_cache, speculative

    return [inspect.getsource(f) for f in (attention.repeat_kv, kv_cache.ConcatKVCache.update,
                                           speculative.expected_tokens, attention.causal_mask)]


TASKS = ("continuation", "passage QA", "code editing")


def speculative_tasks(tokenizer, per_task: int = 3, seed: int = 0, device=None) -> dict[str, list]:
    """Prompts (token ids (1, T)) for three tasks that differ in how much of the output the input
    already holds: ``continuation`` of a span of the eval text (raw text, no chat template);
    ``passage QA``: a passage of it and a question to answer from it (chat); ``code editing``: a
    function to return edited (chat). Spans start at seeded offsets."""
    from .generate import encode_prompt

    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    text = load_text("eval")
    rng = __import__("random").Random(seed)

    def span(n_chars):
        start = rng.randrange(0, len(text) - n_chars)
        start = text.find(" ", start) + 1
        return text[start : start + n_chars].rsplit(" ", 1)[0]

    questions = ["Which people and places does it name? Answer with the sentences that name them.",
                 "Summarize it in three sentences, quoting its own words where you can.",
                 "List its facts as short bullet points, in its own words."]
    edits = ["Rename the variables to longer, descriptive names and return the whole function.",
             "Add type hints and a one-line docstring; return the whole function.",
             "Add a comment above every line explaining it; return the whole function."]
    code = _code_snippets()
    out = {t: [] for t in TASKS}
    for i in range(per_task):
        out["continuation"].append(encode_prompt(tokenizer, span(900), chat=False, device=device))
        out["passage QA"].append(encode_prompt(
            tokenizer, f"Read this passage.\n\n{span(1200)}\n\n{questions[i % len(questions)]}", device=device))
        out["code editing"].append(encode_prompt(
            tokenizer, f"```python\n{code[i % len(code)]}```\n\n{edits[i % len(edits)]}", device=device))
    return out
