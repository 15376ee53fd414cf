"""Exercise checkers for notebooks 00 (course overview) and 01 (journey of a token)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..sampling import apply_temperature, softmax, top_k_filter, top_p_filter
from ._feedback import Feedback, call_learner, compare_tensors, not_attempted

__all__ = [
    "check_next_token_distribution",
    "check_mla_cache_ratio",
    "check_softmax_with_temperature",
    "check_top_k_filter",
    "check_top_p_filter",
]

# -- 00 course overview -------------------------------------------------------------------


def check_next_token_distribution(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Feedback:
    """Exercise 00.1: ``fn(counts)`` turns a (vocab,) tensor of counts into probabilities."""
    hint = "write next_token_distribution(counts) that returns counts / counts.sum()"
    counts = torch.tensor([3.0, 0.0, 1.0, 6.0, 0.0, 10.0])
    got, fb = call_learner(fn, hint, counts.clone())
    if fb is not None:
        return fb
    want = counts / counts.sum()
    if isinstance(got, torch.Tensor) and torch.allclose(got.float(), softmax(counts)):
        return Feedback(
            False,
            "that is a softmax of the counts; counts are already "
            "non-negative, so divide by their total instead",
        )
    bad = compare_tensors(got, want, "next_token_distribution")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "each count divided by the total: the probabilities sum to 1 and "
        "unseen tokens get exactly 0",
    )


def check_mla_cache_ratio(answer: float | None) -> Feedback:
    """Exercise 00.2: how many times fewer cache elements per token per layer MLA stores in
    DeepSeek-V3 than full multi-head attention with V3's 128 heads of dimension 128."""
    if answer is None:
        return not_attempted(
            "count the numbers each method caches for one token in one layer, then divide"
        )
    try:
        answer = float(answer)
    except (TypeError, ValueError):
        return Feedback(False, f"the answer should be a number, got {type(answer).__name__}")
    if not math.isfinite(answer):
        return Feedback(False, f"the answer should be a finite number, got {answer}")
    want = (2 * 128 * 128) / (512 + 64)
    if math.isclose(float(answer), want, rel_tol=1e-3):
        return Feedback(
            True,
            f"MHA caches K and V: 2 x 128 heads x 128 = 32768 numbers; MLA "
            f"caches a 512-wide latent plus one 64-wide rotary key = 576: "
            f"{want:.1f}x fewer",
        )
    if math.isclose(float(answer), 128 * 128 / 576, rel_tol=1e-3):
        return Feedback(False, "you counted only K for MHA; the cache holds K and V")
    if math.isclose(float(answer), 2 * 128 * 128 / 512, rel_tol=1e-3):
        return Feedback(
            False,
            "MLA also caches the shared rotary key k_pe (64 numbers), not only the 512-wide latent",
        )
    return Feedback(
        False,
        f"{answer} is not it: count the numbers each method stores for one "
        "token in one layer, then divide",
    )


# -- 01 journey of a token ----------------------------------------------------------------

_LOGITS = torch.tensor(
    [[2.0, -1.0, 0.5, 3.0, 0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 4.0, -3.0, 1.5, 1.5, 2.0, -1.0]]
)


def check_softmax_with_temperature(
    fn: Callable[[torch.Tensor, float], torch.Tensor] | None,
) -> Feedback:
    """Exercise 01.1: ``fn(logits, temperature)`` returns probabilities over the last dim."""
    hint = "write softmax_with_temperature(logits, temperature) = softmax(logits / T)"
    for t in (0.5, 1.0, 2.0):
        got, fb = call_learner(fn, hint, _LOGITS.clone(), t)
        if fb is not None:
            return fb
        want = softmax(apply_temperature(_LOGITS, t))
        if isinstance(got, torch.Tensor) and got.shape == want.shape and t != 1.0:
            if torch.allclose(got.float(), softmax(_LOGITS * t), atol=1e-5):
                return Feedback(
                    False,
                    "you multiplied by the temperature; divide by it, so "
                    "T < 1 sharpens and T > 1 flattens",
                )
        bad = compare_tensors(got, want, f"softmax_with_temperature(logits, {t})")
        if bad is not None:
            return bad
    return Feedback(
        True, "softmax(logits / T): low T sharpens toward greedy, high T flattens toward uniform"
    )


def check_top_k_filter(fn: Callable[[torch.Tensor, int], torch.Tensor] | None) -> Feedback:
    """Exercise 01.2: ``fn(logits, k)`` keeps the k largest logits per row, others -inf."""
    hint = "write top_k(logits, k) that sets all but the k largest logits of each row to -inf"
    for k in (1, 3, 8):
        got, fb = call_learner(fn, hint, _LOGITS.clone(), k)
        if fb is not None:
            return fb
        bad = compare_tensors(got, top_k_filter(_LOGITS, k), f"top_k(logits, {k})")
        if bad is not None:
            return bad
    return Feedback(
        True,
        "the k largest logits stay, the rest become -inf and get probability "
        "0 after softmax (ties at the k-th value stay too)",
    )


def check_top_p_filter(fn: Callable[[torch.Tensor, float], torch.Tensor] | None) -> Feedback:
    """Exercise 01.3: ``fn(logits, p)`` keeps the smallest likely set with mass >= p."""
    hint = "write top_p(logits, p): sort, cumulative softmax, keep tokens until the mass reaches p"
    for p in (0.5, 0.9, 1.0):
        got, fb = call_learner(fn, hint, _LOGITS.clone(), p)
        if fb is not None:
            return fb
        want = top_p_filter(_LOGITS, p)
        if isinstance(got, torch.Tensor) and got.shape == want.shape:
            kept_got = (~torch.isinf(got.float())).sum().item()
            kept_want = (~torch.isinf(want)).sum().item()
            if kept_got < kept_want:
                return Feedback(
                    False,
                    f"with p={p} you keep {kept_got} tokens, the nucleus "
                    f"has {kept_want}: keep the token that crosses p too",
                )
        bad = compare_tensors(got, want, f"top_p(logits, {p})")
        if bad is not None:
            return bad
    return Feedback(
        True,
        "the nucleus is the fewest most-likely tokens whose probability "
        "reaches p; its size adapts to how confident the model is",
    )
