"""Exercise checkers for notebooks 10-15: MLA cache arithmetic, absorption, positions, RoPE."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..cache import kv_cache_bytes
from ..mla import latent_cache_bytes
from ..positional import (
    apply_rope,
    binary_encoding,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_encoding,
    yarn_get_mscale,
)
from ._feedback import Feedback, call_learner, compare_tensors

__all__ = [
    "check_absorbed_output",
    "check_absorbed_query",
    "check_apply_rope_half_split",
    "check_binary_encoding",
    "check_kv_bytes_per_token",
    "check_latent_cache_bytes",
    "check_mla_softmax_scale",
    "check_positions_for_bits",
    "check_rotate_pair",
    "check_sinusoidal_encoding",
    "check_sinusoid_longest_wavelength",
    "check_yarn_mscale",
]


def _number(got: Any, what: str) -> float | Feedback:
    """``got`` (anything a learner returned) as a float, or the feedback saying that it is not
    a number."""
    try:
        return float(got)
    except (TypeError, ValueError):
        return Feedback(False, f"{what} should return a number, got {type(got).__name__}")


# -- 10 MLA from first principles ---------------------------------------------------------


def check_kv_bytes_per_token(fn: Callable[[int, int, int, int], float] | None) -> Feedback:
    """Exercise 10.1: ``fn(num_layers, n_kv_heads, head_dim, bytes_per_element)`` -> bytes per
    token an MHA/GQA/MQA cache holds over all layers (the argument order of
    :func:`course_utils.cache.kv_cache_bytes`)."""
    hint = "write kv_bytes_per_token(num_layers, n_kv_heads, head_dim, bytes_per_element)"
    for args in ((80, 8, 128, 2), (61, 128, 128, 2), (3, 1, 64, 4)):
        got, fb = call_learner(fn, hint, *args)
        if fb is not None:
            return fb
        got = _number(got, "kv_bytes_per_token")
        if isinstance(got, Feedback):
            return got
        layers, heads, head_dim, size = args
        want = kv_cache_bytes(layers, heads, head_dim, bytes_per_element=size)
        if got == want:
            continue
        if got == want / 2:
            return Feedback(False, "the cache holds keys AND values: count both (a factor 2)")
        if got == want / layers:
            return Feedback(
                False,
                "that is one layer; every layer keeps its own cache, so multiply by num_layers",
            )
        if got == want / size:
            return Feedback(False, "that counts numbers, not bytes: multiply by bytes_per_element")
        return Feedback(False, f"for {args} the answer is {want:,} bytes, you gave {got:,.0f}")
    return Feedback(True, "2 (K and V) x num_layers x n_kv_heads x head_dim x bytes_per_element")


def check_latent_cache_bytes(fn: Callable[[int, int, int, int], float] | None) -> Feedback:
    """Exercise 10.2: ``fn(num_layers, kv_lora_rank, qk_rope_head_dim, bytes_per_element)`` ->
    bytes per token of MLA's cache over all layers (the argument order of
    :func:`course_utils.mla.latent_cache_bytes`)."""
    hint = (
        "write latent_bytes_per_token(num_layers, kv_lora_rank, qk_rope_head_dim, "
        "bytes_per_element)"
    )
    for args in ((61, 512, 64, 2), (60, 512, 64, 2), (3, 32, 8, 4)):
        got, fb = call_learner(fn, hint, *args)
        if fb is not None:
            return fb
        got = _number(got, "latent_bytes_per_token")
        if isinstance(got, Feedback):
            return got
        layers, r, dr, size = args
        want = latent_cache_bytes(layers, r, dr, bytes_per_element=size)
        if got == want:
            continue
        if got == r * size * layers:
            return Feedback(
                False,
                "MLA also caches the one rotary key k_pe shared by all heads "
                "(qk_rope_head_dim numbers per token)",
            )
        if got == 2 * (r + dr) * size * layers:
            return Feedback(
                False,
                "the latent is cached once: K and V are both rebuilt from "
                "the same c_kv, so there is no factor 2",
            )
        if got == want / layers:
            return Feedback(False, "that is one layer: multiply by num_layers")
        return Feedback(False, f"for {args} the answer is {want:,} bytes, you gave {got:,.0f}")
    return Feedback(
        True,
        "num_layers x (kv_lora_rank + qk_rope_head_dim) x bytes_per_element: "
        "576 numbers per token per layer in DeepSeek-V3",
    )


# -- 11 MLA in code -------------------------------------------------------------------------

_G = torch.Generator().manual_seed(1234)
_Q_NOPE = torch.randn(3, 5, 4, generator=_G)  # (heads, t, qk_nope_head_dim)
_W_UK = torch.randn(3, 4, 6, generator=_G)  # (heads, qk_nope_head_dim, kv_lora_rank)
_CTX = torch.randn(3, 5, 6, generator=_G)  # (heads, t, kv_lora_rank)
_W_UV = torch.randn(3, 2, 6, generator=_G)  # (heads, v_head_dim, kv_lora_rank)


def check_absorbed_query(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Feedback:
    """Exercise 11.1: ``fn(q_nope, w_uk)`` with q_nope (heads, t, dn) and w_uk (heads, dn, r)
    returns the absorbed query (heads, t, r) whose dot product with c_kv equals q_nope . k_nope."""
    hint = "write absorb_query(q_nope, w_uk): per head, q_nope @ w_uk"
    got, fb = call_learner(fn, hint, _Q_NOPE.clone(), _W_UK.clone())
    if fb is not None:
        return fb
    want = _Q_NOPE @ _W_UK
    if isinstance(got, torch.Tensor) and got.shape == (3, 5, 6):
        mixed = torch.einsum("htd,gdr->htr", _Q_NOPE, _W_UK)
        if torch.allclose(got.float(), mixed, atol=1e-4):
            return Feedback(False, "you summed over heads: each head absorbs only its own W_uk")
    bad = compare_tensors(got, want, "absorb_query", atol=1e-4)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "q_nope . (W_uk c) = (q_nope W_uk) . c: the key up-projection moves "
        "onto the query, so keys are never expanded",
    )


def check_absorbed_output(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Feedback:
    """Exercise 11.2: ``fn(ctx_latent, w_uv)`` with ctx_latent (heads, t, r) and w_uv
    (heads, dv, r) returns each head's output (heads, t, dv)."""
    hint = "write expand_output(ctx_latent, w_uv): per head, ctx_latent @ w_uv^T"
    got, fb = call_learner(fn, hint, _CTX.clone(), _W_UV.clone())
    if fb is not None:
        return fb
    want = _CTX @ _W_UV.transpose(-1, -2)
    bad = compare_tensors(got, want, "expand_output", atol=1e-4)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "attention weights sum latents; W_uv then turns the weighted latent "
        "into the head's value, the same as weighting expanded values",
    )


