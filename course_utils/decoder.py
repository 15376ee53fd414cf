"""A small causal decoder: the attention track's language model.

Token embedding + learned position embedding, ``num_hidden_layers`` pre-norm blocks
(RMSNorm -> :class:`~course_utils.attention.MultiHeadAttention` -> residual, RMSNorm -> SwiGLU ->
residual), a final RMSNorm and a linear head. ``num_key_value_heads`` turns the same model into
MHA, GQA or MQA, and ``kv_lora_rank`` into multi-head latent attention (MLA, notebooks 10-11,
with no RoPE part: positions come from the embedding, as for the others), which is how notebooks
07-09 compare them. It follows the cache protocol, so
:func:`course_utils.generation.generate` decodes it with or without a KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .cache import BaseCache
from .generation import generate
from .layers import RMSNorm, SwiGLU
from .mla import MLAConfig, MultiHeadLatentAttention

__all__ = ["DecoderConfig", "DecoderBlock", "TinyDecoder"]


@dataclass
class DecoderConfig:
    """Sizes of a :class:`TinyDecoder` (names as in Hugging Face configs)."""

    vocab_size: int
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: as many as attention heads (MHA)
    kv_lora_rank: int | None = None  # an int: MLA caching this many numbers per token and layer
    intermediate_size: int | None = None  # None: about 8/3 x hidden, rounded to a multiple of 8
    max_position_embeddings: int = 256
    dropout: float = 0.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.kv_lora_rank is not None:
            if self.kv_lora_rank < 1:
                raise ValueError(
                    f"kv_lora_rank must be >= 1 (or None for MHA/GQA/MQA), got {self.kv_lora_rank}"
                )
            if self.num_key_value_heads not in (None, self.num_attention_heads):
                raise ValueError(
                    f"num_key_value_heads={self.num_key_value_heads} with kv_lora_rank: MLA "
                    "rebuilds every head's keys and values from the latent; leave "
                    "num_key_value_heads unset (or equal to num_attention_heads)"
                )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 8 * ((8 * self.hidden_size // 3 + 7) // 8)
        if self.max_position_embeddings < 1:
            raise ValueError("max_position_embeddings must be >= 1")

    def mla_config(self) -> MLAConfig:
        """The MLA layer a ``kv_lora_rank`` config builds: heads of ``hidden_size /
        num_attention_heads`` for queries, keys and values (as the MHA it replaces), no query
        compression and no RoPE part (``qk_rope_head_dim=0``)."""
        if self.kv_lora_rank is None:
            raise ValueError("mla_config() needs kv_lora_rank; this config builds MHA/GQA/MQA")
        head_dim = self.hidden_size // self.num_attention_heads
        return MLAConfig(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=head_dim,
            qk_rope_head_dim=0,
            v_head_dim=head_dim,
            num_hidden_layers=self.num_hidden_layers,
            max_position_embeddings=self.max_position_embeddings,
        )


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)). (b, t, d) -> same."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: MultiHeadAttention | MultiHeadLatentAttention
        if config.kv_lora_rank is None:
            self.self_attn = MultiHeadAttention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                dropout=config.dropout,
            )
        else:
            if config.dropout:
                raise ValueError(
                    "dropout is not supported with kv_lora_rank (MLA); set dropout=0.0"
                )
            self.self_attn = MultiHeadLatentAttention(config.mla_config())
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # __post_init__ has replaced a None intermediate_size by its default width
        self.mlp = SwiGLU(config.hidden_size, cast(int, config.intermediate_size))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: BaseCache | None = None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cache=cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class TinyDecoder(nn.Module):
    """A GPT-style causal language model. input_ids (b, t) -> logits (b, t, vocab_size)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_caches(self, batch_size: int, capacity: int) -> list[BaseCache]:
        """One empty cache per layer, ``capacity`` tokens each (a ``KVCache``, or MLA's
        ``LatentCache`` when ``kv_lora_rank`` is set)."""
        if capacity > self.config.max_position_embeddings:
            raise ValueError(
                f"capacity={capacity} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; generate fewer tokens or build the "
                "model with a larger max_position_embeddings"
            )
        return [
            cast(DecoderBlock, layer).self_attn.new_cache(batch_size, capacity)
            for layer in self.layers
        ]

    def forward(self, input_ids: Tensor, caches: list[BaseCache] | None = None) -> Tensor:
        return self.forward_with_hidden(input_ids, caches)[0]

    def forward_with_hidden(
        self, input_ids: Tensor, caches: list[BaseCache] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(logits (b, t, vocab), hidden (b, t, hidden)): ``hidden`` is the final hidden state
        after the final norm, what ``lm_head`` reads (a PPO critic reads it too)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got {tuple(input_ids.shape)}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(
                f"caches must hold one cache per layer ({len(self.layers)}), got {len(caches)}"
            )
        start = caches[0].length if caches else 0
        t = input_ids.shape[1]
        if start + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        positions = torch.arange(start, start + t, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=caches[i] if caches is not None else None)
        hidden = self.norm(x)
        return self.lm_head(hidden), hidden

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """See :func:`course_utils.generation.generate` for the arguments."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict:
        return asdict(self.config)
