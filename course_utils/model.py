"""The mini-DeepSeek: embedding, MLA + (dense or MoE) blocks, final norm, output head.

The module tree mirrors the Hugging Face DeepSeek-V2/V3 checkpoints name for name, so
``state_dict()`` keys are exactly the Hub's::

    model.embed_tokens.weight                                  (vocab, hidden)
    model.layers.{i}.input_layernorm.weight                    RMSNorm before attention
    model.layers.{i}.self_attn.*                               MultiHeadLatentAttention (MLA)
    model.layers.{i}.post_attention_layernorm.weight           RMSNorm before the feed-forward
    model.layers.{i}.mlp.{gate,up,down}_proj.weight            dense SwiGLU (i < first_k_dense)
    model.layers.{i}.mlp.gate.weight / .e_score_correction_bias   router (bias: V3 only)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   routed experts
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight
    model.norm.weight                                          final RMSNorm
    lm_head.weight                                             (vocab, hidden); tied: the embedding

Each block is pre-norm: ``h = h + attn(norm(h))``, then ``h = h + mlp(norm(h))``. Logits are
``lm_head(norm(h_L))``. The model follows the course's cache protocol, so
:func:`course_utils.generation.generate` decodes it with MLA's latent cache.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .config import DeepSeekConfig
from .generation import generate
from .layers import RMSNorm, SwiGLU
from .mla import LatentCache, MultiHeadLatentAttention
from .moe import DeepSeekMoE, DeepSeekV3Router

__all__ = [
    "DeepSeekDecoderLayer",
    "DeepSeekForCausalLM",
    "DeepSeekModel",
    "FP32_BUFFERS",
    "MTPLayer",
]

#: Buffers that stay float32 when the model is cast to a lower precision: the V3 router's
#: correction bias (its 0.001 steps vanish in bfloat16), the load counts it is updated from,
#: and RoPE's inverse frequencies (positions times frequencies need float32 precision).
FP32_BUFFERS = ("e_score_correction_bias", "load_since_update", "inv_freq")


class DeepSeekDecoderLayer(nn.Module):
    """One pre-norm block: x + MLA(RMSNorm(x)), then + FFN(RMSNorm(x)).

    The FFN is a dense SwiGLU of width ``intermediate_size`` for layers below
    ``first_k_dense_replace`` and a :class:`DeepSeekMoE` after. x: (batch, t, hidden) -> same.
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int, moe: bool | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config.mla_config())
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if moe is None:
            moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            DeepSeekMoE(config.moe_config())
            if moe
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x: Tensor, cache: LatentCache | None = None, absorb: bool = False) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, absorb=absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(DeepSeekDecoderLayer):
    """One DeepSeek-V3 multi-token-prediction module (technical report, section 2.2).

    Depth k combines the previous depth's hidden state h (batch, t, hidden) with the embedding
    of the token k steps ahead, e (batch, t, hidden):
    ``shared_head.norm(block(eh_proj(concat(enorm(e), hnorm(h)))))``, which the shared output
    head reads and the next depth takes as its h. For depth 1, h is the main model's final
    hidden state, after its final norm (what ``lm_head`` reads). This is what transformers'
    ``MtpLayer`` computes for ``generate(use_mtp=True)`` (its ``post_norm`` is the release's
    ``shared_head.norm``), and what vLLM's DeepSeek MTP computes. The concatenation puts the
    **embedding first**, as the released V3 weights do (the paper's equation 21 writes the
    hidden state first; the ``eh_proj`` columns of the checkpoint follow the embedding-first
    order). The block is a full decoder layer, MoE when
    the model has MoE layers. Names follow the release: ``enorm``, ``hnorm``, ``eh_proj``,
    ``shared_head.norm``, and the block's own ``self_attn`` / ``mlp`` / norms.
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, moe=config.num_moe_layers > 0)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, config.rms_norm_eps)

    # An MTP depth also reads the next tokens' embeddings, so its forward takes one more
    # argument than the decoder layer it extends.
    def forward(  # type: ignore[override]
        self,
        hidden: Tensor,
        next_embeds: Tensor,
        cache: LatentCache | None = None,
        absorb: bool = False,
    ) -> Tensor:
        """hidden, next_embeds: (batch, t, hidden) -> this depth's hidden (batch, t, hidden),
        after ``shared_head.norm``: ``lm_head`` of it gives the depth's logits."""
        if hidden.shape != next_embeds.shape:
            raise ValueError(
                f"hidden and next_embeds must have one shape, got "
                f"{tuple(hidden.shape)} and {tuple(next_embeds.shape)}"
            )
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        norm = cast(RMSNorm, self.shared_head.norm)  # set in __init__ on a plain nn.Module
        return norm(super().forward(x, cache, absorb))