# -- 12 integer and binary positions --------------------------------------------------------


def check_binary_encoding(fn: Callable[[int, int], torch.Tensor] | None) -> Feedback:
    """Exercise 12.1: ``fn(seq_len, n_bits)`` -> (seq_len, n_bits) bits, least significant
    first."""
    hint = "write binary_positions(seq_len, n_bits): bit i of position p is (p >> i) & 1"
    got, fb = call_learner(fn, hint, 12, 4)
    if fb is not None:
        return fb
    want = binary_encoding(12, 4)
    if (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.equal(got.float(), want.flip(-1))
    ):
        return Feedback(
            False,
            "your bits are most significant first; put bit 0 (the one that "
            "flips every position) in column 0",
        )
    bad = compare_tensors(got, want, "binary_positions")
    if bad is not None:
        return bad
    return Feedback(True, "column i flips every 2**i positions: a square wave per column")


def check_positions_for_bits(answer: int | None) -> Feedback:
    """Exercise 12.2: how many distinct positions can 16 bits tell apart?"""
    if answer is None:
        return Feedback(False, "how many different numbers fit in 16 bits?", attempted=False)
    got = _number(answer, "the answer")
    if isinstance(got, Feedback):
        return got
    if got == 2**16:
        return Feedback(True, "2**16 = 65,536 positions; the next one needs a 17th bit")
    if got == 2**16 - 1:
        return Feedback(False, "that is the largest position; count position 0 too")
    if got == 16:
        return Feedback(False, "each bit doubles the count: it is 2 to the power 16")
    return Feedback(False, f"{answer} is not it: n bits write every number from 0 to 2**n - 1")


