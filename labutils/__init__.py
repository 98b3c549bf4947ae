"""labutils: the finished pieces of the LLM inference lab book, imported by later notebooks.

``runtime`` is imported first: it switches Triton's interpreter on when there is no GPU, which
must happen before any Triton kernel is defined.
"""
from . import runtime  # noqa: F401  (must come first)
from .runtime import device, smoke, pick, default_dtype  # noqa: F401

__version__ = "0.1.0"
