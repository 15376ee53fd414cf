"""Exercise checkers for notebook 20: FP8 block scales, tile quantisation, the FP8 GEMM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from ..fp8 import (
    E4M3,
    block_scales,
    cast_to_fp8,
    dequantize_tiles,
    fp8_gemm_blockwise,
    quantize_blocks,
    quantize_tiles,
)
from ._feedback import Feedback, call_learner

__all__ = ["check_block_scales", "check_quantize_tiles", "check_fp8_gemm"]

_E4M3_MAX = 448.0


def _fp8_crash_hint(fb: Feedback) -> Feedback:
    """Turn torch's "not implemented for Float8" into the reason: no FP8 arithmetic on CPU."""
    if not fb.correct and fb.attempted and "Float8" in fb.message:
        return Feedback(
            False,
            fb.message + " (torch has no FP8 arithmetic on the CPU: upcast "
            "with .float() before multiplying or adding)",
        )
    return fb


def _matrix(rows: int, cols: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-1, 2, cols)
    x[5, 3] = 3000.0  # an outlier
    return x


def _close(got: Any, want: Tensor, rtol: float = 1e-5) -> bool:
    return (
        isinstance(got, Tensor)
        and got.shape == want.shape
        and torch.allclose(got.detach().float().cpu(), want, rtol=rtol, atol=0)
    )


def _close_normwise(got: Tensor, want: Tensor, tol: float = 1e-5) -> bool:
    """max |got - want| <= tol * max |want| (sums in another order differ near zero)."""
    return bool((got - want).abs().max() <= tol * want.abs().max())


def check_block_scales(fn: Callable[[Tensor, int], Tensor] | None) -> Feedback:
    """Exercise 20.1: ``fn(w, block)`` with w (R, C) returns the per-block scales
    (ceil(R / block), ceil(C / block)): amax of each block / 448, and 1 for an all-zero block.
    Edge blocks may stick out of the matrix."""
    hint = (
        "write block_scales(w, block): amax(|w|) of every block x block block divided by "
        "448 (1 where a block is all zero), one scale per block, edge blocks included"
    )
    w = _matrix(70, 100, seed=0)
    w[32:64, 32:64] = 0.0  # block (1, 1) is all zero
    block = 32
    got, fb = call_learner(fn, hint, w.clone(), block)
    if fb is not None:
        return fb
    want = block_scales(w, block)
    if not isinstance(got, Tensor):
        return Feedback(
            False, f"block_scales should return a torch.Tensor, got {type(got).__name__}"
        )
    if got.shape != want.shape:
        if tuple(got.shape) == (70 // block, 100 // block):
            return Feedback(
                False,
                f"you dropped the edge blocks: a 70 x 100 matrix in {block} x "
                f"{block} blocks needs ceil(70/32) x ceil(100/32) = "
                f"{tuple(want.shape)} scales (the last ones cover partial "
                "blocks)",
            )
        return Feedback(
            False,
            f"expected one scale per block, shape {tuple(want.shape)}, got {tuple(got.shape)}",
        )
    got = got.detach().float().cpu()
    zero = got[1, 1].item()
    nonzero = torch.ones_like(want, dtype=torch.bool)
    nonzero[1, 1] = False
    if _close(got[nonzero], want[nonzero] * _E4M3_MAX):
        return Feedback(
            False,
            "those are the block maxima themselves; the scale is amax / 448 "
            "so that each block's largest value lands on e4m3's largest, 448",
        )
    if _close(got[nonzero], 1 / want[nonzero]):
        return Feedback(
            False,
            "that is 448 / amax, the factor that takes a block *into* FP8; "
            "the scale is the one you multiply by to come back: amax / 448",
        )
    per_tensor = (w.abs().max() / _E4M3_MAX).item()
    if torch.allclose(got[nonzero], torch.full_like(got[nonzero], per_tensor)):
        return Feedback(
            False,
            "every block got the same scale, the whole matrix's amax / 448: "
            "that is per-tensor scaling; take the amax of each block",
        )
    if _close(got[nonzero], want[nonzero]) and zero != 1.0:
        return Feedback(
            False,
            f"the all-zero block got scale {zero}; give it 1 (amax / 448 = 0 "
            "would make quantising divide 0 by 0)",
        )
    if not _close(got, want):
        err = (got - want).abs().max().item()
        return Feedback(
            False,
            f"some scales are off, by up to {err:.3g}; each should be that block's max |w| / 448",
        )
    return Feedback(
        True,
        f"{want.numel()} scales, one per block; the outlier only coarsens the block it lives in",
    )


def check_quantize_tiles(fn: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None) -> Feedback:
    """Exercise 20.2: ``fn(x, tile)`` with x (M, K) returns ``(q, scales)``: q (M, K) in
    torch.float8_e4m3fn, scales (M, ceil(K / tile)) with one scale per 1 x tile tile."""
    hint = (
        "write quantize_tiles(x, tile): per row, per tile of `tile` columns, scale = "
        "amax / 448, q = (x / scale).to(torch.float8_e4m3fn); return (q, scales)"
    )
    x = _matrix(12, 80, seed=1)
    tile = 32
    got, fb = call_learner(fn, hint, x.clone(), tile)
    if fb is not None:
        return _fp8_crash_hint(fb)
    if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, Tensor) for t in got)):
        return Feedback(False, "quantize_tiles should return a tuple (q, scales) of tensors")
    q, scales = got
    want_q, want_s = quantize_tiles(x, tile)
    if scales.shape != want_s.shape:
        if tuple(scales.shape) in ((12, 1), (12,)):
            return Feedback(
                False,
                "that is one scale per row; split each row into tiles of "
                f"{tile} columns, each with its own scale "
                f"({tuple(want_s.shape)} in all)",
            )
        return Feedback(
            False,
            f"scales should have shape (M, ceil(K / tile)) = "
            f"{tuple(want_s.shape)}, got {tuple(scales.shape)}",
        )
    if q.shape != x.shape:
        return Feedback(
            False, f"q should have the shape of x, {tuple(x.shape)}, got {tuple(q.shape)}"
        )
    if q.dtype != E4M3:
        return Feedback(
            False, f"q is {q.dtype}; cast x / scale to torch.float8_e4m3fn so it really is FP8"
        )
    s = scales.detach().float().cpu()
    if not _close(s, want_s):
        if _close(s, 1 / want_s):
            return Feedback(
                False,
                "your scales are 448 / amax; the scale is amax / 448 (q * "
                "scale should give x back)",
            )
        return Feedback(
            False,
            "the scales are off: each should be max |x| over its 1 x tile tile, divided by 448",
        )
    back = dequantize_tiles(q.detach().cpu(), s, tile)
    if not torch.allclose(back, dequantize_tiles(want_q, want_s, tile), rtol=1e-6, atol=0):
        s_el = s.repeat_interleave(tile, 1)[:, : x.shape[1]]
        if torch.equal(q.detach().cpu().float(), cast_to_fp8(x * s_el).float()):
            return Feedback(
                False,
                "you multiplied x by the scale; divide by it so each tile's "
                "largest value becomes 448",
            )
        return Feedback(
            False,
            "q * scale does not give back the FP8 rounding of x; compute "
            "q = (x / scale).to(torch.float8_e4m3fn) tile by tile",
        )
    return Feedback(True, "one scale per token per tile: an outlier coarsens only its own tile")


