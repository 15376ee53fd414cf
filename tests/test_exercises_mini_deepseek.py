"""Checkers of notebook 21: right answers pass, typical mistakes are explained, None is not
attempted, and a crashing answer is reported, never raised."""

from __future__ import annotations

from course_utils import DeepSeekConfig, DeepSeekForCausalLM
from course_utils.exercises import check_active_parameters, check_model_cache_bytes


def _active(config: DeepSeekConfig) -> int:
    model = DeepSeekForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    unused = config.n_routed_experts - config.num_experts_per_tok
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    return total - config.num_moe_layers * unused * per_expert


def test_active_parameters_right_answer_passes():
    fb = check_active_parameters(_active)
    assert fb.correct and fb.attempted, fb


def test_active_parameters_counting_everything_is_explained():
    fb = check_active_parameters(lambda c: DeepSeekForCausalLM(c).num_parameters())
    assert not fb.correct and fb.attempted
    assert "every parameter" in fb.message and "num_experts_per_tok" in fb.message


def test_active_parameters_forgetting_shared_experts_is_explained():
    def no_shared(c):
        return (
            _active(c)
            - c.num_moe_layers * 3 * c.hidden_size * c.moe_intermediate_size * c.n_shared_experts
        )

    fb = check_active_parameters(no_shared)
    assert not fb.correct and "shared experts" in fb.message


def test_active_parameters_none_and_crash():
    fb = check_active_parameters(None)
    assert not fb.correct and not fb.attempted

    def crash(c):
        raise KeyError("oops")

    fb = check_active_parameters(crash)
    assert not fb.correct and fb.attempted and "KeyError" in fb.message
    fb = check_active_parameters(lambda c: "many")
    assert not fb.correct and "int" in fb.message


def _cache(c: DeepSeekConfig, dtype_bytes: int) -> int:
    return (c.kv_lora_rank + c.qk_rope_head_dim) * dtype_bytes * c.num_hidden_layers


def test_cache_bytes_right_answer_passes():
    fb = check_model_cache_bytes(_cache)
    assert fb.correct and fb.attempted, fb


def test_cache_bytes_typical_mistakes_are_explained():
    fb = check_model_cache_bytes(lambda c, b: (c.kv_lora_rank + c.qk_rope_head_dim) * b)
    assert not fb.correct and "every layer" in fb.message
    fb = check_model_cache_bytes(lambda c, b: c.kv_lora_rank * b * c.num_hidden_layers)
    assert not fb.correct and "RoPE" in fb.message
    fb = check_model_cache_bytes(
        lambda c, b: (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers
    )
    assert not fb.correct and "bytes" in fb.message
    fb = check_model_cache_bytes(
        lambda c, b: (
            2
            * c.num_attention_heads
            * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            * b
            * c.num_hidden_layers
        )
    )
    assert not fb.correct and "latent" in fb.message


def test_cache_bytes_none_and_crash():
    fb = check_model_cache_bytes(None)
    assert not fb.correct and not fb.attempted

    def crash(c, b):
        raise NotImplementedError

    assert not check_model_cache_bytes(crash).attempted

    def boom(c, b):
        return 1 / 0

    fb = check_model_cache_bytes(boom)
    assert not fb.correct and fb.attempted and "ZeroDivisionError" in fb.message
