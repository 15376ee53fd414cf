"""Notebook 24's checkers: right answers pass, typical mistakes fail with the reason, None is
"not attempted", and a crashing answer is reported, not raised."""

from __future__ import annotations

import pytest
import torch

from course_utils import exercises as ex


def _crash(*args):
    raise RuntimeError("oops")


def _not_yet(*args):
    raise NotImplementedError


def _intensity(m, n, k, b, factor=2, out=True, per_byte=True):
    flops = factor * m * n * k
    elements = m * k + k * n + (m * n if out else 0)
    return flops / (elements * (b if per_byte else 1))


def _step(m, l, block, rescale=True):
    m_new = torch.maximum(m, block.max())
    old = l * torch.exp(m - m_new) if rescale else l
    return m_new, old + torch.exp(block - m_new).sum()


def _step_upside_down(m, l, block):
    m_new = torch.maximum(m, block.max())
    return m_new, l * torch.exp(m_new - m) + torch.exp(block - m_new).sum()


@pytest.mark.parametrize(
    "checker, right, wrongs",
    [
        (
            ex.check_matmul_intensity,
            _intensity,
            [
                (lambda m, n, k, b: _intensity(m, n, k, b, factor=1), "2 FLOPs"),
                (lambda m, n, k, b: _intensity(m, n, k, b, out=False), "writing C"),
                (lambda m, n, k, b: _intensity(m, n, k, b, per_byte=False), "dtype_bytes"),
                (lambda m, n, k, b: 2 * m * n * k, "FLOP count"),
                (lambda m, n, k, b: "high", "a number"),
                (lambda m, n, k, b: _intensity(m, n, k, b) + 1, "expected"),
            ],
        ),
        (
            ex.check_attainable_flops,
            lambda i, p, b: min(p, i * b),
            [
                (lambda i, p, b: max(p, i * b), "minimum"),
                (lambda i, p, b: min(p, i / b), "units"),
                (lambda i, p, b: i * b, "compute peak"),
                (lambda i, p, b: float("inf"), "finite"),
                (lambda i, p, b: p, "minimum"),
                (lambda i, p, b: 2 * min(p, i * b), "expected"),
            ],
        ),
        (
            ex.check_online_softmax_step,
            _step,
            [
                (lambda m, l, b: _step(m, l, b, rescale=False), "exp(m - m_new)"),
                (
                    lambda m, l, b: (torch.maximum(m, b.max()), l + torch.exp(b).sum()),
                    "sum(exp(x - max))",
                ),
                (lambda m, l, b: (m, l), "stream's max"),
                (lambda m, l, b: _step_upside_down(m, l, b), "not finite"),
                (lambda m, l, b: m, "tuple"),
            ],
        ),
    ],
)
def test_checker(checker, right, wrongs):
    fb = checker(right)
    assert fb.correct and fb.attempted, fb.message
    for wrong, reason in wrongs:
        fb = checker(wrong)
        assert not fb.correct and fb.attempted, (wrong, fb.message)
        assert reason in fb.message, fb.message
    for unattempted in (None, _not_yet):
        fb = checker(unattempted)
        assert not fb.correct and not fb.attempted
    fb = checker(_crash)
    assert not fb.correct and "RuntimeError" in fb.message and "oops" in fb.message
    assert str(fb).startswith("❌")


def test_checkers_are_exported():
    for name in ("check_matmul_intensity", "check_attainable_flops", "check_online_softmax_step"):
        assert name in ex.__dict__