def check_fp8_gemm(
    fn: Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor] | None,
) -> Feedback:
    """Exercise 20.3: ``fn(a_q, a_scales, b_q, b_scales, tile)`` returns a @ b.T in fp32 (M, N):
    for each tile-wide slice of K, the product of the FP8 values times a's tile scale (per row)
    times b's block scale (per block of rows of b), accumulated in fp32."""
    hint = (
        "write fp8_gemm(a_q, a_scales, b_q, b_scales, tile): loop over K in slices of "
        "`tile`, multiply the upcast FP8 slices, scale by a_scales[:, j] and b's block "
        "scales, add into an fp32 (M, N) result"
    )
    g = torch.Generator().manual_seed(2)
    tile = 16
    a = torch.randn(10, 48, generator=g) * torch.logspace(-1, 1, 48)
    b = torch.randn(40, 48, generator=g) * torch.logspace(1, -1, 40)[:, None]
    a_q, a_s = quantize_tiles(a, tile)
    b_q, b_s = quantize_blocks(b, tile)
    got, fb = call_learner(fn, hint, a_q.clone(), a_s.clone(), b_q.clone(), b_s.clone(), tile)
    if fb is not None:
        return _fp8_crash_hint(fb)
    want = fp8_gemm_blockwise(a_q, a_s, b_q, b_s, tile)
    if not isinstance(got, Tensor):
        return Feedback(False, f"fp8_gemm should return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        return Feedback(
            False,
            f"a (M, K) times b (N, K) transposed is (M, N) = "
            f"{tuple(want.shape)}, got {tuple(got.shape)}",
        )
    if got.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return Feedback(
            False,
            f"your result is {got.dtype}: a matmul of FP8 tensors rounds its "
            "output to FP8 (and saturates at 448); upcast the slices with "
            ".float() and accumulate in fp32",
        )
    got = got.detach().float().cpu()
    raw = a_q.float() @ b_q.float().T
    b_rows = b_s.repeat_interleave(tile, 0)[: b.shape[0]]  # (N, K / tile)
    # sums of one tensor per K slice (there is at least one), so tensors, not the int start 0
    only_a = cast(
        Tensor,
        sum(
            (
                a_q[:, j * tile : (j + 1) * tile].float()
                @ b_q[:, j * tile : (j + 1) * tile].float().T
            )
            * a_s[:, j, None]
            for j in range(a_s.shape[1])
        ),
    )
    only_b = cast(
        Tensor,
        sum(
            (
                a_q[:, j * tile : (j + 1) * tile].float()
                @ b_q[:, j * tile : (j + 1) * tile].float().T
            )
            * b_rows[None, :, j]
            for j in range(a_s.shape[1])
        ),
    )
    first = raw * a_s[:, :1] * b_rows[None, :, 0]
    for wrong, why in (
        (
            raw,
            "you multiplied the raw FP8 numbers and never applied the scales; each K slice's "
            "partial product needs a's tile scale times b's block scale",
        ),
        (only_a, "only a's scales were applied; multiply by b's block scales too"),
        (only_b, "only b's scales were applied; multiply by a's tile scales too"),
        (first, "you used the scales of the first K slice for all of K; every slice has its own"),
    ):
        if _close_normwise(got, wrong):
            return Feedback(False, why)
    if not _close_normwise(got, want):
        err = ((got - want).abs().max() / want.abs().max()).item()
        return Feedback(
            False,
            f"off by up to {err:.2%} of the largest output; check which scale "
            "goes with which slice and rows",
        )
    return Feedback(
        True, "scales applied per K slice and accumulated in fp32: DeepSeek-V3's recipe, simulated"
    )
