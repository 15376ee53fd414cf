"""Exercise checkers for the attention notebooks 02 (the idea), 03 (self-attention),
04 (causal attention) and 06 (multi-head attention in code).

Each checker calls the learner's function on inputs the notebook did not show, compares the
result with the canonical code in :mod:`course_utils.attention`, and recognises the usual
mistakes (raw scores instead of a softmax, the wrong scale, the wrong triangle, a reshape that
skips the transpose) so the message can say why an answer is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..attention import causal_mask, scaled_dot_product_attention
from ._feedback import Feedback, call_learner, compare_tensors, not_attempted

__all__ = [
    "check_attention_weights",
    "check_context_vectors",
    "check_scaled_attention",
    "check_dot_product_std",
    "check_causal_mask",
    "check_causal_softmax",
    "check_split_heads",
    "check_merge_heads",
]


def _inputs(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(got: object, want: torch.Tensor, atol: float = 1e-5) -> bool:
    return (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got.detach().float().cpu(), want, atol=atol)
    )


# -- 02 attention, the idea -----------------------------------------------------------------


def check_attention_weights(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Feedback:
    """Exercise 02.1: ``fn(query, keys)`` with query (d,) and keys (n, d) returns the (n,)
    attention weights softmax(keys @ query), no scaling."""
    hint = "write attention_weights(query, keys) = softmax of the dot products keys @ query"
    query, keys = _inputs(4, seed=20), _inputs(7, 4, seed=21)
    got, fb = call_learner(fn, hint, query.clone(), keys.clone())
    if fb is not None:
        return fb
    scores = keys @ query
    want = torch.softmax(scores, dim=-1)
    if _close(got, scores):
        return Feedback(
            False,
            "those are the raw scores (dot products); pass them through a "
            "softmax so the weights are positive and sum to 1",
        )
    if _close(got, scores / scores.sum()):
        return Feedback(
            False,
            "dividing the scores by their sum does not make weights: a "
            "negative score gives a negative weight; use the softmax",
        )
    if _close(got, torch.softmax(scores / math.sqrt(4), dim=-1)):
        return Feedback(
            False,
            "you scaled the scores by 1/sqrt(d); this exercise (like "
            "notebook 02) uses plain dot products, scale 1",
        )
    bad = compare_tensors(got, want, "attention_weights(query, keys)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "one score per token (a dot product with the query), turned into "
        "positive weights that sum to 1 by the softmax",
    )


def check_context_vectors(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Feedback:
    """Exercise 02.2: ``fn(x)`` with x (t, d) returns the (t, d) context vectors of every token,
    softmax(x x^T) x, with no trainable weights and no scaling."""
    hint = "write context_vectors(x) = softmax(x @ x.T, dim=-1) @ x"
    x = _inputs(5, 3, seed=22)
    got, fb = call_learner(fn, hint, x.clone())
    if fb is not None:
        return fb
    want = scaled_dot_product_attention(x, x, x, scale=1.0)
    if _close(got, torch.softmax(x @ x.T, dim=0) @ x):
        return Feedback(
            False,
            "your softmax runs down the columns (dim=0); each query's row of "
            "weights must sum to 1, so use dim=-1",
        )
    if _close(got, torch.softmax(x @ x.T, dim=-1)):
        return Feedback(
            False,
            "that is the (t, t) weight matrix; multiply it by x to mix the "
            "token vectors into context vectors",
        )
    bad = compare_tensors(got, want, "context_vectors(x)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "three matrix operations give every token's context vector at once: "
        "scores x x^T, a row-wise softmax, and the weighted sum W x",
    )


# -- 03 self-attention ----------------------------------------------------------------------


def check_scaled_attention(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Feedback:
    """Exercise 03.1: ``fn(q, k, v)`` with q (t, d), k (s, d), v (s, d_v) returns
    softmax(q k^T / sqrt(d)) v of shape (t, d_v)."""
    hint = "write scaled_attention(q, k, v) = softmax(q @ k.T / sqrt(d), dim=-1) @ v"
    d = 16
    q, k, v = _inputs(4, d, seed=30), _inputs(6, d, seed=31), _inputs(6, 5, seed=32)
    got, fb = call_learner(fn, hint, q.clone(), k.clone(), v.clone())
    if fb is not None:
        return fb
    want = scaled_dot_product_attention(q, k, v)
    if _close(got, scaled_dot_product_attention(q, k, v, scale=1.0)):
        return Feedback(
            False, "you forgot the scale: divide the scores by sqrt(d) before the softmax"
        )
    if _close(got, scaled_dot_product_attention(q, k, v, scale=1.0 / d)):
        return Feedback(
            False,
            "you divided by d; the scores have variance d, so divide by "
            "sqrt(d) to bring their spread back to 1",
        )
    if _close(got, torch.softmax(q @ k.T / math.sqrt(d), dim=0) @ v):
        return Feedback(
            False,
            "your softmax runs over the queries (dim=0); it must run over "
            "the keys (dim=-1) so each query's weights sum to 1",
        )
    bad = compare_tensors(got, want, "scaled_attention(q, k, v)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "softmax(q k^T / sqrt(d)) v: the scale keeps the scores' spread near "
        "1 whatever the head dimension",
    )


def check_dot_product_std(answer: float | None) -> Feedback:
    """Exercise 03.2: the standard deviation of q . k for q, k with d = 64 independent entries
    of mean 0 and variance 1."""
    if answer is None:
        return not_attempted("q . k sums 64 independent products of variance 1 each")
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return Feedback(False, f"answer with a number, got {answer!r}")
    if math.isclose(value, 8.0, rel_tol=1e-3):
        return Feedback(
            True,
            "each product q_i k_i has variance 1, the 64 of them add up to "
            "variance 64, and the standard deviation is sqrt(64) = 8: exactly "
            "what dividing by sqrt(d) undoes",
        )
    if math.isclose(value, 64.0, rel_tol=1e-3):
        return Feedback(False, "64 is the variance; the standard deviation is its square root")
    if math.isclose(value, 1.0, rel_tol=1e-3):
        return Feedback(
            False,
            "1 is the spread after dividing by sqrt(d); before scaling, q . k adds up 64 products",
        )
    return Feedback(
        False,
        f"{answer} is not it: add up the variances of the 64 products, then take the square root",
    )


# -- 04 causal attention ---------------------------------------------------------------------


def check_causal_mask(fn: Callable[[int], torch.Tensor] | None) -> Feedback:
    """Exercise 04.1: ``fn(t)`` returns a boolean (t, t) mask, True where query i may attend
    to key j (j <= i)."""
    hint = "write causal_mask(t): a (t, t) bool tensor, True on and below the diagonal"
    for t in (1, 4, 7):
        got, fb = call_learner(fn, hint, t)
        if fb is not None:
            return fb
        want = causal_mask(t)
        if not isinstance(got, torch.Tensor):
            return Feedback(
                False, f"causal_mask({t}) should return a torch.Tensor, got {type(got).__name__}"
            )
        if got.shape != want.shape:
            return Feedback(
                False,
                f"causal_mask({t}) returned shape {tuple(got.shape)}, expected {tuple(want.shape)}",
            )
        if got.dtype != torch.bool:
            return Feedback(
                False,
                f"causal_mask({t}) has dtype {got.dtype}; return booleans "
                "(True = may attend), e.g. with .bool()",
            )
        got = got.cpu()
        if t > 1 and torch.equal(got, want.T):
            return Feedback(
                False,
                "that is the upper triangle: token 0 would see every later "
                "token. Keep j <= i, the lower triangle (torch.tril)",
            )
        if t > 1 and torch.equal(got, ~want):
            return Feedback(
                False,
                "True marks the blocked keys in your mask; here True means "
                "'may attend' (PyTorch's nn.MultiheadAttention uses the "
                "opposite convention)",
            )
        if torch.equal(got, want & ~torch.eye(t, dtype=torch.bool)):
            return Feedback(
                False,
                "you blocked the diagonal: a token may attend to itself "
                "(j = i), only later tokens are hidden",
            )
        if not torch.equal(got, want):
            return Feedback(
                False,
                f"causal_mask({t}) differs from the lower triangle at "
                f"{int((got != want).sum())} places",
            )
    return Feedback(True, "True on and below the diagonal: query i sees keys 0..i")


def check_causal_softmax(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Feedback:
    """Exercise 04.2: ``fn(scores)`` with scores (t, t) returns causal attention weights: the
    future masked to -inf, then a softmax over the keys."""
    hint = "write causal_softmax(scores): fill the future with -inf, then softmax over dim=-1"
    scores = _inputs(6, 6, seed=40) * 2
    got, fb = call_learner(fn, hint, scores.clone())
    if fb is not None:
        return fb
    allowed = causal_mask(6)
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    if _close(got, torch.softmax(scores, dim=-1) * allowed):
        return Feedback(
            False,
            "you zeroed the future after the softmax without renormalising: "
            "the rows no longer sum to 1. Mask with -inf before the softmax "
            "(or divide each row by its new sum)",
        )
    if _close(got, torch.softmax(scores.masked_fill(~allowed, 0.0), dim=-1)):
        return Feedback(
            False,
            "you set future scores to 0, but exp(0) = 1, so the future still "
            "gets weight; use -inf, which the softmax turns into exactly 0",
        )
    if _close(
        got, torch.softmax(scores.masked_fill(allowed.T.logical_not(), float("-inf")), dim=-1)
    ):
        return Feedback(
            False, "you masked the past instead of the future: query i must see keys j <= i"
        )
    bad = compare_tensors(got, want, "causal_softmax(scores)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "future scores become -inf, the softmax turns them into exact zeros, "
        "and each row still sums to 1",
    )


# -- 06 multi-head attention in code ---------------------------------------------------------


def _split(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def check_split_heads(fn: Callable[[torch.Tensor, int], torch.Tensor] | None) -> Feedback:
    """Exercise 06.1: ``fn(x, n_heads)`` turns (b, t, d) into (b, n_heads, t, d // n_heads),
    head i holding features i * hd .. (i + 1) * hd - 1 of every token."""
    hint = "write split_heads(x, n_heads): view as (b, t, h, d // h), then transpose(1, 2)"
    x = _inputs(2, 5, 12, seed=60)
    for n_heads in (3, 4):
        got, fb = call_learner(fn, hint, x.clone(), n_heads)
        if fb is not None:
            return fb
        want = _split(x, n_heads)
        b, t, d = x.shape
        if _close(got, x.reshape(b, n_heads, t, d // n_heads)):
            return Feedback(
                False,
                "the shape is right but the numbers are not: reshaping "
                "straight to (b, h, t, hd) cuts the token axis into heads. "
                "View as (b, t, h, hd) first, then swap t and h",
            )
        if _close(got, x.view(b, t, d // n_heads, n_heads).permute(0, 3, 1, 2)):
            return Feedback(
                False,
                "you interleaved the features (head i got every h-th "
                "feature); each head owns a contiguous block of hd features",
            )
        bad = compare_tensors(got, want, f"split_heads(x, {n_heads})")
        if bad is not None:
            return bad
    return Feedback(
        True,
        "view (b, t, h, hd) splits each token's features into h blocks; "
        "transpose(1, 2) makes heads a batch axis, so one matmul serves all",
    )


def check_merge_heads(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Feedback:
    """Exercise 06.2: ``fn(y)`` turns per-head outputs (b, h, t, hd) back into (b, t, h * hd),
    the concatenation of the heads for each token."""
    hint = "write merge_heads(y): transpose(1, 2), then reshape to (b, t, h * hd)"
    y = _inputs(2, 3, 5, 4, seed=61)
    got, fb = call_learner(fn, hint, y.clone())
    if fb is not None:
        return fb
    b, h, t, hd = y.shape
    want = y.transpose(1, 2).reshape(b, t, h * hd)
    if _close(got, y.reshape(b, t, h * hd)):
        return Feedback(
            False,
            "the shape is right but you skipped the transpose: without it "
            "tokens and heads get mixed up. transpose(1, 2) first, then "
            "reshape (a view needs .contiguous())",
        )
    bad = compare_tensors(got, want, "merge_heads(y)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "transpose back to (b, t, h, hd) and flatten the last two axes: each "
        "token's vector is its heads' outputs side by side",
    )
