"""Exercises with automatic checks, and "predict first" cells.

The reader writes a function where the chapter needs it; the next cell checks it:

    def expected_tokens(a, k):
        ### BEGIN SOLUTION
        return k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)
        ### END SOLUTION

    check("expected_tokens", expected_tokens)   # ✓ expected_tokens: passed on 9 cases

``check`` runs the function against the reference on seeded random and awkward cases and prints
one line on success, or the first failing case (its inputs, what differs, the exercise's hint).
``python -m labutils.book student`` replaces each solution region with a stub (see labutils/book.py).

An exercise is a generator of cases, registered with its reference and a hint:

    @exercise("name", reference=_ref, hint="...")
    def _cases(g):                       # g: a seeded torch.Generator
        yield case("awkward: ...", x, y)  # label, then the arguments of fn and of the reference

The expected value is ``reference(*args)``, compared with a tolerance set by its type: exact for
bool, int and lists, relative 1e-6 for floats, by dtype for tensors (see ``TOLERANCE``).

Each chapter's exercises live in their own module, ``labutils/exercises/chNN.py`` (NN: the
notebook's number), imported here when this package is: adding a chapter adds a file, nothing else.
"""
from __future__ import annotations

import copy
import inspect
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

# (rtol, atol) by dtype of the expected tensor; the looser of got's and expected's dtype applies.
TOLERANCE = {torch.float64: (1e-7, 1e-10), torch.float32: (1e-5, 1e-6),
             torch.float16: (1e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}
FLOAT_RTOL, FLOAT_ATOL = 1e-6, 1e-9


@dataclass
class Case:
    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


def case(label: str, *args, **kwargs) -> Case:
    return Case(label, args, kwargs)


@dataclass
class Exercise:
    name: str
    reference: Callable
    cases: Callable[[torch.Generator], Iterator[Case]]
    hint: str


EXERCISES: dict[str, Exercise] = {}


def exercise(name: str, *, reference: Callable, hint: str):
    """Register the decorated case generator as exercise ``name``."""
    def register(cases):
        EXERCISES[name] = Exercise(name, reference, cases, hint)
        return cases
    return register


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; known: {', '.join(sorted(EXERCISES))}")
    return EXERCISES[name]


# ---- describing values and differences -------------------------------------------------------------------------------
def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return repr(x)


def describe(x) -> str:
    """A short description of an argument or a result: a tensor's shape and dtype (and its values
    when small), a long list's length and ends."""
    if isinstance(x, torch.Tensor):
        head = f"Tensor{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        if x.numel() <= 8:
            vals = ", ".join(_fmt(v) for v in x.flatten().tolist())
            return f"{head} [{vals}]"
        return head
    if isinstance(x, (list, tuple)) and len(x) > 12:
        return f"{type(x).__name__} of {len(x)}: [{', '.join(map(_fmt, x[:4]))}, ..., {', '.join(map(_fmt, x[-6:]))}]"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(map(_fmt, x)) + "]" if isinstance(x, list) else repr(x)
    return _fmt(x)


def _describe_call(c: Case, reference: Callable) -> str:
    """'p=Tensor(8,) float32 [...], token=3': arguments named as in the reference's signature."""
    try:
        names = list(inspect.signature(reference).parameters)
    except (TypeError, ValueError):
        names = []
    parts = [f"{n}={describe(a)}" if n else describe(a)
             for n, a in zip(names + [""] * len(c.args), c.args)]
    return ", ".join(parts + [f"{k}={describe(v)}" for k, v in c.kwargs.items()])


def _scalar(x):
    """A 0-d/1-element tensor or numpy scalar as a Python number/bool; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        return x.item()
    return x


def compare(got, expected) -> str | None:
    """None if ``got`` matches ``expected``, else what differs (one short sentence)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor {describe(expected)}, got {type(got).__name__} {describe(got)}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"shape mismatch: got {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if not (got.dtype.is_floating_point or got.dtype == expected.dtype):
            return f"got dtype {got.dtype}, expected a floating-point tensor ({expected.dtype})"
        rtol, atol = max(TOLERANCE.get(got.dtype, (0, 0)), TOLERANCE.get(expected.dtype, (0, 0)))
        g, e = got.detach().cpu().double(), expected.detach().cpu().double()
        bad = ~torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=False)
        if bad.any():
            flat = int(bad.flatten().nonzero()[0])
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape)) if bad.dim() else ()
            where = f"[{', '.join(map(str, idx))}]" if idx else ""
            return (f"{int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); first at "
                    f"{where or 'the value'}: got {g.flatten()[flat].item():.6g}, expected {e.flatten()[flat].item():.6g}")
        return None
    got = _scalar(got)
    if isinstance(expected, bool):
        if not isinstance(got, bool):
            return f"expected a bool, got {type(got).__name__} {describe(got)}"
        return None if got == expected else f"got {got}, expected {expected}"
    if isinstance(expected, (list, tuple)):
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)):
            return f"expected a list, got {type(got).__name__} {describe(got)}"
        got = [_scalar(v) for v in got]
        if len(got) != len(expected):
            return f"length mismatch: got {len(got)} items {describe(list(got))}, expected {len(expected)} {describe(list(expected))}"
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                return f"first wrong item at [{i}]: got {a!r}, expected {b!r} (got {describe(list(got))}, expected {describe(list(expected))})"
        return None
    if isinstance(expected, (int, float)):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return f"expected a number, got {type(got).__name__} {describe(got)}"
        if math.isnan(got) or not math.isclose(got, expected, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL):
            return f"got {got:.8g}, expected {expected:.8g}"
        return None
    return None if got == expected else f"got {describe(got)}, expected {describe(expected)}"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _where_raised(e: BaseException, fn: Callable) -> str:
    """' (line N: <source>)' of the innermost frame in the reader's own code, where it raised."""
    code = getattr(fn, "__code__", None)
    frames = [f for f in traceback.extract_tb(e.__traceback__)[1:]
              if code is None or f.filename == code.co_filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (line {f.lineno}: {f.line.strip()})" if f.line else f" (line {f.lineno})"


# ---- the two calls a notebook makes -----------------------------------------------------------------------------------
class Outcome:
    """What ``check`` returns: true when the function passed. A notebook shows nothing for it (the
    printed line says it all), so a check cell does not end in a stray ``True``."""

    def __init__(self, passed: bool):
        self.passed = bool(passed)

    def __bool__(self):
        return self.passed

    def __eq__(self, other):
        return self.passed == bool(other)

    __hash__ = None

    def __repr__(self):
        return f"<check {'passed' if self.passed else 'failed'}>"

    def _ipython_display_(self):
        pass


class Line(str):
    """What ``predict`` returns: the printed line, not displayed a second time in a notebook."""

    def _ipython_display_(self):
        pass


def check(name: str, fn: Callable, seed: int = 0) -> Outcome:
    """Run ``fn`` on exercise ``name``'s cases against its reference; print one line (✓) on success,
    or the first failing case and the hint. Never raises for a fault in ``fn``. Returns an ``Outcome``
    (true on success)."""
    ex = get(name)
    g = torch.Generator().manual_seed(seed)
    cases = list(ex.cases(g))
    failures = []
    for i, c in enumerate(cases):
        expected = ex.reference(*copy.deepcopy(c.args), **copy.deepcopy(c.kwargs))
        args, kwargs = copy.deepcopy(c.args), copy.deepcopy(c.kwargs)
        try:
            got = fn(*args, **kwargs)
        except NotImplementedError as e:
            print(f"✗ {name}: not written yet ({e or 'NotImplementedError'}); fill in the function and run this cell again"
                  f"\n  hint: {ex.hint}")
            return Outcome(False)
        except Exception as e:  # the reader's bug: report it, no traceback
            failures.append((i, c, f"raised {type(e).__name__}: {str(e)[:200]}{_where_raised(e, fn)}"))
            continue
        problem = compare(got, expected)
        if problem is None and not all(_same(a, b) for a, b in zip(args + tuple(kwargs.values()),
                                                                      c.args + tuple(c.kwargs.values()))):
            problem = "the result is right, but the function changed its inputs in place (work on a copy)"
        if problem is not None:
            failures.append((i, c, problem))
    if not failures:
        print(f"✓ {name}: passed on {len(cases)} cases")
        return Outcome(True)
    i, c, problem = failures[0]
    print(f"✗ {name}: failed {len(failures)} of {len(cases)} cases; the first is case {i + 1} ({c.label})\n"
          f"  inputs: {_describe_call(c, ex.reference)}\n"
          f"  {problem}\n"
          f"  hint: {ex.hint}")
    return Outcome(False)


def predict(name: str, predicted: float | None, measured: float, unit: str = "") -> Line:
    """A "predict first" cell: how far ``predicted`` was from ``measured``. Prints and returns the line."""
    u = unit if unit in ("", "x", "%") else f" {unit}"
    if predicted is None:
        line = (f"✎ {name}: no prediction entered. Write yours down before reading the measurement, set it "
                f"in the prediction cell and run this one again to see how far off it was")
    elif measured == 0:
        line = f"{name}: predicted {predicted:.4g}{u}, measured 0{u}" + ("" if predicted == 0 else ": no ratio to a zero")
    else:
        ratio = predicted / measured
        off = ratio - 1
        verdict = ("spot on" if abs(off) <= 0.1 else "the right size" if 0.5 <= ratio <= 2
                   else f"off by {max(ratio, 1 / ratio):.1f}x: worth finding out why" if ratio > 0
                   else "the wrong sign")
        line = (f"{name}: predicted {predicted:.4g}{u}, measured {measured:.4g}{u}: prediction / measured = {ratio:.2f} "
                f"({abs(off):.0%} {'high' if off > 0 else 'low'}), {verdict}")
    print(line)
    return Line(line)


# ---- every chapter's exercises (labutils/exercises/ch*.py) -----------------------------------------------------------
def _import_chapters():
    import importlib
    import pkgutil

    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("ch")):
        importlib.import_module(f"{__name__}.{mod}")


_import_chapters()
