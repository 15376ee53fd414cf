"""Checkers of notebooks 22-23: a right answer passes, a typical wrong one fails and says why,
None is "not attempted", a crash is reported, never raised."""

from __future__ import annotations

import pytest
import torch

from course_utils import exercises as ex


def _adv_right(r, eps):
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)


def _adv_population(r, eps):
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)


def _adv_batch(r, eps):
    return (r - r.mean()) / (r.std() + eps)


def _adv_nan(r, eps):
    return (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)


def _k3_right(new, ref):
    d = ref - new
    return d.exp() - d - 1


def _k3_swapped(new, ref):
    d = new - ref
    return d.exp() - d - 1


def _k3_k1(new, ref):
    return new - ref


def _clip_right(ratio, adv, eps):
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def _clip_only(ratio, adv, eps):
    return ratio.clamp(1 - eps, 1 + eps) * adv


def _clip_max(ratio, adv, eps):
    return torch.maximum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def _merge_right(w, a, b, alpha, r):
    return w + (alpha / r) * b @ a


def _merge_unscaled(w, a, b, alpha, r):
    return w + b @ a


def _merge_inverse(w, a, b, alpha, r):
    return w + (r / alpha) * b @ a


def _kl_right(s, t, temp):
    log_p = (t / temp).log_softmax(-1)
    log_q = (s / temp).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temp**2


def _kl_no_t2(s, t, temp):
    return _kl_right(s, t, temp) / temp**2


def _kl_reverse(s, t, temp):
    return _kl_right(t, s, temp)


def _kl_unsoftened(s, t, temp):
    return _kl_right(s, t, 1.0) * temp**2


def _crash(*args):
    raise RuntimeError("boom")


def _todo(*args):
    raise NotImplementedError


def _gae_right(r, v, m, gamma, lam):
    adv = torch.zeros_like(r)
    for i in range(r.shape[0]):
        n, nxt = int(m[i].sum()), 0.0
        for t in range(n - 1, -1, -1):
            v_next = v[i, t + 1] if t + 1 < n else 0.0
            nxt = r[i, t] + gamma * v_next - v[i, t] + gamma * lam * nxt
            adv[i, t] = nxt
    return adv


def _gae_leaky(r, v, m, gamma, lam):
    return _gae_right(r, v, torch.ones_like(m), gamma, lam) * m


def _gae_no_lam(r, v, m, gamma, lam):
    return _gae_right(r, v, m, gamma, 1.0)


def _gae_td(r, v, m, gamma, lam):
    return _gae_right(r, v, m, gamma, 0.0)


def _signal_right(p, g):
    return 1 - (1 - p) ** g - p**g


def _signal_no_all_right(p, g):
    return 1 - (1 - p) ** g


def _signal_linear(p, g):
    return g * p


CASES = [
    (ex.check_group_advantages, _adv_right, _adv_population, "unbiased"),
    (ex.check_group_advantages, _adv_right, _adv_batch, "whole batch"),
    (ex.check_group_advantages, _adv_right, _adv_nan, "NaN"),
    (ex.check_k3_kl, _k3_right, _k3_swapped, "swapped"),
    (ex.check_k3_kl, _k3_right, _k3_k1, "negative"),
    (ex.check_clipped_objective, _clip_right, _clip_only, "min"),
    (ex.check_clipped_objective, _clip_right, _clip_max, "max instead of min"),
    (ex.check_gae, _gae_right, _gae_leaky, "leaked"),
    (ex.check_gae, _gae_right, _gae_no_lam, "left out lam"),
    (ex.check_gae, _gae_right, _gae_td, "one-step"),
    (ex.check_lora_merge, _merge_right, _merge_unscaled, "forgot the scale"),
    (ex.check_lora_merge, _merge_right, _merge_inverse, "alpha / r"),
    (ex.check_soft_kl, _kl_right, _kl_no_t2, "T**2"),
    (ex.check_soft_kl, _kl_right, _kl_reverse, "reverse"),
    (ex.check_soft_kl, _kl_right, _kl_unsoftened, "before the softmax"),
    (ex.check_group_signal, _signal_right, _signal_no_all_right, "all G samples are right"),
    (ex.check_group_signal, _signal_right, _signal_linear, "expected number"),
]


@pytest.mark.parametrize(
    "checker, right, wrong, reason", CASES, ids=[f"{c[0].__name__}-{c[2].__name__}" for c in CASES]
)
def test_function_checkers(checker, right, wrong, reason):
    assert checker(right), checker(right).message
    bad = checker(wrong)
    assert not bad and bad.attempted and reason in bad.message, bad.message
    assert not checker(None).attempted
    assert not checker(_todo).attempted
    crashed = checker(_crash)
    assert not crashed and "RuntimeError" in crashed.message


def test_wrong_shapes_and_types_are_explained():
    fb = ex.check_k3_kl(lambda new, ref: (ref - new).exp().sum())
    assert not fb and "shape" in fb.message
    fb = ex.check_lora_merge(lambda w, a, b, alpha, r: 3.0)
    assert not fb and "torch.Tensor" in fb.message
    fb = ex.check_clipped_objective(lambda ratio, adv, eps: ratio * adv * 2)
    assert not fb and "off by" in fb.message
