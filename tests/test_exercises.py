"""Exercise checks: each passes its reference and fails a stub and a plausible wrong answer, saying
which case failed and the hint; predict's line."""
from __future__ import annotations

import pytest
import torch

from labutils import exercises
from labutils.exercises import EXERCISES, check, compare, predict
from conftest import assert_fails_naming_the_case

NAMES = sorted(EXERCISES)


def test_notebook_05_exercises_are_registered():
    assert {"expected_tokens", "accept_rule", "residual", "ngram_propose"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes(name, capsys):
    assert check(name, EXERCISES[name].reference)
    out = capsys.readouterr().out
    n = len(list(EXERCISES[name].cases(torch.Generator().manual_seed(0))))
    assert out == f"✓ {name}: passed on {n} cases\n"
    assert n >= 5


@pytest.mark.parametrize("name", NAMES)
def test_stub_fails_with_the_hint(name, capsys):
    def stub(*args, **kwargs):
        # your code here
        raise NotImplementedError(f"exercise: {name}")

    assert not check(name, stub)
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: not written yet"), out
    assert EXERCISES[name].hint in out
    assert "Traceback" not in out


def _off_by_one(a, k):
    return float(k) if a == 1 else (1 - a ** k) / (1 - a)


def _inverted(p, q, token, u):
    return bool(u < min(1.0, (q[token] / p[token]).item()))


def _unnormalized(p, q):
    return (p - q).clamp(min=0)


def _q_minus_p(p, q):
    r = (q - p).clamp(min=0)
    return r / r.sum()


def _oldest_match(tokens, k, n):
    if n > len(tokens):
        return []
    suffix = tokens[-n:]
    for i in range(len(tokens) - n):
        if tokens[i:i + n] == suffix:
            return tokens[i + n:i + n + k]
    return []


def _includes_the_suffix(tokens, k, n):
    if n > len(tokens):
        return []
    suffix = tokens[-n:]
    for i in range(len(tokens) - n, -1, -1):
        if tokens[i:i + n] == suffix:
            return tokens[i + n:i + n + k]
    return []


WRONG = [("expected_tokens", _off_by_one, "a = 1: every draft accepted", "got 4, expected 5"),
         ("accept_rule", _inverted, "p[token] == 0", "got True, expected False"),
         ("residual", _unnormalized, "one-hot residual", "first at [2]"),
         ("residual", _q_minus_p, "one-hot residual", "expected 1"),
         ("ngram_propose", _oldest_match, "fewer than k follow", "length mismatch"),
         ("ngram_propose", _includes_the_suffix, "match at the very start", "got 0 items")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


def test_oldest_match_also_fails_on_several_matches(capsys):
    check("ngram_propose", _oldest_match)
    cases = list(EXERCISES["ngram_propose"].cases(torch.Generator().manual_seed(0)))
    several = next(c for c in cases if "most recent wins" in c.label)
    assert _oldest_match(*several.args) != EXERCISES["ngram_propose"].reference(*several.args)


def test_inputs_are_named_and_shown_briefly(capsys):
    check("accept_rule", _inverted)
    out = capsys.readouterr().out
    assert "p=Tensor(8,) float32 [" in out and "token=5" in out and "u=0" in out, out


def test_exception_in_the_readers_function_is_reported_not_raised(capsys):
    def crashes(tokens, k, n):
        return tokens[len(tokens)]

    assert not check("ngram_propose", crashes)
    out = capsys.readouterr().out
    assert "raised IndexError" in out and "return tokens[len(tokens)]" in out and "hint: " in out, out
    assert "Traceback" not in out


def test_changing_the_inputs_in_place_is_a_failure(capsys):
    def in_place(p, q):
        p -= q
        p.clamp_(min=0)
        return p / p.sum()

    assert not check("residual", in_place)
    assert "changed its inputs in place" in capsys.readouterr().out


def test_cases_are_seeded():
    a = [c.args for c in EXERCISES["residual"].cases(torch.Generator().manual_seed(3))]
    b = [c.args for c in EXERCISES["residual"].cases(torch.Generator().manual_seed(3))]
    assert all(torch.equal(x, y) for ca, cb in zip(a, b) for x, y in zip(ca, cb))


def test_unknown_exercise_lists_the_known_ones():
    with pytest.raises(KeyError, match="expected_tokens"):
        check("no_such_exercise", print)


def test_compare():
    e = torch.zeros(2, 3)
    assert compare(e.clone(), e) is None
    assert "shape mismatch: got (3, 2), expected (2, 3)" in compare(torch.zeros(3, 2), e)
    g = e.clone()
    g[1, 2] = 0.5
    assert "first at [1, 2]: got 0.5, expected 0" in compare(g, e)
    assert compare(e.half(), e) is None  # fp16 result of an fp32 reference: fp16's tolerance
    assert "expected a tensor" in compare([0.0] * 6, e)
    assert compare(torch.tensor(True), True) is None
    assert "expected a bool" in compare(1, True)
    assert compare(3, 3.0) is None and compare(3.0 + 1e-9, 3.0) is None
    assert "got 3.1, expected 3" in compare(3.1, 3.0)
    assert "first wrong item at [1]" in compare([1, 5, 3], [1, 2, 3])


def test_predict(capsys):
    line = predict("tokens per pass", 3.0, 2.5, "tok")
    assert capsys.readouterr().out == line + "\n"
    assert line.startswith("tokens per pass: predicted 3 tok, measured 2.5 tok")
    assert "prediction / measured = 1.20 (20% high)" in line
    assert "(50% low)" in predict("speed-up", 1.0, 2.0, "x") and "1x" in predict("speed-up", 1.0, 2.0, "x")
    assert "off by 4.0x" in predict("speed-up", 8.0, 2.0)
    nudge = predict("tokens per pass", None, 2.5)
    assert "no prediction entered" in nudge and "2.5" not in nudge


def test_check_and_predict_results_do_not_display_twice(capsys):
    """A check cell ends in check(...): its result is true/false for code, but a notebook shows only
    the printed line (no stray ``True``); predict's returned line is not shown a second time."""
    from IPython.core.formatters import DisplayFormatter

    ok = check("expected_tokens", EXERCISES["expected_tokens"].reference)
    bad = check("expected_tokens", lambda a, k: 0.0)
    line = predict("tokens per pass", 3.0, 2.5)
    assert ok and not bad and ok == True and bad == False  # noqa: E712
    assert isinstance(line, str) and line.startswith("tokens per pass")
    formatter = DisplayFormatter()  # what a notebook uses for a cell's last value
    assert formatter.format(ok) == ({}, {}) and formatter.format(line) == ({}, {})
    assert formatter.format(3.0)[0]["text/plain"] == "3.0"  # other values still show
