"""Inference caches: what an attention layer keeps from earlier tokens during decoding.

Every attention module in the course follows one protocol, so one generation loop
(:func:`course_utils.generation.generate`) drives them all:

- ``attn.new_cache(batch_size, capacity, device=None, dtype=None)`` returns an empty cache;
- ``attn(x, cache=cache)`` treats ``x`` (batch, t, d_model) as the tokens at positions
  ``cache.length .. cache.length + t - 1``, appends what it must keep, and attends over the
  cached tokens and the new ones (``cache=None``: a full sequence from position 0).

:class:`KVCache` holds keys and values per KV head (MHA, GQA, MQA); ``course_utils.mla`` has the
latent cache of multi-head latent attention. Both are preallocated to ``capacity`` tokens, count
``bytes_per_token``, refuse a write past capacity, and ``reset()`` between prompts.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BaseCache", "KVCache", "kv_cache_bytes"]


class BaseCache:
    """What every cache shares: a filled ``length``, a ``capacity`` and its buffers."""

    def __init__(self, batch_size: int, capacity: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 token, got {capacity}")
        self.batch_size = batch_size
        self.capacity = capacity
        self.length = 0

    def buffers(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    @property
    def bytes_per_token(self) -> int:
        """Bytes this cache stores for one token of one sequence (one layer)."""
        return sum(b[0, ..., 0, :].numel() * b.element_size() for b in self.buffers())

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole cache (all sequences, full capacity)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def reset(self) -> None:
        """Forget every cached token (the buffers stay allocated) before a new prompt."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens (speculative decoding rolls back the
        draft tokens the model rejected). The buffers past ``length`` are simply overwritten
        by the next append."""
        if not isinstance(length, int) or not 0 <= length <= self.length:
            raise ValueError(
                f"length must be an int in [0, {self.length}] (the tokens cached "
                f"now), got {length!r}"
            )
        self.length = length

    def _reserve(self, n_new: int, batch_size: int) -> tuple[int, int]:
        if batch_size != self.batch_size:
            raise ValueError(
                f"cache was made for batch_size={self.batch_size}, got a batch of {batch_size}"
            )
        start, end = self.length, self.length + n_new
        if end > self.capacity:
            raise ValueError(
                f"cache capacity exceeded: it holds {self.capacity} tokens, {self.length} are "
                f"used and {n_new} more were written; make the cache with a larger capacity "
                "or call reset() before a new prompt"
            )
        self.length = end
        return start, end


class KVCache(BaseCache):
    """Keys and values of one attention layer, preallocated to ``capacity`` tokens.

    Buffers ``k`` and ``v`` have shape (batch, n_kv_heads, capacity, head_dim). With
    ``n_kv_heads`` equal to the query heads this is the MHA cache; fewer is GQA; one is MQA.
    """

    def __init__(
        self,
        batch_size: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, capacity)
        if n_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"n_kv_heads and head_dim must be >= 1, got {n_kv_heads}, {head_dim}")
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def buffers(self) -> tuple[Tensor, ...]:
        return (self.k, self.v)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (batch, n_kv_heads, t, head_dim) after the cached ones.

        Returns views of all cached keys and values so far, (batch, n_kv_heads, length, head_dim).
        """
        if (
            k.shape != v.shape
            or k.dim() != 4
            or k.shape[1] != self.k.shape[1]
            or (k.shape[3] != self.k.shape[3])
        ):
            raise ValueError(
                f"k and v must both be (batch, {self.k.shape[1]}, t, {self.k.shape[3]}), "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        start, end = self._reserve(k.shape[2], k.shape[0])
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def kv_cache_bytes(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int = 1,
    batch_size: int = 1,
    bytes_per_element: int = 2,
) -> int:
    """Bytes of a K/V cache: 2 (K and V) x layers x KV heads x head_dim x tokens x batch x
    element size. ``bytes_per_element`` is 2 for fp16/bf16 (the usual serving dtype), 4 for
    fp32. With the defaults it is the bytes per token of the whole model."""
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("bytes_per_element", bytes_per_element),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_element