class DeepSeekModel(nn.Module):
    """The trunk: token embedding, the decoder layers, the final norm (``model.*`` keys).

    ``forward(input_ids, caches=None)`` returns the final hidden states **after** the final
    norm, (batch, t, hidden), as transformers' ``DeepseekV3Model`` does;
    :meth:`residual_stream` returns them before it.
    """

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepSeekDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def residual_stream(
        self, input_ids: Tensor, caches: list[LatentCache] | None = None, absorb: bool = False
    ) -> Tensor:
        """input_ids (batch, t) -> the residual stream after the last layer, before the final
        norm, (batch, t, hidden). With ``caches`` (one per layer) the ids continue the cached
        tokens, and their positions start at ``caches[0].length``."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, t) token ids, got shape {tuple(input_ids.shape)}"
            )
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(
                f"caches must hold one cache per layer ({len(self.layers)}), got "
                f"{len(caches)}; make them with new_caches()"
            )
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if caches is None else caches[i], absorb=absorb)
        return h

    def forward(
        self, input_ids: Tensor, caches: list[LatentCache] | None = None, absorb: bool = False
    ) -> Tensor:
        return self.norm(self.residual_stream(input_ids, caches, absorb))


class DeepSeekForCausalLM(nn.Module):
    """The mini-DeepSeek language model (the trunk plus ``lm_head``).

    ``model(input_ids, caches=None) -> logits`` (batch, t, vocab), in the dtype of the weights.
    ``absorb`` (attribute, default False) makes every MLA layer use weight absorption; results
    are the same either way. Multi-token prediction modules (``num_nextn_predict_layers``
    > 0) live in ``self.mtp`` (see :mod:`course_utils.mtp`): they share
    ``model.embed_tokens`` and ``lm_head`` and consume :meth:`forward_with_hidden`'s hidden
    states; plain ``forward`` never runs them.
    """

    def __init__(self, config: DeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.absorb = False
        self.model = DeepSeekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPLayer(config, config.num_hidden_layers + k)
            for k in range(config.num_nextn_predict_layers)
        )
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' DeepSeek init: every matrix (linear, embedding, router) normal(0,
        ``initializer_range``), biases 0, norms 1, the V3 correction bias 0."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            bias = getattr(module, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, DeepSeekMoE):
            nn.init.normal_(module.gate.weight, mean=0.0, std=std)
            if hasattr(module.gate, "e_score_correction_bias"):  # only the V3 router has it
                cast(DeepSeekV3Router, module.gate).e_score_correction_bias.zero_()

    # -- forward ------------------------------------------------------------------------------

    def forward_with_hidden(
        self, input_ids: Tensor, caches: list[LatentCache] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(logits (batch, t, vocab), hidden (batch, t, hidden)).

        ``hidden`` is the final hidden state, after the final norm: what ``lm_head`` reads and
        what transformers returns as ``last_hidden_state``. A V3 MTP module reads it (and
        normalises it once more with its own ``hnorm``). :meth:`DeepSeekModel.residual_stream`
        gives the stream before the final norm.
        """
        hidden = self.model(input_ids, caches, self.absorb)
        return self.lm_head(hidden), hidden

    def forward(self, input_ids: Tensor, caches: list[LatentCache] | None = None) -> Tensor:
        return self.forward_with_hidden(input_ids, caches)[0]

    def new_caches(
        self,
        batch_size: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[LatentCache]:
        """One empty :class:`LatentCache` per layer, on the model's device and dtype unless
        given: ``kv_lora_rank + qk_rope_head_dim`` numbers per token per layer."""
        return [
            cast(DeepSeekDecoderLayer, layer).self_attn.new_cache(
                batch_size, capacity, device, dtype
            )
            for layer in self.model.layers
        ]

    def generate(
        self,
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
        """Extend input_ids (batch, t) by up to ``max_new_tokens``: greedy at temperature 0,
        else sampled after top-k / top-p. See :func:`course_utils.generation.generate`."""
        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            use_cache=use_cache,
            eos_token_id=eos_token_id,
            generator=generator,
            return_logits=return_logits,
        )

    # -- bookkeeping --------------------------------------------------------------------------

    def moe_layers(self) -> list[DeepSeekMoE]:
        """The DeepSeekMoE feed-forwards, in layer order (layers >= first_k_dense_replace)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, DeepSeekMoE)]

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the model that answers (trunk and head), each tied tensor counted once.
        The multi-token-prediction modules are left out, as DeepSeek counts V3's 671B without
        its 14B MTP module (the DeepSeek-V3 README: 685B on the Hub in all);
        :func:`course_utils.mtp.mtp_parameter_count` counts them. ``include_embeddings=False``
        leaves out the input embedding table (a lookup, no FLOPs) but keeps ``lm_head`` unless
        it is tied to it. Buffers (the V3 correction bias) are not parameters."""
        mtp = {id(p) for p in self.mtp.parameters()}
        total = 0
        for p in self.parameters():  # parameters() yields a tied tensor once
            if id(p) in mtp or (not include_embeddings and p is self.model.embed_tokens.weight):
                continue
            total += p.numel()
        return total

    def num_active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters one token uses: everything except the routed experts it does not pick,
        i.e. per MoE layer the router, the shared experts and ``num_experts_per_tok`` routed
        experts. Embeddings count as in :meth:`num_parameters`."""
        total = self.num_parameters(include_embeddings)
        c = self.config
        for moe in self.moe_layers():
            per_expert = sum(p.numel() for p in moe.experts[0].parameters())
            total -= per_expert * (c.n_routed_experts - c.num_experts_per_tok)
        return total

    def _apply(self, fn, recurse: bool = True):
        # Casting the model (model.half(), .to(torch.bfloat16)) must not round the float32
        # buffers listed in FP32_BUFFERS; they follow the device but keep their dtype.
        kept = [
            (m, name, buf)
            for m in self.modules()
            for name, buf in m._buffers.items()
            if name in FP32_BUFFERS and buf is not None and buf.dtype == torch.float32
        ]
        super()._apply(fn, recurse)
        for module, name, buf in kept:
            moved = module._buffers[name]
            if moved is not None and moved.dtype != torch.float32:
                module._buffers[name] = buf.to(device=moved.device)
        return self
