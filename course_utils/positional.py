"""Telling attention where each token sits: integer, binary, sinusoidal and rotary positions.

Attention by itself is blind to order: permute the keys and the scores permute with them. The
encodings here put order back in, in the sequence the course builds them:

- :func:`integer_encoding` and :func:`binary_encoding`: the naive first tries (notebook 12);
- :func:`sinusoidal_encoding`: the fixed sines and cosines of "Attention Is All You Need"
  (notebook 13);
- rotary embeddings (RoPE, notebook 14): :func:`rope_inv_freq`, :func:`rope_cos_sin`,
  :func:`apply_rope` in both layouts (``interleaved=True`` rotates the pairs (x0, x1), (x2, x3),
  ... as DeepSeek checkpoints store them; ``False`` rotates (x_i, x_{i+d/2}) as Llama's
  ``rotate_half`` does), and :class:`RotaryEmbedding`, which rotates the tokens at positions
  ``offset .. offset + t - 1`` so cached decoding continues where the cache stopped;
- YaRN (notebook 15), DeepSeek-V3's way to stretch RoPE to a longer context:
  :class:`YarnScaling`, :func:`yarn_inv_freq`, :func:`yarn_get_mscale`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "RotaryEmbedding",
    "YarnScaling",
    "apply_rope",
    "binary_encoding",
    "half_split_to_interleaved",
    "integer_encoding",
    "interleaved_to_half_split",
    "rope_cos_sin",
    "rope_inv_freq",
    "sinusoidal_encoding",
    "yarn_get_mscale",
    "yarn_inv_freq",
]


def _check_even(dim: int, name: str = "dim") -> None:
    if dim < 2 or dim % 2:
        raise ValueError(
            f"{name} must be a positive even number (dimensions rotate in pairs), got {dim}"
        )


# -- naive encodings ----------------------------------------------------------------------


def integer_encoding(seq_len: int, dim: int, normalize: bool = False) -> Tensor:
    """Each position as a raw number, copied into every one of ``dim`` channels.

    Returns (seq_len, dim) float32: row p is all p, or p / (seq_len - 1) with ``normalize``
    (then the same position gets a different value in sequences of different lengths).
    """
    if seq_len < 1 or dim < 1:
        raise ValueError(f"seq_len and dim must be >= 1, got {seq_len}, {dim}")
    pos = torch.arange(seq_len, dtype=torch.float32)
    if normalize:
        pos = pos / max(seq_len - 1, 1)
    return pos[:, None].expand(seq_len, dim).clone()


def binary_encoding(seq_len: int, n_bits: int) -> Tensor:
    """Each position written in binary, least significant bit first.

    Returns (seq_len, n_bits) float32 of 0s and 1s: entry (p, i) is bit i of p. Bit i flips every
    2**i positions, a square-wave cousin of the sinusoids.
    """
    if seq_len < 1 or n_bits < 1:
        raise ValueError(f"seq_len and n_bits must be >= 1, got {seq_len}, {n_bits}")
    if seq_len > 2**n_bits:
        raise ValueError(
            f"{n_bits} bits tell apart only {2**n_bits} positions, not {seq_len}; "
            f"use n_bits >= {math.ceil(math.log2(seq_len))}"
        )
    pos = torch.arange(seq_len)[:, None]
    return ((pos >> torch.arange(n_bits)) & 1).float()


def sinusoidal_encoding(seq_len: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed encoding of Vaswani et al. (2017), section 3.5.

    Returns (seq_len, dim) float32 with PE[p, 2i] = sin(p * w_i), PE[p, 2i + 1] = cos(p * w_i)
    and w_i = base ** (-2i / dim).
    """
    _check_even(dim)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * rope_inv_freq(dim, base)
    pe = torch.empty(seq_len, dim)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe


# -- RoPE -------------------------------------------------------------------------------------


