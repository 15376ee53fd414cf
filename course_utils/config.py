"""The one configuration of the course's mini-DeepSeek, spelled like a Hub ``config.json``.

:class:`DeepSeekConfig` holds every size of the model under the key names of the Hugging Face
DeepSeek-V2 and DeepSeek-V3 configs, so a learner can lay a real ``config.json`` next to it and
read it field by field. It reads such a file (:meth:`DeepSeekConfig.from_hf`, either family,
RoPE written either the Hub way or the transformers-5 way) and writes one that
``transformers.AutoConfig`` accepts (:meth:`DeepSeekConfig.to_hf`). It hands out the attention
and MoE configs the layers need (:meth:`mla_config`, :meth:`moe_config`), offers two presets
(:meth:`preset`: ``"cpu"`` trains in minutes on two cores, ``"gpu"`` suits a Colab T4) and the
dense model with the same active width for fair comparisons (:meth:`dense_baseline`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

from .mla import MLAConfig
from .moe import MoEConfig
from .positional import YarnScaling

__all__ = ["DeepSeekConfig", "PRESETS"]

_FAMILIES = {
    # model_type -> (architecture, scoring_func, allowed topk_methods)
    "deepseek_v3": ("DeepseekV3ForCausalLM", "sigmoid", ("noaux_tc",)),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "softmax", ("greedy", "group_limited_greedy")),
}

#: Keys of a Hub or transformers config.json that carry no information for this model (runtime
#: switches, parallelism plans, bookkeeping). Anything else that is not a field is reported.
_IGNORED_HF_KEYS = {
    "architectures",
    "auto_map",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "pretraining_tp",
    "attention_dropout",
    "output_router_logits",
    "num_key_value_heads",
    "head_dim",
    "qk_head_dim",
    "ep_size",
    "_name_or_path",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "rope_parameters",
    "mlp_bias",
    "hidden_act",
    "num_mtp_layers",
    "quantization_config",
    "_attn_implementation",
    "router_aux_loss_coef",
}


@dataclass
class DeepSeekConfig:
    """Sizes and switches of a DeepSeek-V2/V3-style causal language model (Hub key names).

    Attention (MLA): ``num_attention_heads`` heads; queries through a ``q_lora_rank``-wide latent
    (``None``: one projection, as DeepSeek-V2-Lite); keys and values from a ``kv_lora_rank``
    latent; per head ``qk_nope_head_dim`` content dims + ``qk_rope_head_dim`` rotary dims for
    queries and keys, ``v_head_dim`` for values. RoPE: ``rope_theta``, optional YaRN
    ``rope_scaling`` (a Hub-style dict), ``rope_interleave`` (the checkpoint's rotary layout).

    Feed-forward: layers ``0 .. first_k_dense_replace - 1`` are dense SwiGLU of width
    ``intermediate_size``; the others are DeepSeekMoE with ``n_routed_experts`` experts of width
    ``moe_intermediate_size``, ``num_experts_per_tok`` chosen per token, ``n_shared_experts``
    always on. The router family follows ``model_type``: ``"deepseek_v3"`` scores with a sigmoid
    and chooses with ``topk_method="noaux_tc"`` (bias-corrected, group-limited); ``"deepseek_v2"``
    uses a softmax with ``"greedy"`` or ``"group_limited_greedy"``. ``scoring_func`` and
    ``topk_method`` left as None are filled in from ``model_type``.

    ``num_nextn_predict_layers``: multi-token-prediction depth (V3's MTP; 0 = none).
    ``bias_update_speed`` (the gamma of the auxiliary-loss-free bias update) is the course's
    own key; ``aux_loss_alpha`` and ``seq_aux`` mirror the released configs.
    """

    vocab_size: int
    hidden_size: int = 96
    intermediate_size: int = 120
    moe_intermediate_size: int = 40
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    q_lora_rank: int | None = 48
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    topk_method: str | None = None
    scoring_func: str | None = None
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0
    model_type: str = "deepseek_v3"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    bias_update_speed: float = 0.001

    def __post_init__(self) -> None:
        if self.model_type not in _FAMILIES:
            raise ValueError(
                f"model_type must be one of {tuple(_FAMILIES)}, got {self.model_type!r}"
            )
        # Hub configs write null for "no expert groups".
        if self.n_group is None:
            self.n_group = 1
        if self.topk_group is None:
            self.topk_group = self.n_group
        _, scoring, methods = _FAMILIES[self.model_type]
        if self.scoring_func is None:
            self.scoring_func = scoring
        if self.topk_method is None:
            self.topk_method = (
                methods[0]
                if self.model_type == "deepseek_v3" or self.n_group == 1
                else "group_limited_greedy"
            )
        if self.scoring_func != scoring or self.topk_method not in methods:
            raise ValueError(
                f"model_type={self.model_type!r} routes with scoring_func={scoring!r} and "
                f"topk_method in {methods}, got scoring_func={self.scoring_func!r}, "
                f"topk_method={self.topk_method!r}; change model_type or leave both as None"
            )
        if self.rope_scaling is not None:
            scaling = {k: v for k, v in dict(self.rope_scaling).items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
                self.rope_scaling = None
            else:
                self.rope_scaling = scaling
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be between 0 and "
                f"num_hidden_layers={self.num_hidden_layers} (it counts the dense layers)"
            )
        if self.moe_layer_freq != 1:
            raise ValueError(
                f"moe_layer_freq={self.moe_layer_freq} is not supported: every released "
                "DeepSeek-V2/V3 uses 1 (MoE in every layer after the dense ones) and transformers "
                "ignores the key; set moe_layer_freq=1"
            )
        if self.num_nextn_predict_layers < 0:
            raise ValueError(
                f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}"
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.initializer_range <= 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range}")
        if not self.rope_interleave and self.model_type == "deepseek_v2":
            raise ValueError(
                "rope_interleave=False needs model_type='deepseek_v3': "
                "DeepSeek-V2 checkpoints are always interleaved"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name}={value} must be a token id below vocab_size={self.vocab_size}, or None"
                )
        # The layer configs validate the rest (rope dims even, experts vs groups, YaRN keys).
        self.mla_config()
        if self.num_moe_layers:
            self.moe_config()

    # -- the layers ---------------------------------------------------------------------------

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when layer ``layer_idx`` (0-based) uses DeepSeekMoE, False when it is dense."""
        if not 0 <= layer_idx < self.num_hidden_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_hidden_layers}), got {layer_idx}")
        return layer_idx >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def mla_config(self) -> MLAConfig:
        """The attention config every layer uses."""
        return MLAConfig(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            q_lora_rank=self.q_lora_rank,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
            rope_interleave=self.rope_interleave,
            attention_bias=self.attention_bias,
            num_hidden_layers=self.num_hidden_layers,
            max_position_embeddings=self.max_position_embeddings,
        )

    def moe_config(self) -> MoEConfig:
        """The MoE config of the layers from ``first_k_dense_replace`` on."""
        return MoEConfig(
            hidden_size=self.hidden_size,
            moe_intermediate_size=self.moe_intermediate_size,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            n_shared_experts=self.n_shared_experts,
            n_group=self.n_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=self.norm_topk_prob,
            # __post_init__ has filled both in from model_type when they were None
            scoring_func=cast(str, self.scoring_func),
            topk_method=cast(str, self.topk_method),
            bias_update_speed=self.bias_update_speed,
            aux_loss_alpha=self.aux_loss_alpha,
            seq_aux=self.seq_aux,
        )

    @property
    def active_expert_width(self) -> int:
        """Hidden width of the experts one token runs in an MoE layer:
        ``moe_intermediate_size * (n_shared_experts + num_experts_per_tok)``."""
        return self.moe_intermediate_size * (self.n_shared_experts + self.num_experts_per_tok)

    def dense_baseline(self) -> DeepSeekConfig:
        """The dense model a fair MoE comparison needs: same layers, attention and embeddings,
        every feed-forward a SwiGLU of width :attr:`active_expert_width`, so each token runs
        the same feed-forward matmuls (only the router's small ``E x hidden`` product is
        missing). Layers that were already dense take that width too."""
        return dataclasses.replace(
            self,
            intermediate_size=self.active_expert_width,
            first_k_dense_replace=self.num_hidden_layers,
        )

    # -- presets ------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> DeepSeekConfig:
        """A ready-made size. ``"cpu"``: about 0.32M parameters (0.18M active per token) for
        the 16-character arithmetic corpus, 1 dense + 2 MoE layers of 8 routed experts (top-2,
        2 groups, V3 router) + 1 shared; 1000 AdamW steps of 128 x 48 tokens take about 5
        minutes on one idle CPU thread (measured 8 on a shared, loaded one).
        ``"gpu"``: about 14M parameters (5.6M active) for a Colab T4.
        ``overrides`` replace any field."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], "vocab_size": vocab_size, **overrides})

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], strict: bool = False) -> DeepSeekConfig:
        """From a DeepSeek-V2 or -V3 ``config.json`` dict (Hub file, ``save_pretrained`` output,
        or ``PretrainedConfig.to_dict()``).

        RoPE may be ``rope_theta`` + ``rope_scaling`` (Hub files) or transformers 5's
        ``rope_parameters`` (theta inside). transformers' V2 config has no ``scoring_func``:
        the family's router follows from ``model_type``. Keys that are neither fields nor known
        bookkeeping are ignored, or raise with ``strict=True``. A ``hidden_act`` other than silu,
        ``mlp_bias`` true or a ``quantization_config`` (FP8 weights) raise ValueError.
        """
        d = dict(config)
        model_type = d.get("model_type")
        if model_type not in _FAMILIES:
            raise ValueError(
                f"config.json model_type must be one of {tuple(_FAMILIES)}, got {model_type!r}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {d['hidden_act']!r}")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not a DeepSeek setting; the experts have no bias")
        if d.get("quantization_config"):
            raise ValueError(
                "this config.json describes quantized (FP8) weights, with a "
                "quantization_config; dequantize the checkpoint to bf16/fp32 first (DeepSeek's "
                "fp8_cast_bf16.py does) and load that"
            )
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        d["rope_theta"] = float(theta)
        d["rope_scaling"] = dict(rope) or None
        if d.get("rope_interleave") is None:
            d.pop("rope_interleave", None)
        if isinstance(d.get("eos_token_id"), list):
            ids = d["eos_token_id"]
            d["eos_token_id"] = ids[0] if ids else None
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - _IGNORED_HF_KEYS)
        if strict and unknown:
            raise ValueError(f"config.json keys this model does not know: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` and
        the Hub's reference code accept: every field under its key (RoPE as ``rope_theta`` +
        ``rope_scaling``, the Hub spelling), plus ``architectures``, ``hidden_act`` and
        ``num_key_value_heads`` (= heads; MLA has no KV heads, transformers asks for it)."""
        d = dataclasses.asdict(self)
        d["architectures"] = [_FAMILIES[self.model_type][0]]
        d["hidden_act"] = "silu"
        d["num_key_value_heads"] = self.num_attention_heads
        return d

    @property
    def yarn(self) -> YarnScaling | None:
        return None if self.rope_scaling is None else YarnScaling.from_hf(self.rope_scaling)


#: The presets of :meth:`DeepSeekConfig.preset` (everything but ``vocab_size``).
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.32M parameters (0.18M active): hidden 96, 3 layers (1 dense + 2 MoE), MLA with 4
    # heads of 16 + 8 rotary dims over a 32-wide KV latent and a 48-wide query latent, 8 routed
    # experts of width 40 in 2 groups (top-2, one group per token) + 1 shared. The dense layer's
    # width equals the active expert width (3 x 40), so dense_baseline() only changes the MoE
    # layers.
    "cpu": dict(
        hidden_size=96,
        intermediate_size=120,
        moe_intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        model_type="deepseek_v3",
    ),
    # ~14M parameters (5.6M active) for a T4: hidden 256, 8 layers (1 dense + 7 MoE), 8 heads,
    # 16 routed experts of width 128 (top-4 of 16 in 4 groups, 2 groups per token) + 1 shared.
    "gpu": dict(
        hidden_size=256,
        intermediate_size=640,
        moe_intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        model_type="deepseek_v3",
    ),
}
