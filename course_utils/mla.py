"""Multi-head latent attention (MLA), the attention of DeepSeek-V2 and V3.

Per token, MLA compresses what later queries need into one small latent vector ``c_kv``
(``kv_lora_rank`` numbers) plus one rotary key ``k_pe`` shared by all heads
(``qk_rope_head_dim`` numbers). Only those two are cached. Per head, the keys are
``[k_nope | k_pe]`` with ``k_nope`` and the values ``v`` re-expanded from the latent by
``kv_b_proj``; queries are ``[q_nope | q_pe]``.

Data flow (names are the Hugging Face checkpoint's parameter names)::

    q    = q_b_proj(q_a_layernorm(q_a_proj(x)))      or q_proj(x) when q_lora_rank is None
    c_kv, k_pe = split(kv_a_proj_with_mqa(x))         c_kv -> kv_a_layernorm(c_kv)
    q_pe, k_pe = RoPE(q_pe), RoPE(k_pe)               one k_pe for every head
    k_nope, v  = split_per_head(kv_b_proj(c_kv))      per head [k_nope | v]
    scores     = (q_nope . k_nope + q_pe . k_pe) * (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
    out        = o_proj(softmax(scores) @ v)

Two inference paths give the same numbers: ``absorb=False`` expands K and V per head (naive);
``absorb=True`` folds the key half of ``kv_b_proj`` into the query and applies the value half
after attention, so scores and the weighted sum work on the latent directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import BaseCache, kv_cache_bytes
from .layers import RMSNorm
from .positional import RotaryEmbedding, YarnScaling

__all__ = [
    "REAL_CONFIGS",
    "LatentCache",
    "MLAConfig",
    "MultiHeadLatentAttention",
    "cache_size_table",
    "rope_rows_to_half_split",
    "latent_cache_bytes",
]

#: DeepSeek's latent norms use eps 1e-6 whatever ``rms_norm_eps`` says (as both the released
#: inference code and transformers do).
LATENT_NORM_EPS = 1e-6


@dataclass
class MLAConfig:
    """The attention part of a DeepSeek config, with the Hugging Face key names.

    ``q_lora_rank=None`` projects queries in one step (DeepSeek-V2-Lite); an int compresses them
    through a ``q_lora_rank``-wide normed latent (V2, V3). ``qk_rope_head_dim=0`` gives MLA
    without positions (notebook 11). ``rope_scaling`` is a config.json-style dict (YaRN) or None.
    ``rope_interleave`` says how the checkpoint lays out rotary dims (True for DeepSeek's).
    """

    hidden_size: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    num_hidden_layers: int = 1
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "num_hidden_layers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(
                f"q_lora_rank must be >= 1 or None (no query compression), got {self.q_lora_rank}"
            )
        if self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be even and >= 0 (RoPE turns pairs of "
                f"dims; 0 means no RoPE), got {self.qk_rope_head_dim}"
            )
        if self.rope_scaling is not None:
            YarnScaling.from_hf(self.rope_scaling)  # validates

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> MLAConfig:
        """From a config.json dict (or ``PretrainedConfig.to_dict()``); other keys are ignored.

        transformers 5 spells RoPE settings ``rope_parameters`` (theta inside); Hub files use
        ``rope_theta`` + ``rope_scaling``. Both are understood.
        """
        names = {f.name for f in fields(cls)} - {"rope_scaling", "rope_theta"}
        kwargs = {k: config[k] for k in names if k in config}
        if kwargs.get("rope_interleave") is None:
            kwargs.pop("rope_interleave", None)
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = dict(rope) if kind not in (None, "default") else None
        return cls(**kwargs, rope_theta=float(theta), rope_scaling=scaling)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> YarnScaling | None:
        return None if self.rope_scaling is None else YarnScaling.from_hf(self.rope_scaling)

    @property
    def softmax_scale(self) -> float:
        """(qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times mscale**2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        return scale if self.yarn is None else scale * self.yarn.softmax_scale_factor


class LatentCache(BaseCache):
    """MLA's inference cache: the normed latent and the rotated shared key, nothing per head.

    Buffers ``c_kv`` (batch, capacity, kv_lora_rank) and ``k_pe`` (batch, capacity,
    qk_rope_head_dim): ``kv_lora_rank + qk_rope_head_dim`` numbers per token per layer.
    """

    def __init__(
        self,
        batch_size: int,
        capacity: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, capacity)
        if kv_lora_rank < 1 or qk_rope_head_dim < 0:
            raise ValueError(
                f"kv_lora_rank must be >= 1 and qk_rope_head_dim >= 0, got "
                f"{kv_lora_rank}, {qk_rope_head_dim}"
            )
        dtype = dtype or torch.get_default_dtype()
        self.c_kv = torch.zeros(batch_size, capacity, kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(batch_size, capacity, qk_rope_head_dim, device=device, dtype=dtype)

    def buffers(self) -> tuple[Tensor, ...]:
        return (self.c_kv, self.k_pe)

    def append(self, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Store c_kv (batch, t, kv_lora_rank) and k_pe (batch, t, qk_rope_head_dim).

        Returns views of everything cached so far: (batch, length, ...) each.
        """
        r, dr = self.c_kv.shape[-1], self.k_pe.shape[-1]
        if (
            c_kv.dim() != 3
            or k_pe.dim() != 3
            or c_kv.shape[-1] != r
            or k_pe.shape[-1] != dr
            or (c_kv.shape[:2] != k_pe.shape[:2])
        ):
            raise ValueError(
                f"c_kv must be (batch, t, {r}) and k_pe (batch, t, {dr}), got "
                f"{tuple(c_kv.shape)} and {tuple(k_pe.shape)}"
            )
        start, end = self._reserve(c_kv.shape[1], c_kv.shape[0])
        self.c_kv[:, start:end] = c_kv
        self.k_pe[:, start:end] = k_pe
        return self.c_kv[:, :end], self.k_pe[:, :end]


class MultiHeadLatentAttention(nn.Module):
    """MLA with decoupled RoPE, exactly as DeepSeek-V2/V3 compute it.

    ``forward(x, cache=None, absorb=False)``: x (batch, t, hidden_size) -> (batch, t,
    hidden_size). With a :class:`LatentCache` the tokens of x sit at positions
    ``cache.length ..``; they are appended and attend causally to everything cached.
    ``absorb=True`` computes the same result through the latent (weight absorption).
    """

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        c = self.config = config
        h, dn, dr, dv = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * (dn + dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + dr, bias=c.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (dn + dv), bias=False)
        self.o_proj = nn.Linear(h * dv, c.hidden_size, bias=c.attention_bias)
        self.rotary = RotaryEmbedding(dr, c.rope_theta, c.yarn, c.rope_interleave) if dr else None
        self.softmax_scale = c.softmax_scale

    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LatentCache:
        c = self.config
        device = device if device is not None else self.kv_b_proj.weight.device
        return LatentCache(
            batch_size,
            capacity,
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            device,
            dtype or self.kv_b_proj.weight.dtype,
        )

    def _kv_b_per_head(self) -> tuple[Tensor, Tensor]:
        """kv_b_proj split per head: W_uk (heads, qk_nope_head_dim, kv_lora_rank) and
        W_uv (heads, v_head_dim, kv_lora_rank)."""
        c = self.config
        w = self.kv_b_proj.weight.view(
            c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank
        )
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]

    def project(self, x: Tensor, offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The per-token part: q_nope (b, h, t, dn), q_pe (b, h, t, dr) rotated,
        c_kv (b, t, kv_lora_rank) normed and k_pe (b, t, dr) rotated."""
        c = self.config
        b, t, _ = x.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, c.num_attention_heads, c.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
        c_kv = self.kv_a_layernorm(c_kv)
        if self.rotary is not None:
            q_pe, k_pe = self.rotary(q_pe, offset), self.rotary(k_pe, offset)
        return q_nope, q_pe, c_kv, k_pe

    def forward(self, x: Tensor, cache: LatentCache | None = None, absorb: bool = False) -> Tensor:
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"x must be (batch, t, {c.hidden_size}), got {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, LatentCache):
            raise ValueError(
                f"MLA needs a LatentCache (from new_cache), got {type(cache).__name__}"
            )
        b, t, _ = x.shape
        offset = 0 if cache is None else cache.length
        q_nope, q_pe, c_kv, k_pe = self.project(x, offset)
        if cache is not None:
            c_kv, k_pe = cache.append(c_kv.to(cache.c_kv.dtype), k_pe.to(cache.k_pe.dtype))
            c_kv, k_pe = c_kv.to(x.dtype), k_pe.to(x.dtype)
        s = c_kv.shape[1]
        # Rotary part of the scores: one shared key per token, broadcast over the heads.
        scores_pe = q_pe @ k_pe[:, None].transpose(-1, -2)  # (b, h, t, s)
        w_uk, w_uv = self._kv_b_per_head()
        if absorb:
            q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # fold W_uk into the query
            scores_nope = q_latent @ c_kv[:, None].transpose(-1, -2)
        else:
            kv = self.kv_b_proj(c_kv).view(b, s, c.num_attention_heads, -1).transpose(1, 2)
            k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
            scores_nope = q_nope @ k_nope.transpose(-1, -2)
        scores = (scores_nope + scores_pe) * self.softmax_scale
        # Query i sits at position offset + i and sees keys 0 .. offset + i.
        q_pos = torch.arange(offset, offset + t, device=x.device)[:, None]
        future = torch.arange(s, device=x.device)[None, :] > q_pos
        scores = scores.masked_fill(future, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).to(x.dtype)
        if absorb:
            ctx_latent = probs @ c_kv[:, None]  # (b, h, t, kv_lora_rank)
            out = torch.einsum("bhtr,hvr->bhtv", ctx_latent, w_uv)  # then apply W_uv per head
        else:
            out = probs @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def rope_rows_to_half_split(
    state_dict: Mapping[str, Tensor], config: MLAConfig
) -> dict[str, Tensor]:
    """Convert MLA weights whose rotary dims are interleaved (DeepSeek checkpoints) to the
    half-split layout, by permuting the rows that produce rotary dims.

    Rows of ``q_proj``/``q_b_proj`` (the last ``qk_rope_head_dim`` of each head) and of
    ``kv_a_proj_with_mqa`` (its last ``qk_rope_head_dim``) are reordered evens-then-odds, so a
    module with ``rope_interleave=False`` computes the same outputs. Other tensors are copied.
    """
    h, dn, dr = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    out = {k: v.clone() for k, v in state_dict.items()}
    if dr == 0:
        return out
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])
    for name in ("q_proj.weight", "q_b_proj.weight"):
        if name in out:
            w = out[name].view(h, dn + dr, -1)
            w[:, dn:] = w[:, dn:][:, perm]
    w = out["kv_a_proj_with_mqa.weight"]
    w[config.kv_lora_rank :] = w[config.kv_lora_rank :][perm]
    if "kv_a_proj_with_mqa.bias" in out:
        b = out["kv_a_proj_with_mqa.bias"]
        b[config.kv_lora_rank :] = b[config.kv_lora_rank :][perm]
    return out


# -- memory accounting ------------------------------------------------------------------------


def latent_cache_bytes(
    num_layers: int,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    seq_len: int = 1,
    batch_size: int = 1,
    bytes_per_element: int = 2,
) -> int:
    """Bytes of MLA's cache: layers x (kv_lora_rank + qk_rope_head_dim) x tokens x batch x
    element size, with no factor 2 (keys and values are both rebuilt from the one latent, and
    the one rotary key is shared by all heads). The argument order of
    :func:`course_utils.cache.kv_cache_bytes`, the K/V cache's formula; with the defaults it is
    the bytes per token of the whole model."""
    for name, value in (
        ("num_layers", num_layers),
        ("kv_lora_rank", kv_lora_rank),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("bytes_per_element", bytes_per_element),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if qk_rope_head_dim < 0:
        raise ValueError(f"qk_rope_head_dim must be >= 0, got {qk_rope_head_dim}")
    return num_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch_size * bytes_per_element


#: Attention shapes of real models, from the public config.json files on the Hugging Face Hub
#: (deepseek-ai/DeepSeek-V2 and deepseek-ai/DeepSeek-V3). The Llama row is a Llama-3-70B-like
#: baseline (80 layers, 64 query heads, 8 KV heads of 128), labelled as such.
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "DeepSeek-V2 (236B)": {
        "hidden_size": 5120,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_theta": 10000.0,
        "max_position_embeddings": 163840,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    },
    "DeepSeek-V3 (671B)": {
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_theta": 10000.0,
        "max_position_embeddings": 163840,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    "Llama-3-70B-like (GQA baseline)": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
}


def cache_size_table(
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    context: int = 128 * 1024,
    dtype_bytes: int = 2,
    gqa_groups: int = 8,
) -> list[dict[str, Any]]:
    """Cache sizes per token and for ``context`` tokens, for MHA/GQA/MQA/MLA on each config.

    MHA/GQA/MQA use the config's query heads with head_dim 128 (``head_dim`` if given) for both
    K and V; GQA uses ``num_key_value_heads`` if the config has it, else ``gqa_groups`` KV heads.
    MLA rows appear only for configs with a ``kv_lora_rank``. One row per (model, scheme) with
    elements and bytes per token per layer, bytes per token over all layers, and GiB for
    ``context`` tokens over all layers.
    """
    rows = []
    for name, cfg in (configs or REAL_CONFIGS).items():
        layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim", 128)
        schemes = {
            "MHA": heads,
            f"GQA ({cfg.get('num_key_value_heads', gqa_groups)} KV heads)": cfg.get(
                "num_key_value_heads", gqa_groups
            ),
            "MQA": 1,
        }
        per_layer = {
            k: kv_cache_bytes(1, n, head_dim, bytes_per_element=dtype_bytes)
            for k, n in schemes.items()
        }
        if "kv_lora_rank" in cfg:
            per_layer["MLA"] = latent_cache_bytes(
                1, cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], bytes_per_element=dtype_bytes
            )
        for scheme, b in per_layer.items():
            rows.append(
                {
                    "model": name,
                    "scheme": scheme,
                    "elements_per_token_per_layer": b // dtype_bytes,
                    "bytes_per_token_per_layer": b,
                    "bytes_per_token": b * layers,
                    "GiB_at_context": b * layers * context / 2**30,
                }
            )
    return rows