# -- 13 sinusoidal positions ----------------------------------------------------------------


def check_sinusoidal_encoding(fn: Callable[[int, int], torch.Tensor] | None) -> Feedback:
    """Exercise 13.1: ``fn(seq_len, dim)`` -> (seq_len, dim) with sin in even and cos in odd
    columns, frequency 10000 ** (-2i / dim) for pair i."""
    hint = "write sinusoids(seq_len, dim) with PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i)"
    got, fb = call_learner(fn, hint, 20, 8)
    if fb is not None:
        return fb
    want = sinusoidal_encoding(20, 8)
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        swapped = torch.empty_like(want)
        swapped[:, 0::2], swapped[:, 1::2] = want[:, 1::2], want[:, 0::2]
        if torch.allclose(got.float(), swapped, atol=1e-4):
            return Feedback(False, "sin and cos are swapped: sin goes in the even columns")
        pos = torch.arange(20.0)[:, None]
        wrong = torch.empty_like(want)
        w = 10000 ** (-torch.arange(4.0) / 8)
        wrong[:, 0::2], wrong[:, 1::2] = torch.sin(pos * w), torch.cos(pos * w)
        if torch.allclose(got.float(), wrong, atol=1e-4):
            return Feedback(False, "the exponent is 2i / dim for pair i, not i / dim")
    bad = compare_tensors(got, want, "sinusoids", atol=1e-4)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "fast pairs near column 0, slow ones near the end: every position "
        "gets a unique, smoothly varying code",
    )


def check_sinusoid_longest_wavelength(answer: float | None) -> Feedback:
    """Exercise 13.2: the longest wavelength (in tokens) of the sinusoids for dim 64, base
    10000."""
    if answer is None:
        return Feedback(
            False,
            "the slowest pair has w = 10000 ** (-62 / 64); wavelength 2 pi / w",
            attempted=False,
        )
    got = _number(answer, "the answer")
    if isinstance(got, Feedback):
        return got
    want = 2 * math.pi * 10000 ** (62 / 64)
    if math.isclose(got, want, rel_tol=1e-3):
        return Feedback(
            True,
            f"about {want:,.0f} tokens: the slowest pair barely turns within "
            "a few thousand positions",
        )
    if math.isclose(got, 10000 ** (62 / 64), rel_tol=1e-3):
        return Feedback(False, "that is 1 / w, the tokens per radian; a full turn is 2 pi radians")
    if math.isclose(got, 2 * math.pi * 10000, rel_tol=1e-3):
        return Feedback(False, "the last pair is i = 31, so the exponent is 62/64, not 1")
    return Feedback(False, f"{answer} is not it: wavelength = 2 pi / w with w = 10000**(-62/64)")


# -- 14 RoPE --------------------------------------------------------------------------------


def check_rotate_pair(fn: Callable[[torch.Tensor, float], torch.Tensor] | None) -> Feedback:
    """Exercise 14.1: ``fn(xy, angle)`` rotates the 2-vector xy counter-clockwise by angle."""
    hint = "write rotate_pair(xy, angle) returning (x cos - y sin, x sin + y cos)"
    xy = torch.tensor([0.6, -1.3])
    for angle in (0.4, 2.0):
        got, fb = call_learner(fn, hint, xy.clone(), angle)
        if fb is not None:
            return fb
        c, s = math.cos(angle), math.sin(angle)
        want = torch.tensor([xy[0] * c - xy[1] * s, xy[0] * s + xy[1] * c])
        clockwise = torch.tensor([xy[0] * c + xy[1] * s, -xy[0] * s + xy[1] * c])
        if (
            isinstance(got, torch.Tensor)
            and got.shape == (2,)
            and torch.allclose(got.float(), clockwise, atol=1e-5)
        ):
            return Feedback(False, "that turns clockwise (angle -theta); flip the sign of sin")
        bad = compare_tensors(got, want, "rotate_pair")
        if bad is not None:
            return bad
    return Feedback(
        True, "a rotation keeps the length and adds the angle: that is all RoPE does, pair by pair"
    )


