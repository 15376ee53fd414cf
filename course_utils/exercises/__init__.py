"""Checkers for the notebooks' exercises: each says right or wrong, and why.

A checker never raises: it returns a :class:`Feedback` that prints as a one-line verdict, is
truthy when the answer is right, and explains what went wrong otherwise. One module per track;
every checker is importable from here.
"""

from ._feedback import Feedback, call_learner, compare_tensors, not_attempted
from .attention import *  # noqa: F403  notebooks 02-06
from .basics import *  # noqa: F403  notebooks 00-01
from .fp8 import *  # noqa: F403  notebook 20
from .gpu import *  # noqa: F403  notebook 24
from .kv_cache import *  # noqa: F403  notebooks 05, 07-09
from .mini_deepseek import *  # noqa: F403  notebook 21
from .moe import *  # noqa: F403  notebooks 16-18
from .positions_mla import *  # noqa: F403  notebooks 10-15
from .post_training import *  # noqa: F403  notebooks 22-23

__all__ = ["Feedback", "call_learner", "compare_tensors", "not_attempted"]