def rope_inv_freq(dim: int, base: float = 10000.0) -> Tensor:
    """The angular speed of each of the dim / 2 rotating pairs: base ** (-2i / dim), (dim // 2,)."""
    _check_even(dim)
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rope_cos_sin(
    positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cos and sin of every (position, pair) angle, each (len(positions), dim // 2), float32.

    ``attention_factor`` multiplies both (YaRN's cos/sin scaling; 1 without YaRN).
    """
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.cos(angles) * attention_factor, torch.sin(angles) * attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = True) -> Tensor:
    """Rotate the last dimension of x pair by pair, by position-dependent angles.

    x: (..., seq, d) with d even; cos, sin: (seq, d // 2). Returns the same shape and dtype as x,
    in the same layout as x.
    ``interleaved=True`` pairs (x0, x1), (x2, x3), ... as DeepSeek checkpoints do;
    ``False`` pairs (x_i, x_{i + d/2}) as Llama's ``rotate_half`` does.
    Pair j turns by angle theta: (a, b) -> (a cos - b sin, a sin + b cos).
    """
    d = x.shape[-1]
    _check_even(d, "the last dimension of x")
    if cos.shape != sin.shape or cos.shape[-1] != d // 2 or cos.shape[0] != x.shape[-2]:
        raise ValueError(
            f"cos and sin must be (seq={x.shape[-2]}, {d // 2}), got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
    else:
        a, b = xf[..., : d // 2], xf[..., d // 2 :]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        out = torch.stack((ra, rb), dim=-1).flatten(-2)
    else:
        out = torch.cat((ra, rb), dim=-1)
    return out.to(x.dtype)


def interleaved_to_half_split(x: Tensor) -> Tensor:
    """Reorder the last dim from (x0, x1, x2, x3, ...) pairs to (x0, x2, ... | x1, x3, ...).

    Applied to the rows of a projection that produces rotary dims, it turns an interleaved
    checkpoint into one that ``apply_rope(..., interleaved=False)`` rotates the same way.
    """
    _check_even(x.shape[-1], "the last dimension of x")
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def half_split_to_interleaved(x: Tensor) -> Tensor:
    """The inverse of :func:`interleaved_to_half_split`."""
    d = x.shape[-1]
    _check_even(d, "the last dimension of x")
    return torch.stack((x[..., : d // 2], x[..., d // 2 :]), dim=-1).flatten(-2)


# -- YaRN -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension as DeepSeek-V2/V3 configure it (``rope_scaling`` in config.json).

    factor: how many times longer the new context is than ``original_max_position_embeddings``.
    beta_fast, beta_slow: pairs turning more than ``beta_fast`` times over the original context
    keep their speed; pairs turning fewer than ``beta_slow`` times are slowed by ``factor``; a
    linear ramp blends the ones between.
    mscale, mscale_all_dim: cos and sin are multiplied by
    ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` and the softmax scale by
    ``get_mscale(factor, mscale_all_dim) ** 2`` (see :func:`yarn_get_mscale`).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"YaRN factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(
                "original_max_position_embeddings must be >= 1, got "
                f"{self.original_max_position_embeddings}"
            )
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})"
            )

    @classmethod
    def from_hf(cls, rope_scaling: Mapping[str, Any]) -> YarnScaling:
        """Build from a config.json ``rope_scaling`` (or transformers' ``rope_parameters``)."""
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind != "yarn":
            raise ValueError(f"only rope_scaling type 'yarn' is supported, got {kind!r}")
        return cls(
            factor=float(rope_scaling["factor"]),
            original_max_position_embeddings=int(rope_scaling["original_max_position_embeddings"]),
            beta_fast=float(rope_scaling.get("beta_fast") or 32),
            beta_slow=float(rope_scaling.get("beta_slow") or 1),
            mscale=float(rope_scaling.get("mscale") or 1.0),
            mscale_all_dim=float(rope_scaling.get("mscale_all_dim") or 0.0),
        )

    @property
    def attention_factor(self) -> float:
        """What YaRN multiplies cos and sin by (1.0 when mscale == mscale_all_dim, as in V2/V3)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_get_mscale(self.factor)

    @property
    def softmax_scale_factor(self) -> float:
        """What YaRN multiplies the softmax scale by: get_mscale(factor, mscale_all_dim) ** 2."""
        if not self.mscale_all_dim:
            return 1.0
        return yarn_get_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(scale) + 1 for scale > 1, else 1 (YaRN's attention temperature)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(n_rotations: float, dim: int, base: float, context: int) -> float:
    # The pair index whose wavelength fits ``n_rotations`` times into ``context`` tokens.
    return dim * math.log(context / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, yarn: YarnScaling) -> Tensor:
    """RoPE speeds after YaRN, (dim // 2,) float32.

    Fast pairs (index below the ``beta_fast`` boundary) keep ``base ** (-2i/dim)``; slow pairs
    (beyond the ``beta_slow`` boundary) are divided by ``factor``; a linear ramp over the pair
    index blends the two between the boundaries (floored and ceiled, as DeepSeek-V3 does).
    """
    extrapolation = rope_inv_freq(dim, base)
    interpolation = extrapolation / yarn.factor
    ctx = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, ctx)), 0)
    high: float = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, ctx)), dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 for fast pairs (extrapolate), 0 for slow ones (interpolate)
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding(nn.Module):
    """RoPE for one head dimension, optionally with YaRN.

    ``rope(x, offset)`` rotates x (..., t, dim) as the tokens at positions
    ``offset .. offset + t - 1``; ``cos_sin(offset, t)`` gives the (t, dim // 2) tables.
    """

    inv_freq: Tensor

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        yarn: YarnScaling | None = None,
        interleaved: bool = True,
    ) -> None:
        super().__init__()
        _check_even(dim, "rotary dim")
        self.dim, self.base, self.yarn, self.interleaved = dim, base, yarn, interleaved
        inv_freq = rope_inv_freq(dim, base) if yarn is None else yarn_inv_freq(dim, base, yarn)
        self.attention_factor = 1.0 if yarn is None else yarn.attention_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, offset: int, length: int) -> tuple[Tensor, Tensor]:
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
        pos = torch.arange(offset, offset + length, device=self.inv_freq.device)
        return rope_cos_sin(pos, self.inv_freq, self.attention_factor)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        cos, sin = self.cos_sin(offset, x.shape[-2])
        return apply_rope(x, cos, sin, self.interleaved)
