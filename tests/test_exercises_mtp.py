"""The notebook 19 checkers: a right answer passes, typical mistakes get an explanation,
None reads as not attempted, and a crash becomes feedback instead of an exception."""

from __future__ import annotations

from course_utils.exercises import check_depth_targets, check_tokens_per_forward


def _crash(*args):
    raise RuntimeError("boom")


def test_depth_targets_right():
    fb = check_depth_targets(lambda seq, k: seq[k + 1 :])
    assert fb.correct and fb.attempted


def test_depth_targets_off_by_one_is_explained():
    fb = check_depth_targets(lambda seq, k: seq[k:])
    assert not fb.correct and "main head" in fb.message


def test_depth_targets_wrong_values():
    fb = check_depth_targets(lambda seq, k: seq[: seq.numel() - k - 1])
    assert not fb.correct and "x[i+k+1]" in fb.message


def test_depth_targets_none_and_crash():
    assert not check_depth_targets(None).attempted
    fb = check_depth_targets(_crash)
    assert not fb.correct and fb.attempted and "RuntimeError" in fb.message


def test_tokens_per_forward_right():
    fb = check_tokens_per_forward(lambda a: (1 + len(a) + sum(a)) / (1 + len(a)))
    assert fb.correct


def test_tokens_per_forward_forgetting_prefill_is_explained():
    fb = check_tokens_per_forward(lambda a: 1 + sum(a) / len(a) if a else 1.0)
    assert not fb.correct and "prefill" in fb.message


def test_tokens_per_forward_none_and_crash_and_non_number():
    assert not check_tokens_per_forward(None).attempted
    fb = check_tokens_per_forward(_crash)
    assert not fb.correct and "RuntimeError" in fb.message
    assert not check_tokens_per_forward(lambda a: "two").correct
