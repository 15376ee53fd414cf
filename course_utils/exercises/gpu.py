"""Exercise checkers for notebook 24: GPU optimisation tricks (intensity, roofline, online
softmax)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..kernels import attainable_flops, gemm_intensity
from ._feedback import Feedback, call_learner

__all__ = ["check_attainable_flops", "check_matmul_intensity", "check_online_softmax_step"]


def _as_float(got: Any, what: str) -> float | Feedback:
    if isinstance(got, Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return Feedback(False, f"{what} should return a number, got {type(got).__name__}")
    if not math.isfinite(got):
        return Feedback(False, f"{what} returned {got}, not a finite number")
    return float(got)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


# -- 24.1 arithmetic intensity of a matmul ---------------------------------------------------

_GEMMS = [(64, 32, 16, 2), (1, 4096, 4096, 2), (512, 512, 512, 1), (8, 7168, 2048, 4)]


def check_matmul_intensity(fn: Callable[[int, int, int, int], float] | None) -> Feedback:
    """Exercise 24.1: ``fn(m, n, k, dtype_bytes)`` returns the FLOPs per byte of C = A @ B with
    A (m, k), B (k, n), C (m, n): a multiply-add is 2 FLOPs; A and B are read once and C
    written once, at ``dtype_bytes`` per element."""
    hint = (
        "write matmul_intensity(m, n, k, dtype_bytes): 2*m*n*k FLOPs divided by the bytes "
        "of A, B and C"
    )
    for m, n, k, b in _GEMMS:
        got, fb = call_learner(fn, hint, m, n, k, b)
        if fb is not None:
            return fb
        value = _as_float(got, f"matmul_intensity({m}, {n}, {k}, {b})")
        if isinstance(value, Feedback):
            return value
        want = gemm_intensity(m, n, k, in_bytes=b)
        flops, elements = 2 * m * n * k, m * k + k * n + m * n
        if _close(value, want.flops_per_byte):
            continue
        if _close(value, want.flops_per_byte / 2):
            return Feedback(
                False,
                "half the right value: a multiply-add is 2 FLOPs, so the "
                "matmul does 2*m*n*k, not m*n*k",
            )
        if _close(value, flops / (b * (m * k + k * n))):
            return Feedback(
                False, "you left out writing C: the output (m*n elements) goes to memory too"
            )
        if b != 1 and _close(value, flops / elements):
            return Feedback(
                False,
                "that is FLOPs per element; multiply the elements by dtype_bytes to get bytes",
            )
        if _close(value, flops):
            return Feedback(False, "that is the FLOP count; divide it by the bytes moved")
        return Feedback(
            False,
            f"matmul_intensity({m}, {n}, {k}, {b}) = {value:.4g}, expected "
            f"{want.flops_per_byte:.4g} FLOPs/byte",
        )
    vec = gemm_intensity(1, 4096, 4096).flops_per_byte
    return Feedback(
        True,
        f"a matrix-vector product (m = 1) does about 1 FLOP per byte "
        f"({vec:.2f}) while a 512-cube matmul does hundreds: reuse is intensity",
    )


# -- 24.2 the roofline -----------------------------------------------------------------------

_MACHINES = [(1.0, 100e12, 2e12), (50.0, 100e12, 2e12), (200.0, 100e12, 2e12), (0.25, 1e11, 2e10)]


def check_attainable_flops(fn: Callable[[float, float, float], float] | None) -> Feedback:
    """Exercise 24.2: ``fn(intensity, peak_flops, bandwidth)`` returns the FLOP/s a roofline
    allows an operation of that intensity (FLOPs/byte) on a machine with that peak (FLOP/s)
    and memory bandwidth (bytes/s)."""
    hint = (
        "write attainable(intensity, peak_flops, bandwidth): the lower of the compute roof "
        "and intensity * bandwidth"
    )
    for intensity, peak, bw in _MACHINES:
        got, fb = call_learner(fn, hint, intensity, peak, bw)
        if fb is not None:
            return fb
        value = _as_float(got, f"attainable({intensity}, {peak:.3g}, {bw:.3g})")
        if isinstance(value, Feedback):
            return value
        want = attainable_flops(intensity, peak, bw)
        if _close(value, want):
            continue
        if _close(value, min(peak, intensity / bw)) or _close(value, min(peak, bw / intensity)):
            return Feedback(
                False,
                "check the units: FLOPs/byte times bytes/s gives FLOP/s, so "
                "multiply intensity by bandwidth",
            )
        if _close(value, intensity * bw):
            return Feedback(
                False,
                "past the ridge point the compute peak caps it: take the minimum with peak_flops",
            )
        if _close(value, max(peak, intensity * bw)):
            return Feedback(
                False,
                "you took the higher roof; an operation is held back by "
                "whichever runs out first, so take the minimum",
            )
        return Feedback(
            False,
            f"attainable({intensity}, {peak:.3g}, {bw:.3g}) = {value:.4g}, "
            f"expected {want:.4g} FLOP/s",
        )
    return Feedback(
        True,
        "below the ridge point (peak / bandwidth = 50 FLOPs/byte on the first "
        "machine) memory sets the speed; above it, arithmetic does",
    )


# -- 24.3 one step of the online softmax -----------------------------------------------------


def _stream(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(23, generator=g) * 3
    x[17] = 12.0  # the max arrives late, so the early sum must be rescaled
    return x


def _run_stream(
    fn: Callable[..., Any] | None, x: Tensor, block: int, hint: str
) -> tuple[Tensor, Tensor] | Feedback:
    m, l = torch.tensor(float("-inf")), torch.tensor(0.0)
    for start in range(0, x.numel(), block):
        got, fb = call_learner(fn, hint, m.clone(), l.clone(), x[start : start + block].clone())
        if fb is not None:
            return fb
        if not (isinstance(got, tuple) and len(got) == 2):
            return Feedback(False, "online_softmax_step should return a tuple (m_new, l_new)")
        try:
            m, l = (torch.as_tensor(t, dtype=torch.float32).reshape(()) for t in got)
        except Exception:
            return Feedback(False, "m_new and l_new should each be one number (a 0-d tensor)")
    return m, l


def check_online_softmax_step(
    fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None,
) -> Feedback:
    """Exercise 24.3: ``fn(m, l, block) -> (m_new, l_new)``: m is the max of the numbers seen
    so far (-inf at the start), l the sum of exp(x - m) over them (0 at the start), ``block`` a
    1-D tensor of new numbers. Fed a stream block by block, the final (m, l) must give
    softmax(x) = exp(x - m) / l."""
    hint = (
        "write online_softmax_step(m, l, block): m_new = max(m, block.max()); rescale the "
        "old sum by exp(m - m_new) and add exp(block - m_new).sum()"
    )
    for seed, block in ((0, 5), (1, 4), (2, 1)):
        x = _stream(seed)
        result = _run_stream(fn, x, block, hint)
        if isinstance(result, Feedback):
            return result
        m, l = result
        want_m = x.max()
        want_l = torch.exp(x - want_m).sum()
        if not torch.isclose(m, want_m):
            return Feedback(
                False, f"m should end as the stream's max {want_m.item():.4g}, got {m.item():.4g}"
            )
        if not torch.isfinite(m) or not torch.isfinite(l):
            return Feedback(
                False,
                f"after the stream m = {m.item()}, l = {l.item()}: not finite "
                "(is the rescale factor exp(m - m_new), which is at most 1?)",
            )
        if not torch.isclose(l, want_l, rtol=1e-5):
            # What the usual mistake gives: the old sum added without rescaling.
            m_, l_ = torch.tensor(float("-inf")), torch.tensor(0.0)
            for start in range(0, x.numel(), block):
                b = x[start : start + block]
                m_ = torch.maximum(m_, b.max())
                l_ = l_ + torch.exp(b - m_).sum()
            if torch.isclose(l, l_, rtol=1e-5):
                return Feedback(
                    False,
                    "when a block raises the max, the old sum was computed "
                    "against the old max: multiply it by exp(m - m_new) "
                    "before adding the new block",
                )
            return Feedback(
                False,
                f"l should end as sum(exp(x - max)) = {want_l.item():.5g}, got {l.item():.5g}",
            )
        softmax = torch.exp(x - m) / l
        if not torch.allclose(softmax, torch.softmax(x, 0), atol=1e-6):
            return Feedback(False, "exp(x - m) / l does not match torch.softmax")
    return Feedback(
        True,
        "a running max and a rescaled running sum: softmax in one pass over "
        "blocks, the heart of tiled (flash) attention",
    )
