"""The machinery every exercise checker shares: a verdict that says right or wrong, and why.

A checker never raises: it returns a :class:`Feedback` that prints as a one-line verdict, is
truthy when the answer is right, and explains what went wrong otherwise. An exercise left as
``None`` (or raising ``NotImplementedError``) is reported as not attempted yet, so a notebook
with open exercises still runs top to bottom.

Checkers live in one module per track (``basics`` for notebooks 00-01, ...) and each compares
the learner's answer with the canonical code in ``course_utils`` on inputs the learner has not
seen. ``from course_utils.exercises import check_top_p_filter`` works for every checker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Feedback", "not_attempted", "call_learner", "compare_tensors"]


@dataclass(frozen=True)
class Feedback:
    """A checker's verdict: ``correct`` and a message that says why."""

    correct: bool
    message: str
    attempted: bool = True

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        if not self.attempted:
            return f"… not attempted yet: {self.message}"
        return ("✅ Right: " if self.correct else "❌ Not yet: ") + self.message

    def __repr__(self) -> str:
        return str(self)


def not_attempted(hint: str) -> Feedback:
    return Feedback(False, hint, attempted=False)


def call_learner(
    fn: Callable[..., Any] | None, hint: str, *args: Any
) -> tuple[Any, Feedback | None]:
    """Run the learner's function; turn "not written yet" and crashes into feedback."""
    if fn is None:
        return None, not_attempted(hint)
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, not_attempted(hint)
    except Exception as err:  # the learner's code crashed: say how, don't crash the notebook
        return None, Feedback(False, f"your function raised {type(err).__name__}: {err}")


def compare_tensors(got: Any, want: torch.Tensor, what: str, atol: float = 1e-5) -> Feedback | None:
    if not isinstance(got, torch.Tensor):
        return Feedback(False, f"{what} should return a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        return Feedback(
            False, f"{what} returned shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        )
    got = got.detach().float().cpu()
    same_inf = torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    if not same_inf:
        return Feedback(
            False,
            f"{what} removes a different set of tokens than it should "
            "(compare which entries are -inf)",
        )
    if not torch.allclose(got[finite], want[finite], atol=atol):
        err = (got[finite] - want[finite]).abs().max().item()
        return Feedback(False, f"{what} is off by up to {err:.3g} from the right values")
    return None
