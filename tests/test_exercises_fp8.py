"""Checkers of notebook 20: a right answer passes, a typical wrong one fails and says why,
None is "not attempted", a crash is reported (never raised)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_utils import exercises as ex


def _crash(*args):
    raise RuntimeError("oops")


def _scales_right(w, block):
    rows, cols = w.shape
    pad = F.pad(w, (0, -cols % block, 0, -rows % block))
    amax = pad.abs().unfold(0, block, block).unfold(1, block, block).amax((-1, -2))
    return torch.where(amax > 0, amax / 448, torch.ones_like(amax))


def _scales_no_division(w, block):
    s = _scales_right(w, block)
    return torch.where(s == 1, s, s * 448)


def _scales_inverted(w, block):
    s = _scales_right(w, block)
    return torch.where(s == 1, s, 1 / s)


def _scales_floor(w, block):
    return _scales_right(w[: w.shape[0] // block * block, : w.shape[1] // block * block], block)


def _scales_zero_block_nan(w, block):
    rows, cols = w.shape
    pad = F.pad(w, (0, -cols % block, 0, -rows % block))
    return pad.abs().unfold(0, block, block).unfold(1, block, block).amax((-1, -2)) / 448


def _scales_per_tensor(w, block):
    return torch.full_like(_scales_right(w, block), w.abs().max().item() / 448)


def _tiles_right(x, tile):
    m, k = x.shape
    blocks = F.pad(x, (0, -k % tile)).view(m, -1, tile)
    amax = blocks.abs().amax(-1)
    scales = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q = (blocks / scales[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(m, -1)[:, :k].contiguous(), scales


def _tiles_per_row(x, tile):
    return _tiles_right(x, x.shape[1])


def _tiles_not_cast(x, tile):
    q, s = _tiles_right(x, tile)
    return q.float(), s


def _tiles_multiplied(x, tile):
    m, k = x.shape
    _, scales = _tiles_right(x, tile)
    blocks = F.pad(x, (0, -k % tile)).view(m, -1, tile)
    q = (blocks * scales[..., None]).to(torch.float8_e4m3fn)
    return q.view(m, -1)[:, :k].contiguous(), scales


def _gemm(a_q, a_s, b_q, b_s, tile, use_a=True, use_b=True, only_first=False):
    m, k = a_q.shape
    n = b_q.shape[0]
    out = torch.zeros(m, n)
    for j in range(0, k, tile):
        s = 0 if only_first else j // tile
        part = a_q[:, j : j + tile].float() @ b_q[:, j : j + tile].float().T
        if use_a:
            part = part * a_s[:, s, None]
        if use_b:
            part = part * b_s[:, s].repeat_interleave(tile)[:n][None, :]
        out += part
    return out


def _gemm_fp8_math(a_q, a_s, b_q, b_s, tile):
    return a_q @ b_q.T  # FP8 output (recent torch) or a crash (older torch)


@pytest.mark.parametrize(
    "checker, right, wrongs",
    [
        (
            ex.check_block_scales,
            _scales_right,
            [
                (_scales_no_division, "block maxima themselves"),
                (_scales_inverted, "448 / amax"),
                (_scales_floor, "edge blocks"),
                (_scales_zero_block_nan, "all-zero block"),
                (_scales_per_tensor, "per-tensor"),
            ],
        ),
        (
            ex.check_quantize_tiles,
            _tiles_right,
            [
                (_tiles_per_row, "one scale per row"),
                (_tiles_not_cast, "float8_e4m3fn"),
                (_tiles_multiplied, "multiplied"),
            ],
        ),
        (
            ex.check_fp8_gemm,
            _gemm,
            [
                (lambda *a: _gemm(*a, use_a=False, use_b=False), "never applied the scales"),
                (lambda *a: _gemm(*a, use_b=False), "only a's scales"),
                (lambda *a: _gemm(*a, use_a=False), "only b's scales"),
                (lambda *a: _gemm(*a, only_first=True), "first K slice"),
                (_gemm_fp8_math, "upcast"),
            ],
        ),
    ],
)
def test_checker(checker, right, wrongs):
    fb = checker(right)
    assert fb.correct, fb.message
    for wrong, words in wrongs:
        fb = checker(wrong)
        assert not fb.correct and fb.attempted
        assert words in fb.message, fb.message
    fb = checker(None)
    assert not fb.correct and not fb.attempted
    fb = checker(_crash)
    assert not fb.correct and "RuntimeError" in fb.message
    str(fb)  # prints without raising
