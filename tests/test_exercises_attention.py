"""The attention track's exercise checkers: right answers pass, typical mistakes fail with a
message that says why, None is "not attempted", and a crashing answer is reported, not raised."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils import exercises as ex


def _crash(*args):
    raise RuntimeError("oops")


def _split_right(x, h):
    b, t, d = x.shape
    return x.view(b, t, h, d // h).transpose(1, 2)


def _merge_right(y):
    b, h, t, hd = y.shape
    return y.transpose(1, 2).reshape(b, t, h * hd)


def _causal_softmax_right(s):
    allowed = torch.ones_like(s, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)


def _causal_softmax_after(s):
    # the usual mistake: zero the future after the softmax and forget to renormalise
    return torch.softmax(s, dim=-1) * torch.ones_like(s).tril()


def _causal_softmax_zero(s):
    allowed = torch.ones_like(s, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~allowed, 0.0), dim=-1)


CASES = [
    (
        ex.check_attention_weights,
        lambda q, k: torch.softmax(k @ q, -1),
        lambda q, k: k @ q,
        "raw scores",
    ),
    (
        ex.check_attention_weights,
        lambda q, k: torch.softmax(k @ q, -1),
        lambda q, k: (k @ q) / (k @ q).sum(),
        "negative weight",
    ),
    (
        ex.check_context_vectors,
        lambda x: torch.softmax(x @ x.T, -1) @ x,
        lambda x: torch.softmax(x @ x.T, 0) @ x,
        "dim=0",
    ),
    (
        ex.check_scaled_attention,
        lambda q, k, v: torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), -1) @ v,
        lambda q, k, v: torch.softmax(q @ k.T / q.shape[-1], -1) @ v,
        "divided by d",
    ),
    (
        ex.check_scaled_attention,
        lambda q, k, v: torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), -1) @ v,
        lambda q, k, v: torch.softmax(q @ k.T, -1) @ v,
        "forgot the scale",
    ),
    (
        ex.check_causal_mask,
        lambda t: torch.ones(t, t, dtype=torch.bool).tril(),
        lambda t: torch.ones(t, t, dtype=torch.bool).triu(),
        "upper triangle",
    ),
    (
        ex.check_causal_mask,
        lambda t: torch.ones(t, t, dtype=torch.bool).tril(),
        lambda t: torch.ones(t, t, dtype=torch.bool).tril(-1),
        "diagonal",
    ),
    (
        ex.check_causal_mask,
        lambda t: torch.ones(t, t, dtype=torch.bool).tril(),
        lambda t: torch.ones(t, t).tril(),
        "dtype",
    ),
    (ex.check_causal_softmax, _causal_softmax_right, _causal_softmax_after, "renormalising"),
    (ex.check_causal_softmax, _causal_softmax_right, _causal_softmax_zero, "exp(0) = 1"),
    (
        ex.check_split_heads,
        _split_right,
        lambda x, h: x.reshape(x.shape[0], h, x.shape[1], x.shape[2] // h),
        "swap t and h",
    ),
    (
        ex.check_merge_heads,
        _merge_right,
        lambda y: y.reshape(y.shape[0], y.shape[2], -1),
        "skipped the transpose",
    ),
]


@pytest.mark.parametrize(
    "checker, right, wrong, reason", CASES, ids=[f"{c[0].__name__}-{c[3]}" for c in CASES]
)
def test_function_checkers(checker, right, wrong, reason):
    verdict = checker(right)
    assert verdict and verdict.correct, verdict
    verdict = checker(wrong)
    assert not verdict and verdict.attempted and reason in verdict.message, verdict
    assert not checker(None) and not checker(None).attempted

    def not_written(*args):
        raise NotImplementedError

    assert not checker(not_written).attempted
    crashed = checker(_crash)
    assert not crashed and crashed.attempted and "RuntimeError" in crashed.message


def test_split_heads_rejects_interleaved_features():
    def interleaved(x, h):
        b, t, d = x.shape
        return x.view(b, t, d // h, h).permute(0, 3, 1, 2)

    verdict = ex.check_split_heads(interleaved)
    assert not verdict and "contiguous block" in verdict.message


def test_wrong_shapes_and_types_are_explained():
    assert "shape" in ex.check_context_vectors(lambda x: x[:, :2]).message
    assert "torch.Tensor" in ex.check_causal_mask(lambda t: [[True]]).message
    flat = ex.check_merge_heads(lambda y: y.reshape(y.shape[0], -1, y.shape[-1]))
    assert not flat and "returned shape" in flat.message


def test_dot_product_std_checker():
    assert ex.check_dot_product_std(8)
    assert ex.check_dot_product_std(math.sqrt(64.0))
    assert "variance" in ex.check_dot_product_std(64).message
    assert not ex.check_dot_product_std(1.0)
    assert not ex.check_dot_product_std(7)
    assert "number" in ex.check_dot_product_std("eight").message
    assert str(ex.check_dot_product_std(None)).startswith("… not attempted")
