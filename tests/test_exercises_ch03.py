"""Notebook 03's exercises: plausible wrong answers fail, naming the case that shows the mistake.

The Triton exercise runs in Triton's interpreter on the CPU (labutils sets TRITON_INTERPRET=1 when
there is no GPU), on tensors of a few dozen rows, so each check takes seconds."""
from __future__ import annotations

import math

import pytest
import torch

import labutils  # noqa: F401  (first: chooses Triton's interpreter before any kernel is defined)
import triton
import triton.language as tl
from labutils.exercises import EXERCISES, check
from conftest import assert_fails_naming_the_case


def test_notebook_03_exercises_are_registered():
    assert {"flash_io_bytes", "softmax_merge", "flash_inner_loop"} <= set(EXERCISES)


# ---- flash_io_bytes ------------------------------------------------------------------------------------------
def _floor_blocks(N, d, block_m, dtype_bytes):
    return dtype_bytes * (2 * N * d + 2 * N * d * (N // block_m))


def _kv_once(N, d, block_m, dtype_bytes):
    return dtype_bytes * 4 * N * d


def _k_only_reread(N, d, block_m, dtype_bytes):
    return dtype_bytes * (3 * N * d + N * d * -(-N // block_m))


# ---- softmax_merge -------------------------------------------------------------------------------------------
def _no_rescale(m1, l1, acc1, m2, l2, acc2):
    return (acc1 + acc2) / (l1 + l2)[:, None]


def _rescale_sum_only(m1, l1, acc1, m2, l2, acc2):
    m = torch.maximum(m1, m2)
    l = torch.exp(m1 - m) * l1 + torch.exp(m2 - m) * l2
    return (acc1 + acc2) / l[:, None]


def _no_max(m1, l1, acc1, m2, l2, acc2):  # back to absolute exponentials: exp(200) overflows
    w1, w2 = torch.exp(m1), torch.exp(m2)
    return (w1[:, None] * acc1 + w2[:, None] * acc2) / (w1 * l1 + w2 * l2)[:, None]


# ---- flash_inner_loop: a harness and wrong kernels -------------------------------------------------------------
def _launch(kernel):
    def run(q, k, v):
        H, N, D = q.shape
        q, k, v = (t.contiguous() for t in (q, k, v))
        o = torch.empty_like(q)
        kernel[(triton.cdiv(N, 16), H)](q, k, v, o, N, 1 / math.sqrt(D), D=D, BLOCK_M=16, BLOCK_N=16)
        return o
    return run


@triton.jit
def _zero_for_missing_keys(Q, K, V, O, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys past N load as 0 and are left in the softmax with score 0 (no -inf)."""
    head, block = tl.program_id(1), tl.program_id(0)
    base = head * N * D
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        off = base + cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + off, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        v = tl.load(V + off, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=offs_m[:, None] < N)


@triton.jit
def _acc_not_rescaled(Q, K, V, O, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The running sum is rescaled when the max moves, the accumulator is not."""
    head, block = tl.program_id(1), tl.program_id(0)
    base = head * N * D
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        off = base + cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + off, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        v = tl.load(V + off, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 1)
        acc = acc + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=offs_m[:, None] < N)


@triton.jit
def _no_running_max(Q, K, V, O, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Plain exp(s): right for small scores, inf / inf = nan once a score passes ~88."""
    head, block = tl.program_id(1), tl.program_id(0)
    base = head * N * D
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        off = base + cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + off, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        v = tl.load(V + off, mask=cols[:, None] < N, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        p = tl.exp(s)
        l_i = l_i + tl.sum(p, 1)
        acc = acc + tl.dot(p, v, input_precision="ieee")
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=offs_m[:, None] < N)


WRONG = [("flash_io_bytes", _floor_blocks, "the last block is ragged", "got 4096000, expected 4608000"),
         ("flash_io_bytes", _kv_once, "N = 4096, d = 128", "expected 69206016"),
         ("flash_io_bytes", _k_only_reread, "N = 4096, d = 128", "got"),
         ("softmax_merge", _no_rescale, "the max moves", "elements differ"),
         ("softmax_merge", _rescale_sum_only, "the max moves", "elements differ"),
         ("softmax_merge", _no_max, "exp overflows without the max", "got nan"),
         ("flash_inner_loop", _launch(_zero_for_missing_keys), "N = 1: a single key", "16 of 16 elements differ"),
         ("flash_inner_loop", _launch(_acc_not_rescaled), "three key blocks", "elements differ"),
         ("flash_inner_loop", _launch(_no_running_max), "overflows without the running max", "got nan")]


@pytest.mark.parametrize("name, fn, label, detail", WRONG,
                         ids=[f"{w[0]}-{getattr(w[1], '__name__', i)}" for i, w in enumerate(WRONG)])
def test_wrong_answer_fails_naming_the_case(name, fn, label, detail, capsys):
    assert_fails_naming_the_case(name, fn, label, detail, capsys)


def test_merge_reference_matches_softmax_over_the_whole_row():
    g = torch.Generator().manual_seed(1)
    s, v = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    from labutils.exercises.ch03 import _state, ref_softmax_merge
    out = ref_softmax_merge(*_state(s[:, :20], v[:20]), *_state(s[:, 20:], v[20:]))
    torch.testing.assert_close(out, torch.softmax(s, 1) @ v)


def test_io_bytes_reference_is_the_package_model_when_kv_is_read_once():
    from labutils.exercises.ch03 import ref_flash_io_bytes
    from labutils.flash_attention import flash_attention_bytes
    assert ref_flash_io_bytes(100, 64, 128, 2) == flash_attention_bytes(1, 1, 100, 64, 2)  # one query block
    assert ref_flash_io_bytes(4096, 128, 128, 2) == flash_attention_bytes(1, 1, 4096, 128, 2) * (1 + 32) // 2
