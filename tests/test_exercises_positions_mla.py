"""Checkers of notebooks 10-15: a right answer, a typical wrong one (with why), None, a crash."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils import exercises as ex
from course_utils.positional import apply_rope


def _crash(*args):
    raise ZeroDivisionError("boom")


def _binary_msb_first(n, b):
    return ((torch.arange(n)[:, None] >> torch.arange(b)) & 1).float().flip(-1)


def _sin_wrong_exponent(n, d):
    pos, w = torch.arange(float(n))[:, None], 10000 ** (-torch.arange(d / 2) / d)
    pe = torch.empty(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * w), torch.cos(pos * w)
    return pe


def _sin_right(n, d):
    pos, w = torch.arange(float(n))[:, None], 10000 ** (-2 * torch.arange(d / 2) / d)
    pe = torch.empty(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * w), torch.cos(pos * w)
    return pe


def _rot(xy, a, sign=1):
    c, s = math.cos(a), sign * math.sin(a)
    return torch.stack([xy[0] * c - xy[1] * s, xy[0] * s + xy[1] * c])


def _half_right(x, cos, sin):
    d = x.shape[-1] // 2
    a, b = x[..., :d], x[..., d:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def _mscale(f, m):
    return 0.1 * m * math.log(f) + 1 if f > 1 else 1.0


CASES = [
    (
        ex.check_kv_bytes_per_token,
        lambda n, h, d, s: 2 * n * h * d * s,
        lambda n, h, d, s: n * h * d * s,
        "AND values",
    ),
    (
        ex.check_latent_cache_bytes,
        lambda n, r, dr, s: n * (r + dr) * s,
        lambda n, r, dr, s: n * r * s,
        "rotary key",
    ),
    (
        ex.check_absorbed_query,
        lambda q, w: q @ w,
        lambda q, w: torch.einsum("htd,gdr->htr", q, w),
        "summed over heads",
    ),
    (
        ex.check_absorbed_output,
        lambda c, w: c @ w.transpose(-1, -2),
        lambda c, w: (c @ w.transpose(-1, -2)) * 2,
        "off by",
    ),
    (
        ex.check_binary_encoding,
        lambda n, b: ((torch.arange(n)[:, None] >> torch.arange(b)) & 1).float(),
        _binary_msb_first,
        "most significant first",
    ),
    (ex.check_sinusoidal_encoding, _sin_right, _sin_wrong_exponent, "2i / dim"),
    (ex.check_rotate_pair, _rot, lambda xy, a: _rot(xy, a, -1), "clockwise"),
    (
        ex.check_apply_rope_half_split,
        _half_right,
        lambda x, c, s: apply_rope(x, c, s, interleaved=True),
        "interleaved",
    ),
    (
        ex.check_mla_softmax_scale,
        lambda dn, dr, f, m: (dn + dr) ** -0.5 * _mscale(f, m) ** 2,
        lambda dn, dr, f, m: dn**-0.5 * _mscale(f, m) ** 2,
        "nope AND rope",
    ),
    (ex.check_yarn_mscale, _mscale, lambda f, m: 0.1 * m * math.log(f) + 1, "return 1"),
]


@pytest.mark.parametrize("checker,right,wrong,reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_function_checkers(checker, right, wrong, reason):
    ok = checker(right)
    assert ok and ok.correct, str(ok)
    bad = checker(wrong)
    assert not bad and bad.attempted and reason in bad.message, str(bad)
    none = checker(None)
    assert not none and not none.attempted
    crash = checker(_crash)
    assert not crash and "ZeroDivisionError" in crash.message


@pytest.mark.parametrize(
    "checker,right,wrong,reason",
    [
        (ex.check_positions_for_bits, 65536, 65535, "position 0"),
        (
            ex.check_sinusoid_longest_wavelength,
            2 * math.pi * 10000 ** (62 / 64),
            10000 ** (62 / 64),
            "2 pi",
        ),
    ],
)
def test_number_checkers(checker, right, wrong, reason):
    assert checker(right)
    bad = checker(wrong)
    assert not bad and reason in bad.message
    assert not checker(None).attempted
    assert not checker("twelve")