def check_apply_rope_half_split(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Feedback:
    """Exercise 14.2: ``fn(x, cos, sin)`` rotates x (seq, d) in the half-split layout, pairing
    x_i with x_{i + d/2}; cos, sin are (seq, d/2)."""
    hint = "write rope_half_split(x, cos, sin) pairing column i with column i + d/2"
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_cos_sin(torch.arange(6), rope_inv_freq(8))
    got, fb = call_learner(fn, hint, x.clone(), cos, sin)
    if fb is not None:
        return fb
    want = apply_rope(x, cos, sin, interleaved=False)
    if (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got.float(), apply_rope(x, cos, sin, interleaved=True), atol=1e-5)
    ):
        return Feedback(
            False,
            "that rotates neighbouring pairs (x0, x1), ...: the interleaved "
            "layout; here pair i is (x_i, x_{i+d/2})",
        )
    bad = compare_tensors(got, want, "rope_half_split")
    if bad is not None:
        return bad
    return Feedback(True, "the Llama layout: same rotations, different pairing of the columns")


# -- 15 MLA with RoPE -----------------------------------------------------------------------


def check_mla_softmax_scale(fn: Callable[[int, int, float, float], float] | None) -> Feedback:
    """Exercise 15.1: ``fn(qk_nope_head_dim, qk_rope_head_dim, factor, mscale_all_dim)`` ->
    MLA's softmax scale under YaRN (factor 1 means no YaRN)."""
    hint = "write mla_softmax_scale(dn, dr, factor, mscale_all_dim)"
    for args in ((128, 64, 40.0, 1.0), (128, 64, 1.0, 1.0), (16, 8, 4.0, 0.707)):
        got, fb = call_learner(fn, hint, *args)
        if fb is not None:
            return fb
        got = _number(got, "mla_softmax_scale")
        if isinstance(got, Feedback):
            return got
        dn, dr, factor, m = args
        m_all = yarn_get_mscale(factor, m)
        want = (dn + dr) ** -0.5 * m_all**2
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        if math.isclose(got, dn**-0.5 * m_all**2, rel_tol=1e-6):
            return Feedback(
                False,
                "the query-key dot product runs over nope AND rope dims: use (dn + dr) ** -0.5",
            )
        if factor > 1 and math.isclose(got, (dn + dr) ** -0.5 * m_all, rel_tol=1e-6):
            return Feedback(False, "YaRN's mscale multiplies both q and k in effect: square it")
        if factor > 1 and math.isclose(got, (dn + dr) ** -0.5, rel_tol=1e-6):
            return Feedback(False, "under YaRN (factor > 1) the scale is multiplied by mscale**2")
        return Feedback(False, f"for {args} the scale is {want:.6g}, you gave {got:.6g}")
    return Feedback(True, "(dn + dr) ** -0.5 x (0.1 mscale_all_dim ln(factor) + 1) ** 2")


def check_yarn_mscale(fn: Callable[[float, float], float] | None) -> Feedback:
    """Exercise 15.2: ``fn(factor, mscale)`` -> YaRN's 0.1 * mscale * ln(factor) + 1 (1 when
    factor <= 1)."""
    hint = "write yarn_mscale(factor, mscale)"
    for args in ((40.0, 1.0), (4.0, 0.707), (1.0, 1.0), (0.5, 1.0)):
        got, fb = call_learner(fn, hint, *args)
        if fb is not None:
            return fb
        got = _number(got, "yarn_mscale")
        if isinstance(got, Feedback):
            return got
        want = yarn_get_mscale(*args)
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        if args[0] < 1:
            return Feedback(False, "no stretch (factor <= 1) means no correction: return 1")
        if math.isclose(got, 0.1 * args[1] * math.log10(args[0]) + 1, rel_tol=1e-6):
            return Feedback(False, "use the natural logarithm (math.log), not log10")
        return Feedback(False, f"for {args} it is {want:.6g}, you gave {got:.6g}")
    return Feedback(True, "the softmax gets slightly sharper as the context stretches")
