"""One autoregressive generation loop for every model in the course.

A model plugs in by providing two methods:

- ``model(input_ids, caches=None) -> logits``: input_ids (batch, t) int64, logits
  (batch, t, vocab). With ``caches`` (one per layer) the ids are the tokens that follow the
  cached ones; without, they are a whole sequence from position 0.
- ``model.new_caches(batch_size, capacity) -> list`` of empty per-layer caches
  (see ``course_utils.cache``).

The attention track's small decoder, and later the mini-DeepSeek with its latent MLA cache, both
implement them, so cached and uncached decoding are compared by one function.
"""

from __future__ import annotations

from typing import Literal, Protocol, cast, overload

import torch
from torch import Tensor, nn

from .sampling import sample_next_token

__all__ = ["CausalLM", "generate"]


class CausalLM(Protocol):
    def __call__(self, input_ids: Tensor, caches: list | None = None) -> Tensor: ...

    def new_caches(self, batch_size: int, capacity: int) -> list: ...


@overload
def generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = ...,
    top_k: int | None = ...,
    top_p: float | None = ...,
    use_cache: bool = ...,
    eos_token_id: int | None = ...,
    generator: torch.Generator | None = ...,
    return_logits: Literal[False] = ...,
) -> Tensor: ...


@overload
def generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = ...,
    top_k: int | None = ...,
    top_p: float | None = ...,
    use_cache: bool = ...,
    eos_token_id: int | None = ...,
    generator: torch.Generator | None = ...,
    *,
    return_logits: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@overload
def generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    use_cache: bool,
    eos_token_id: int | None,
    generator: torch.Generator | None,
    return_logits: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@overload
def generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = ...,
    top_k: int | None = ...,
    top_p: float | None = ...,
    use_cache: bool = ...,
    eos_token_id: int | None = ...,
    generator: torch.Generator | None = ...,
    return_logits: bool = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Extend each row of ``input_ids`` (batch, t) by up to ``max_new_tokens`` tokens.

    ``temperature=0`` is greedy; otherwise tokens are sampled after top-k / top-p filtering
    (see :func:`course_utils.sampling.sample_next_token`). With ``use_cache`` the prompt is run
    once and each later step feeds only the newest token; without, every step re-runs the whole
    sequence. Rows that emit ``eos_token_id`` keep emitting it, and the loop stops early once
    every row has. Returns (batch, t + new) ids, and with ``return_logits`` also the logits of
    each generated step, (batch, new, vocab).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, t) with t >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    # A model with a training flag is an nn.Module (the protocol itself has no eval/train).
    was_training = getattr(model, "training", False)
    if was_training:
        cast(nn.Module, model).eval()
    batch, prompt_len = input_ids.shape
    ids = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    caches = model.new_caches(batch, prompt_len + max_new_tokens) if use_cache else None
    step_logits = []
    next_input = ids
    try:
        for _ in range(max_new_tokens):
            logits = model(next_input, caches=caches) if use_cache else model(ids)
            last = logits[:, -1, :]
            step_logits.append(last)
            token = sample_next_token(last, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            ids = torch.cat([ids, token[:, None]], dim=1)
            next_input = token[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        if was_training:
            cast(nn.Module, model).train()
    if return_logits:
        vocab = step_logits[0].shape[-1] if step_logits else 0
        stacked = (
            torch.stack(step_logits, dim=1)
            if step_logits
            else ids.new_zeros((batch, 0, vocab), dtype=torch.float32)
        )
        return ids, stacked
    return ids
