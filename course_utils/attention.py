"""Attention, from the bare formula to grouped-query attention with a KV cache.

The pieces, in the order the notebooks build them:

- :func:`scaled_dot_product_attention`: softmax(q k^T * scale + mask) v, written out, with an
  optional causal mask, dropout on the weights, and the weights returned for plotting.
- :class:`SelfAttention`: trainable W_q, W_k, W_v for one head (notebook 03).
- :class:`CausalSelfAttention`: the same with the "no peeking" mask and dropout (notebook 04).
- :class:`MultiHeadAttention`: batched heads; its ``n_kv_heads`` covers multi-head
  (``= n_heads``), grouped-query (a divisor of ``n_heads``) and multi-query (``= 1``)
  attention, and it follows the cache protocol of ``course_utils.cache`` (notebooks 06-09).

Shapes: b batch, t query tokens, s key tokens, h heads, d head dimension.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .runtime import check_generator

__all__ = [
    "scaled_dot_product_attention",
    "causal_mask",
    "SelfAttention",
    "CausalSelfAttention",
    "MultiHeadAttention",
    "repeat_kv",
]


def causal_mask(t: int, s: int | None = None, device: torch.device | None = None) -> Tensor:
    """Boolean (t, s) mask, True where query i may attend to key j.

    The t queries are the last t of the s positions (bottom-right aligned), so query i sits at
    position s - t + i and sees keys 0 .. s - t + i. With t == s this is the lower triangle;
    with a KV cache (t new tokens after s - t cached ones) it is what decoding needs.
    """
    s = t if s is None else s
    if s < t:
        raise ValueError(f"a causal mask needs at least as many keys as queries, got t={t}, s={s}")
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = ...,
    is_causal: bool = ...,
    dropout_p: float = ...,
    scale: float | None = ...,
    return_weights: Literal[False] = ...,
    generator: torch.Generator | None = ...,
) -> Tensor: ...


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = ...,
    is_causal: bool = ...,
    dropout_p: float = ...,
    scale: float | None = ...,
    *,
    return_weights: Literal[True],
    generator: torch.Generator | None = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    return_weights: Literal[True],
    generator: torch.Generator | None = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = ...,
    is_causal: bool = ...,
    dropout_p: float = ...,
    scale: float | None = ...,
    return_weights: bool = ...,
    generator: torch.Generator | None = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v over the last two dimensions.

    q: (..., t, d), k: (..., s, d), v: (..., s, d_v) -> (..., t, d_v).
    ``scale`` defaults to 1 / sqrt(d). ``mask`` is boolean (True = may attend) or additive
    float, broadcastable to (..., t, s). ``is_causal`` adds the bottom-right aligned causal mask
    of :func:`causal_mask` (identical to PyTorch's when t == s). ``dropout_p`` drops attention
    weights (rescaling the rest) — pass 0 at inference. With ``return_weights`` also returns the
    (..., t, s) weights after softmax and before dropout.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k need the same last dimension, got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v need the same number of tokens, got {k.shape[-2]} and {v.shape[-2]}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    t, s = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., t, s)
    if mask is not None:
        if mask.dim() < 2 or mask.shape[-2] not in (1, t) or mask.shape[-1] not in (1, s):
            raise ValueError(
                f"mask must broadcast to (..., {t}, {s}) (queries, keys), got shape "
                f"{tuple(mask.shape)}"
            )
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    if is_causal:
        scores = scores.masked_fill(~causal_mask(t, s, device=q.device), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    dropped = weights
    if dropout_p > 0.0:
        check_generator(generator, weights.device, "the attention weights")
        keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
        dropped = weights * keep / (1.0 - dropout_p)
    out = dropped @ v
    return (out, weights) if return_weights else out


def _check_linear_dims(d_in: int, d_out: int) -> None:
    if d_in < 1 or d_out < 1:
        raise ValueError(f"d_in and d_out must be >= 1, got {d_in} and {d_out}")


class SelfAttention(nn.Module):
    """One head of self-attention with trainable projections W_q, W_k, W_v.

    x: (b, t, d_in) -> (b, t, d_out). Every token attends to every token (no mask).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        _check_linear_dims(d_in, d_out)
        self.W_q = nn.Linear(d_in, d_out, bias=bias)
        self.W_k = nn.Linear(d_in, d_out, bias=bias)
        self.W_v = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        q, k, v = self.W_q(x), self.W_k(x), self.W_v(x)
        return scaled_dot_product_attention(q, k, v, return_weights=return_weights)


