"""Exercise checkers for notebook 21: reading a DeepSeek config like a model card."""

from __future__ import annotations

from collections.abc import Callable

from ..config import DeepSeekConfig
from ..mla import latent_cache_bytes
from ..model import DeepSeekForCausalLM
from ._feedback import Feedback, call_learner

__all__ = ["check_active_parameters", "check_model_cache_bytes"]

#: Configs the learner has not seen: V3 and V2 routers, 0-2 dense layers, 1-2 shared experts,
#: q_lora_rank set or not.
_CONFIGS = [
    DeepSeekConfig(
        vocab_size=20,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=6,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
    ),
    DeepSeekConfig(
        vocab_size=30,
        hidden_size=24,
        intermediate_size=40,
        moe_intermediate_size=10,
        num_hidden_layers=4,
        num_attention_heads=3,
        q_lora_rank=None,
        kv_lora_rank=12,
        qk_nope_head_dim=6,
        qk_rope_head_dim=2,
        v_head_dim=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=2,
    ),
    DeepSeekConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=6,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=8,
        kv_lora_rank=6,
        qk_nope_head_dim=4,
        qk_rope_head_dim=2,
        v_head_dim=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        model_type="deepseek_v2",
    ),
]


def _counts(config: DeepSeekConfig) -> tuple[int, int, int, int, int]:
    """(active, total, one routed expert, one router, one shared block) for ``config``."""
    model = DeepSeekForCausalLM(config)
    h, i = config.hidden_size, config.moe_intermediate_size
    return (
        model.num_active_parameters(),
        model.num_parameters(),
        3 * h * i,
        config.n_routed_experts * h,
        3 * h * i * config.n_shared_experts,
    )


def check_active_parameters(fn: Callable[[DeepSeekConfig], int] | None) -> Feedback:
    """Exercise 21.1: ``fn(config) -> int``, the parameters one token uses in the model
    ``DeepSeekForCausalLM(config)`` (embeddings included), from the model's parameters and
    the config, without calling ``num_active_parameters``."""
    hint = (
        "write active_parameters(config): build DeepSeekForCausalLM(config), count all its "
        "parameters, then take away the routed experts a token does not pick"
    )
    for config in _CONFIGS:
        got, fb = call_learner(fn, hint, config)
        if fb is not None:
            return fb
        if not isinstance(got, int) or isinstance(got, bool):
            try:
                if float(got) != int(got):
                    raise ValueError
                got = int(got)
            except (TypeError, ValueError, OverflowError):
                return Feedback(False, f"return an int (a count of parameters), got {got!r}")
        active, total, expert, router, shared = _counts(config)
        n_moe = config.num_moe_layers
        if got == active:
            continue
        where = (
            f"for a config with {n_moe} MoE layers of {config.n_routed_experts} experts, "
            f"top-{config.num_experts_per_tok}"
        )
        if got == total:
            return Feedback(
                False,
                f"{where} you returned every parameter ({total}); a token "
                "runs only num_experts_per_tok of the routed experts",
            )
        if got == active - n_moe * shared:
            return Feedback(
                False, f"{where} you left out the shared experts; every token runs them"
            )
        if got == active - n_moe * router:
            return Feedback(
                False, f"{where} you left out the router (gate.weight); every token is scored by it"
            )
        if got == total - n_moe * config.num_experts_per_tok * expert:
            return Feedback(
                False,
                f"{where} you removed the experts a token picks; remove "
                "the n_routed_experts - num_experts_per_tok it does not",
            )
        if got == active - config.vocab_size * config.hidden_size:
            return Feedback(
                False,
                f"{where} you left out one embedding table; count "
                "embeddings as num_parameters() does",
            )
        return Feedback(
            False,
            f"{where} the model runs {active} parameters per token, you "
            f"returned {got} (total is {total})",
        )
    return Feedback(
        True,
        f"active parameters match on {len(_CONFIGS)} configs, V2 and V3 "
        "routers, with and without dense layers",
    )


def check_model_cache_bytes(fn: Callable[[DeepSeekConfig, int], int] | None) -> Feedback:
    """Exercise 21.2: ``fn(config, dtype_bytes) -> int``, the bytes MLA's inference cache
    holds per token for the whole model (every layer)."""
    hint = (
        "write model_cache_bytes(config, dtype_bytes): what one layer's latent cache "
        "stores per token, times the layers"
    )
    for config in _CONFIGS:
        for dtype_bytes in (2, 4):
            got, fb = call_learner(fn, hint, config, dtype_bytes)
            if fb is not None:
                return fb
            c = config
            want = latent_cache_bytes(
                c.num_hidden_layers,
                c.kv_lora_rank,
                c.qk_rope_head_dim,
                bytes_per_element=dtype_bytes,
            )
            if got == want:
                continue
            if not isinstance(got, (int, float)):
                return Feedback(False, f"return a number of bytes, got {got!r}")
            per_layer = want // c.num_hidden_layers
            where = (
                f"(kv_lora_rank={c.kv_lora_rank}, qk_rope_head_dim={c.qk_rope_head_dim}, "
                f"{c.num_hidden_layers} layers, {dtype_bytes} bytes a number)"
            )
            if got == per_layer:
                return Feedback(
                    False, f"that is one layer's cache {where}; every layer keeps its own latent"
                )
            if got == c.kv_lora_rank * dtype_bytes * c.num_hidden_layers:
                return Feedback(
                    False,
                    f"you left out the decoupled RoPE key {where}: MLA "
                    "caches qk_rope_head_dim numbers besides the latent",
                )
            if got == want // dtype_bytes:
                return Feedback(
                    False, f"that counts numbers, not bytes {where}; multiply by dtype_bytes"
                )
            mha = 2 * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            if got in (
                mha * dtype_bytes * c.num_hidden_layers,
                c.num_attention_heads
                * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
                * dtype_bytes
                * c.num_hidden_layers,
            ):
                return Feedback(
                    False,
                    f"that is what full per-head keys and values would cost "
                    f"{where}; MLA caches only the latent and the shared "
                    "RoPE key",
                )
            return Feedback(False, f"expected {want} bytes per token {where}, got {got}")
    return Feedback(
        True, "MLA's cache size per token matches on three configs in 2- and 4-byte dtypes"
    )
