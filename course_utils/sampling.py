"""From logits to the next token: softmax, temperature, top-k, top-p and sampling.

All functions work on the last dimension of ``logits`` of shape (..., vocab), so one call
handles a whole batch. Filters set removed tokens' logits to ``-inf``; softmax then gives them
probability exactly zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .runtime import check_generator

__all__ = ["softmax", "apply_temperature", "top_k_filter", "top_p_filter", "sample_next_token"]


def softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """exp(z_i - max z) / sum_j exp(z_j - max z): subtracting the max keeps exp from
    overflowing and does not change the result."""
    shifted = logits - logits.amax(dim=dim, keepdim=True)
    exp = shifted.exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature (temperature > 0): below 1 sharpens, above 1 flattens."""
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; use temperature=0 in "
            "sample_next_token for greedy decoding"
        )
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to -inf (ties at the k-th value
    are all kept)."""
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab}, got {k}")
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities sum
    to at least ``p`` (0 < p <= 1), set the rest to -inf. The most likely token always stays."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = softmax(sorted_logits)
    # mass strictly before each token; a token is kept while that mass is still below p
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token id per row of ``logits`` (..., vocab); returns (...) int64.

    ``temperature=0`` is greedy (argmax, filters ignored). Otherwise the logits are divided by
    the temperature, filtered by top-k then top-p, and one id is drawn from the softmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = softmax(logits)
    flat = probs.reshape(-1, probs.shape[-1])
    check_generator(generator, flat.device, "the logits")
    ids = torch.multinomial(flat, 1, generator=generator)
    return ids.reshape(probs.shape[:-1])