class CausalSelfAttention(SelfAttention):
    """One head of causal self-attention: token i sees tokens 0..i only; dropout on weights.

    x: (b, t, d_in) -> (b, t, d_out).
    """

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(d_in, d_out, bias)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        q, k, v = self.W_q(x), self.W_k(x), self.W_v(x)
        p = self.dropout if self.training else 0.0
        return scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=p, return_weights=return_weights
        )


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(b, h_kv, s, d) -> (b, h_kv * n_rep, s, d): KV head j serves query heads
    j * n_rep .. j * n_rep + n_rep - 1."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with ``n_kv_heads`` key/value heads (MHA, GQA or MQA).

    x: (b, t, d_model) -> (b, t, d_model). Query head i uses KV head i // (n_heads / n_kv_heads).
    Projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` follow Hugging Face names.
    With a :class:`~course_utils.cache.KVCache` from :meth:`new_cache`, ``x`` holds the tokens
    after the cached ones; their keys and values are appended to the cache.
    Set ``keep_weights = True`` to keep the last attention weights (b, h, t, s) in
    ``last_weights`` for plotting.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        causal: bool = True,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(
                f"n_heads={n_heads} must divide d_model={d_model}; pick a head count that "
                f"divides it (e.g. {[h for h in (1, 2, 4, 8, 16) if d_model % h == 0]})"
            )
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (n_heads for MHA, "
                "1 for MQA, a divisor in between for GQA)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout, self.causal = dropout, causal
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.keep_weights = False
        self.last_weights: Tensor | None = None

    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for this layer: (batch, n_kv_heads, capacity, head_dim) K and V."""
        weight = self.k_proj.weight
        return KVCache(
            batch_size,
            capacity,
            self.n_kv_heads,
            self.head_dim,
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )

    def _split(self, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (b, n, t, d)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, tokens, {self.d_model}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        q = self._split(self.q_proj(x), self.n_heads)
        k = self._split(self.k_proj(x), self.n_kv_heads)
        v = self._split(self.v_proj(x), self.n_kv_heads)
        if cache is not None:
            k, v = cache.append(k, v)  # all keys/values so far: (b, h_kv, s, d)
        group = self.n_heads // self.n_kv_heads
        p = self.dropout if self.training else 0.0
        s = k.shape[2]
        if self.keep_weights:
            # the teaching path: copy each KV head to the query heads it serves
            out, weights = scaled_dot_product_attention(
                q,
                repeat_kv(k, group),
                repeat_kv(v, group),
                is_causal=self.causal,
                dropout_p=p,
                return_weights=True,
            )
            self.last_weights = weights.detach()
        else:
            # the fast path: PyTorch's fused kernel, with the `group` query heads that share a
            # KV head stacked as extra query rows, so K and V are never copied (tests prove it
            # equals the teaching path).
            rows = q.reshape(b, self.n_kv_heads, group * t, self.head_dim)
            mask, plain_causal = None, self.causal and t > 1 and group == 1 and t == s
            if self.causal and t > 1 and not plain_causal:
                mask = causal_mask(t, s, device=x.device).repeat(group, 1)
            out = F.scaled_dot_product_attention(
                rows, k, v, attn_mask=mask, dropout_p=p, is_causal=plain_causal
            )
            out = out.view(b, self.n_heads, t, self.head_dim)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)
