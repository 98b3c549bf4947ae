"""Notebook 00's exercises: plausible wrong answers fail, naming the case that catches them."""
from __future__ import annotations

import pytest

from labutils import configs, roofline
from labutils.exercises import EXERCISES
from conftest import assert_fails_naming_the_case


def test_notebook_00_exercises_are_registered():
    assert {"roofline_bound", "matmul_intensity", "decode_knee"} <= set(EXERCISES)


def _max_not_min(intensity, peak_tflops, bw_gbps):
    return max(peak_tflops, bw_gbps * intensity / 1e3)


def _units_off(intensity, peak_tflops, bw_gbps):  # GB/s x FLOP/B taken as TFLOP/s
    return min(peak_tflops, bw_gbps * intensity)


def _bandwidth_only(intensity, peak_tflops, bw_gbps):
    return bw_gbps * intensity / 1e3


def _weights_only(B, d_in, d_out, dtype_bytes=2):  # counts only the weight bytes
    return 2 * B * d_in * d_out / (d_in * d_out * dtype_bytes)


def _one_flop_per_weight(B, d_in, d_out, dtype_bytes=2):
    return B * d_in * d_out / ((B * d_in + d_in * d_out + B * d_out) * dtype_bytes)


def _no_output(B, d_in, d_out, dtype_bytes=2):
    return 2 * B * d_in * d_out / ((B * d_in + d_in * d_out) * dtype_bytes)


def _strictly_greater(model, context, peak_tflops, bw_gbps, dtype_bytes=2, max_batch=4096):
    cfg = configs.ARCHITECTURES[model]
    for b in range(1, max_batch + 1):
        step = roofline.decode_step(cfg, b, context, dtype_bytes)
        if step["flops"] / (peak_tflops * 1e12) > step["bytes"] / (bw_gbps * 1e9):
            return b
    return None


def _knee_at_the_ridge(model, context, peak_tflops, bw_gbps, dtype_bytes=2, max_batch=4096):
    """"the knee sits at B = ridge point": ignores the KV-cache reads."""
    b = round(roofline.ridge_point(peak_tflops, bw_gbps))
    return max(b, 1) if b <= max_batch else None


def _ignores_max_batch(model, context, peak_tflops, bw_gbps, dtype_bytes=2, max_batch=4096):
    return _strictly_greater(model, context, peak_tflops, bw_gbps, dtype_bytes, 1 << 20) and \
        EXERCISES["decode_knee"].reference(model, context, peak_tflops, bw_gbps, dtype_bytes, 1 << 20)


def _bf16_always(model, context, peak_tflops, bw_gbps, dtype_bytes=2, max_batch=4096):
    return EXERCISES["decode_knee"].reference(model, context, peak_tflops, bw_gbps, 2, max_batch)


WRONG = [("roofline_bound", _max_not_min, "decode at batch 1", "got 989, expected 3.35"),
         ("roofline_bound", _units_off, "decode at batch 1", "got 989, expected 3.35"),
         ("roofline_bound", _bandwidth_only, "far above the ridge", "expected 989"),
         ("matmul_intensity", _weights_only, "decode, batch 1", "got 1, expected 0.99951"),
         ("matmul_intensity", _one_flop_per_weight, "decode, batch 1", "expected 0.99951"),
         ("matmul_intensity", _no_output, "decode, batch 1", "got 0.99975592, expected 0.99951196"),
         ("decode_knee", _knee_at_the_ridge, "no context", "got 295, expected 296"),
         ("decode_knee", _ignores_max_batch, "max_batch too small", "expected None"),
         ("decode_knee", _bf16_always, "fp32 weights and cache", "expected 903")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


def test_strict_comparison_differs_only_at_exact_ties():
    """'>' instead of '>=' agrees with the reference unless compute and memory time tie exactly; the
    case with a ridge below 1 FLOP/B checks the batch-1 end, where both must answer 1."""
    ref = EXERCISES["decode_knee"].reference
    assert _strictly_greater("SmolLM2-135M", 0, 0.005, 100.0) == ref("SmolLM2-135M", 0, 0.005, 100.0) == 1


def test_knee_exists_only_at_short_context_for_qwen_7b():
    """The correction in notebook 00: at context 1024 Qwen2.5-7B never turns compute-bound on an
    H100 sheet (its KV reads grow with the batch), while with no context the knee is near the ridge."""
    ref = EXERCISES["decode_knee"].reference
    ridge = roofline.ridge_point(989.0, 3350.0)
    assert abs(ref("Qwen2.5-7B", 0, 989.0, 3350.0) - ridge) / ridge < 0.05
    assert ref("Qwen2.5-7B", 1024, 989.0, 3350.0, max_batch=1 << 20) is None
