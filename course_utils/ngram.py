"""A count-based language model: the simplest next-token probability engine.

It predicts the next token from the previous ``order - 1`` tokens by counting how often each
continuation followed that context in the training ids. Notebook 00 uses it to show that a
language model is a table of next-token distributions before it is anything else.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CountLanguageModel"]


class CountLanguageModel:
    """Next-token counts for every context of ``order - 1`` tokens (order 2 is a bigram model).

    ``add_k`` smoothing adds k to every count so unseen continuations keep a little probability.
    """

    def __init__(self, vocab_size: int, order: int = 2, add_k: float = 0.0) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if order < 1:
            raise ValueError(f"order must be >= 1 (1 = unigram), got {order}")
        if add_k < 0:
            raise ValueError(f"add_k must be >= 0, got {add_k}")
        self.vocab_size, self.order, self.add_k = vocab_size, order, add_k
        self.counts: defaultdict[tuple[int, ...], Counter[int]] = defaultdict(Counter)

    def fit(self, ids: Sequence[int]) -> CountLanguageModel:
        """Count every (context, next token) pair in ``ids``; returns self."""
        n = self.order - 1
        ids = [int(i) for i in ids]
        for t in range(n, len(ids)):
            self.counts[tuple(ids[t - n : t])][ids[t]] += 1
        return self

    def next_token_probs(self, context: Sequence[int]) -> Tensor:
        """P(next | last ``order - 1`` tokens of ``context``) as a (vocab_size,) float tensor.

        A context never seen in training, with ``add_k == 0``, raises ``ValueError``.
        """
        n = self.order - 1
        if len(context) < n:
            raise ValueError(f"context needs at least {n} tokens for order {self.order}")
        key = tuple(int(i) for i in context[len(context) - n :]) if n else ()
        counts = torch.full((self.vocab_size,), float(self.add_k))
        for token, c in self.counts.get(key, {}).items():
            counts[token] += c
        total = counts.sum()
        if total == 0:
            raise ValueError(
                f"context {key} never occurs in the training ids; use add_k > 0 to smooth"
            )
        return counts / total
