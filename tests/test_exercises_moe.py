"""Checkers of notebooks 16-18: a right answer passes, a typical wrong one fails and says why,
None is "not attempted", a crash is reported, never raised."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils import exercises as ex
from course_utils import moe


def _topk_right(logits, k):
    top, idx = logits.topk(k, dim=-1)
    return top.softmax(-1), idx


def _topk_wrong(logits, k):  # softmax over all experts, no renormalisation
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return w, idx


def _v3_right(scores, bias, k, n_group, topk_group, norm, scale):
    t, e = scores.shape
    biased = scores + bias
    gs = biased.view(t, n_group, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros(t, n_group, dtype=torch.bool).scatter_(
        1, gs.topk(topk_group, -1).indices, True
    )
    biased = biased.masked_fill(~keep.repeat_interleave(e // n_group, 1), float("-inf"))
    idx = biased.topk(k, -1).indices
    w = scores.gather(1, idx)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, idx


def _v3_wrong(scores, bias, k, n_group, topk_group, norm, scale):  # weights from biased scores
    w, idx = _v3_right(scores, bias, k, n_group, topk_group, norm, scale)
    bw = (scores + bias).gather(1, idx)
    if norm:
        bw = bw / bw.sum(-1, keepdim=True)
    return bw * scale, idx


def _dispatch_right(x, experts, indices, weights):
    return moe.dispatch_vectorized(x, experts, indices, weights)


def _dispatch_wrong(x, experts, indices, weights):
    return moe.dispatch_vectorized(x, experts, indices, torch.ones_like(weights))


def _bias_right(bias, counts, gamma):
    return bias + gamma * torch.sign(counts.mean() - counts)


def _bias_wrong(bias, counts, gamma):
    return bias - gamma * torch.sign(counts.mean() - counts)


def _seq_right(scores, indices):
    return moe.sequence_balance_loss(scores, indices)


def _seq_wrong(scores, indices):  # forgot to normalise the sigmoid scores
    b, s, e = scores.shape
    k = indices.shape[-1]
    counts = torch.zeros(b, e).scatter_add_(1, indices.reshape(b, -1), torch.ones(b, s * k))
    return ((counts * e / (k * s)) * scores.mean(1)).sum(-1).mean()


def _capacity_right(n, e, k, cf):
    return math.ceil(cf * n * k / e)


def _capacity_wrong(n, e, k, cf):
    return math.ceil(cf * n / e)


def _crash(*args):
    raise RuntimeError("boom")


def _todo(*args):
    raise NotImplementedError


CASES = [
    (ex.check_topk_softmax_router, _topk_right, _topk_wrong, "renormalise"),
    (ex.check_v3_routing, _v3_right, _v3_wrong, "unbiased"),
    (ex.check_moe_dispatch, _dispatch_right, _dispatch_wrong, "weights"),
    (ex.check_bias_update, _bias_right, _bias_wrong, "reversed"),
    (ex.check_sequence_balance_loss, _seq_right, _seq_wrong, "normalise"),
    (ex.check_expert_capacity, _capacity_right, _capacity_wrong, "multiply by k"),
]


@pytest.mark.parametrize("checker, right, wrong, reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_function_checkers(checker, right, wrong, reason):
    assert checker(right)
    bad = checker(wrong)
    assert not bad and bad.attempted and reason in bad.message, bad.message
    assert not checker(None).attempted
    assert not checker(_todo).attempted
    crashed = checker(_crash)
    assert not crashed and "RuntimeError" in crashed.message


def test_v3_routing_checker_catches_max_group_score():
    def max_groups(scores, bias, k, n_group, topk_group, norm, scale):
        t, e = scores.shape
        biased = scores + bias
        gs = biased.view(t, n_group, -1).amax(-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool).scatter_(
            1, gs.topk(topk_group, -1).indices, True
        )
        biased = biased.masked_fill(~keep.repeat_interleave(e // n_group, 1), float("-inf"))
        idx = biased.topk(k, -1).indices
        w = scores.gather(1, idx)
        if norm:
            w = w / w.sum(-1, keepdim=True)
        return w * scale, idx

    fb = ex.check_v3_routing(max_groups)
    assert not fb and "top-2" in fb.message


def test_active_parameter_checker():
    per = 3 * 7168 * 2048
    assert ex.check_v3_active_expert_parameters(9 * per)
    fb = ex.check_v3_active_expert_parameters(8 * per)
    assert not fb and "shared" in fb.message
    fb = ex.check_v3_active_expert_parameters(9 * 2 * 7168 * 2048)
    assert not fb and "three" in fb.message
    assert not ex.check_v3_active_expert_parameters(None).attempted
    assert not ex.check_v3_active_expert_parameters(12345)
