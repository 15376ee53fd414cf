"""Exercise checkers for notebook 19: multi-token prediction and speculative decoding."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ._feedback import Feedback, call_learner

__all__ = ["check_depth_targets", "check_tokens_per_forward"]


def _want_targets(seq: torch.Tensor, k: int) -> torch.Tensor:
    return seq[k + 1 :]


def check_depth_targets(fn: Callable[[torch.Tensor, int], torch.Tensor] | None) -> Feedback:
    """Exercise 19.1: ``fn(seq (n,), k) -> (n - k - 1,)``: the tokens that MTP depth k is
    trained to predict at positions 0, 1, ... (depth 0 is the main next-token head)."""
    hint = "write depth_targets(seq, k): what depth k predicts at each position i"
    seq = torch.tensor([5, 3, 9, 1, 7, 2, 8, 4, 6])
    for k in (0, 1, 2, 3):
        got, fb = call_learner(fn, hint, seq.clone(), k)
        if fb is not None:
            return fb
        want = _want_targets(seq, k)
        if not isinstance(got, torch.Tensor):
            return Feedback(
                False, f"depth_targets should return a torch.Tensor, got {type(got).__name__}"
            )
        got = got.detach().cpu().long().flatten()
        if got.shape == seq[k:].shape and torch.equal(got, seq[k:]):
            return Feedback(
                False,
                f"with k={k} you returned seq[k:], one step too early: depth "
                "0 (the main head) already predicts the next token x[i+1], so "
                "depth k predicts x[i+k+1]",
            )
        if got.shape != want.shape:
            return Feedback(
                False,
                f"with k={k} and {seq.numel()} tokens there are "
                f"{want.numel()} positions with a target that far ahead, "
                f"you returned {got.numel()} tokens",
            )
        if not torch.equal(got, want):
            return Feedback(
                False,
                f"with k={k} the targets should be x[i+k+1] for each "
                f"position i; you returned {got.tolist()}",
            )
    return Feedback(
        True,
        "depth k at position i predicts x[i+k+1], so its targets are seq[k+1:] "
        "and every depth has one position fewer than the one before",
    )


def _want_tpf(accepted: Sequence[bool]) -> float:
    return (1 + len(accepted) + sum(bool(a) for a in accepted)) / (1 + len(accepted))


def check_tokens_per_forward(fn: Callable[[Sequence[bool]], float] | None) -> Feedback:
    """Exercise 19.2: ``fn(accepted) -> float``: tokens per main-model forward of one
    speculative decode, given whether each verify step accepted its draft. The prefill forward
    yields one token; each verify forward yields one token plus the draft when it is accepted
    (ignore the ``max_new_tokens`` cut-off)."""
    hint = "write tokens_per_forward(accepted): new tokens divided by forward passes"
    cases = [[True, False, True, True], [False, False], [True] * 5, []]
    for accepted in cases:
        got, fb = call_learner(fn, hint, list(accepted))
        if fb is not None:
            return fb
        try:
            value = float(got)
        except (TypeError, ValueError):
            return Feedback(
                False, f"tokens_per_forward should return a number, got {type(got).__name__}"
            )
        want = _want_tpf(accepted)
        if math.isclose(value, want, rel_tol=1e-6):
            continue
        if accepted and math.isclose(value, 1 + sum(accepted) / len(accepted), rel_tol=1e-6):
            return Feedback(
                False,
                f"for {accepted} you returned 1 + acceptance rate = "
                f"{value:.3f}; that forgets the prefill forward, which yields "
                f"one token and has no draft to check: the answer is {want:.3f}",
            )
        return Feedback(
            False,
            f"for accepted={accepted} the decode made "
            f"{1 + len(accepted) + sum(accepted)} tokens in "
            f"{1 + len(accepted)} forwards; you returned {value:.3f}",
        )
    return Feedback(
        True,
        "each forward yields 1 token plus 1 per accepted draft; with "
        "acceptance a the ratio tends to 1 + a for long outputs",
    )
