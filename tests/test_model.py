"""DeepSeekConfig and DeepSeekForCausalLM on their own: config round trips and validation,
presets, parameter counts, caching, generation, dtype handling. Parity with transformers lives
in test_checkpoint.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import DeepSeekConfig, DeepSeekForCausalLM
from course_utils.layers import SwiGLU
from course_utils.moe import DeepSeekMoE, DeepSeekV2Router, DeepSeekV3Router

TINY = dict(
    vocab_size=24,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=64,
)


def _tiny(seed: int = 0, **over) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(DeepSeekConfig(**{**TINY, **over})).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so every part matters
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_config_round_trips_through_hf_dict(name):
    c = DeepSeekConfig.preset(name, vocab_size=16)
    assert DeepSeekConfig.from_hf(c.to_hf(), strict=True) == c
    v2 = DeepSeekConfig(
        **{**TINY, "model_type": "deepseek_v2", "q_lora_rank": None},
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    )
    assert v2.topk_method == "group_limited_greedy" and v2.scoring_func == "softmax"
    assert DeepSeekConfig.from_hf(v2.to_hf(), strict=True) == v2


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    dense=st.integers(0, 4),
    v2=st.booleans(),
    q=st.booleans(),
    groups=st.sampled_from([1, 2, 4]),
    tie=st.booleans(),
    mtp=st.integers(0, 2),
)
def test_config_round_trip_property(layers, dense, v2, q, groups, tie, mtp):
    c = DeepSeekConfig(
        **{
            **TINY,
            "num_hidden_layers": layers,
            "first_k_dense_replace": min(dense, layers),
            "n_group": groups,
            "topk_group": 1 if groups == 1 else 2,
            "q_lora_rank": 16 if q else None,
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
            "tie_word_embeddings": tie,
            "num_nextn_predict_layers": mtp,
        }
    )
    assert DeepSeekConfig.from_hf(c.to_hf(), strict=True) == c


HUB_V2_LITE = {  # keys and values of deepseek-ai/DeepSeek-V2-Lite's config.json (sizes shrunk)
    "architectures": ["DeepseekV2ForCausalLM"],
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "kv_lora_rank": 8,
    "max_position_embeddings": 64,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 8,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 4,
    "num_experts_per_tok": 3,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 4,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 16,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 8,
    "vocab_size": 40,
}


def test_from_hf_reads_a_hub_v2_config_and_transformers_rope_parameters():
    c = DeepSeekConfig.from_hf(HUB_V2_LITE, strict=True)
    assert (c.model_type, c.scoring_func, c.topk_method, c.q_lora_rank) == (
        "deepseek_v2",
        "softmax",
        "greedy",
        None,
    )
    assert c.yarn is not None and c.yarn.factor == 4 and c.rope_theta == 10000.0
    # transformers 5 spells RoPE as rope_parameters with theta inside.
    d = dict(HUB_V2_LITE)
    scaling = dict(d.pop("rope_scaling"), rope_theta=500.0, rope_type="yarn")
    del d["rope_theta"], scaling["type"]
    c2 = DeepSeekConfig.from_hf({**d, "rope_parameters": scaling})
    assert c2.rope_theta == 500.0 and c2.yarn == c.yarn and "rope_theta" not in c2.rope_scaling
    default = DeepSeekConfig.from_hf(
        {**d, "rope_parameters": {"rope_theta": 7.0e4, "rope_type": "default"}}
    )
    assert default.rope_scaling is None and default.rope_theta == 7.0e4
    with pytest.raises(ValueError, match="does not know"):
        DeepSeekConfig.from_hf({**HUB_V2_LITE, "sliding_window": 4}, strict=True)
    with pytest.raises(ValueError, match="FP8|dequantize"):
        DeepSeekConfig.from_hf({**HUB_V2_LITE, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="hidden_act"):
        DeepSeekConfig.from_hf({**HUB_V2_LITE, "hidden_act": "gelu"})


@pytest.mark.parametrize(
    "over,words",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(model_type="deepseek_v2", scoring_func="sigmoid"), "scoring_func"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(first_k_dense_replace=5), "first_k_dense_replace"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
        (dict(n_group=3), "n_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(eos_token_id=24), "eos_token_id"),
        (dict(model_type="deepseek_v2", rope_interleave=False), "rope_interleave"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "yarn"),
    ],
)
def test_config_validation_names_the_argument(over, words):
    with pytest.raises(ValueError, match=words):
        DeepSeekConfig(**{**TINY, **over})


def test_presets_and_dense_baseline():
    cpu = DeepSeekConfig.preset("cpu", vocab_size=16)
    model = DeepSeekForCausalLM(cpu)
    total, active = model.num_parameters(), model.num_active_parameters()
    assert 300_000 <= total <= 400_000 and active < 0.6 * total
    assert len(model.moe_layers()) == cpu.num_moe_layers == 2
    dense_cfg = cpu.dense_baseline()
    dense = DeepSeekForCausalLM(dense_cfg)
    assert dense.moe_layers() == [] and dense.num_parameters() == dense.num_active_parameters()
    # Equal active parameters, up to the routers' E x hidden weights the dense model lacks.
    routers = cpu.num_moe_layers * cpu.n_routed_experts * cpu.hidden_size
    assert dense.num_parameters() == active - routers
    gpu = DeepSeekForCausalLM(DeepSeekConfig.preset("gpu", vocab_size=16))
    assert 10e6 <= gpu.num_parameters() <= 20e6
    with pytest.raises(ValueError, match="preset"):
        DeepSeekConfig.preset("tpu", vocab_size=16)
    assert DeepSeekConfig.preset("cpu", vocab_size=16, num_hidden_layers=2).num_hidden_layers == 2


# -- the model --------------------------------------------------------------------------------


def test_module_tree_follows_the_config():
    model = _tiny()
    layers = model.model.layers
    assert isinstance(layers[0].mlp, SwiGLU)
    assert all(isinstance(layer.mlp, DeepSeekMoE) for layer in layers[1:])
    assert isinstance(layers[1].mlp.gate, DeepSeekV3Router)
    v2 = _tiny(model_type="deepseek_v2", first_k_dense_replace=0)
    assert all(isinstance(layer.mlp.gate, DeepSeekV2Router) for layer in v2.model.layers)
    keys = set(model.state_dict())
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.self_attn.q_a_layernorm.weight" in keys and "lm_head.weight" in keys


def test_init_follows_initializer_range():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig(**{**TINY, "initializer_range": 0.05}))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() > 200:
            assert abs(p.std().item() - 0.05) < 0.015, name
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.e_score_correction_bias, torch.zeros(8))


def test_parameter_counts_by_hand():
    c = DeepSeekConfig(**TINY)
    model = DeepSeekForCausalLM(c)
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    routed = sum(sum(p.numel() for p in m.experts.parameters()) for m in model.moe_layers())
    assert routed == c.num_moe_layers * c.n_routed_experts * per_expert
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_active_parameters() == total - c.num_moe_layers * per_expert * (
        c.n_routed_experts - c.num_experts_per_tok
    )
    assert model.num_parameters(include_embeddings=False) == total - c.vocab_size * c.hidden_size
    tied = DeepSeekForCausalLM(DeepSeekConfig(**{**TINY, "tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.num_parameters() == total - c.vocab_size * c.hidden_size
    assert tied.num_parameters(include_embeddings=False) == total - 2 * c.vocab_size * c.hidden_size


def test_cached_chunks_equal_the_full_forward_and_absorb_changes_nothing():
    model = _tiny()
    ids = torch.randint(0, 24, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        assert full.shape == (2, 10, 24)
        for absorb in (False, True):
            model.absorb = absorb
            caches = model.new_caches(2, 12)
            pieces = [model(ids[:, :4], caches=caches), model(ids[:, 4:7], caches=caches)]
            pieces += [model(ids[:, t : t + 1], caches=caches) for t in range(7, 10)]
            assert _rel(torch.cat(pieces, 1), full) < 1e-5
            assert caches[0].length == 10
        model.absorb = False
        # Causal: changing the last token leaves every earlier position's logits unchanged.
        other = ids.clone()
        other[:, -1] = (other[:, -1] + 1) % 24
        changed = model(other)
        # (Not bit-equal: the experts' matmuls see a different set of rows.)
        assert _rel(changed[:, :-1], full[:, :-1]) < 1e-6
        assert _rel(changed[:, -1], full[:, -1]) > 1e-3


def test_forward_with_hidden_is_the_final_normed_hidden_state():
    model = _tiny()
    ids = torch.randint(0, 24, (1, 6))
    with torch.no_grad():
        logits, hidden = model.forward_with_hidden(ids)
        assert torch.equal(logits, model(ids))
        assert torch.equal(logits, model.lm_head(hidden))
        assert torch.equal(hidden, model.model.norm(model.model.residual_stream(ids)))
        assert hidden.shape == (1, 6, 32)


def test_generate_greedy_with_and_without_cache_and_sampling():
    model = _tiny(3)
    prompt = torch.randint(0, 24, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 12)
    assert cached.shape == (3, 17) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, model.generate(prompt, 12, use_cache=False))
    # Greedy means argmax of the full-sequence logits at every step.
    with torch.no_grad():
        logits = model(cached[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), cached[:, 5:])

    def sample(seed):
        return model.generate(
            prompt,
            8,
            temperature=0.8,
            top_k=5,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(sample(4), sample(4)) and not torch.equal(sample(4), sample(5))
    eos = int(cached[0, 5])
    stopped = model.generate(prompt, 12, eos_token_id=eos)
    assert (stopped[0, 5:] == eos).all()


def test_bfloat16_keeps_float32_buffers_and_runs():
    model = _tiny().to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    for moe in model.moe_layers():
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
        assert moe.load_since_update.dtype == torch.float32
    assert model.model.layers[0].self_attn.rotary.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 24, (2, 7))
    with torch.no_grad():
        low = model(ids)
        ref = _tiny()(ids)
    # bfloat16 keeps ~3 significant digits (and may flip a close routing choice): compare means.
    err = (low.float() - ref).abs().mean() / ref.abs().mean()
    assert low.dtype == torch.bfloat16 and err < 0.05
    assert model.new_caches(2, 8)[0].c_kv.dtype == torch.bfloat16


def test_input_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="one cache per layer"):
        model(torch.zeros(1, 3, dtype=torch.long), caches=model.new_caches(1, 4)[:2])
    with pytest.raises(ValueError, match="capacity"):
        model(torch.zeros(1, 5, dtype=torch.long), caches=model.new_caches(1, 4))


def test_training_moves_the_v3_bias_only_through_the_balancer():
    from course_utils.moe import AuxLossFreeBalancer

    model = _tiny().train()
    balancer = AuxLossFreeBalancer(model, gamma=0.01)
    ids = torch.randint(0, 24, (4, 9))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    assert all(m.gate.e_score_correction_bias.grad is None for m in model.moe_layers())
    balancer.step()
    assert all(
        not torch.equal(b, m.gate.e_score_correction_bias)
        for b, m in zip(biases, model.moe_layers(), strict=True)
    )
    assert dataclasses.replace(model.config) == model.config


def test_parameter_counts_leave_out_the_mtp_module():
    c = DeepSeekConfig(**TINY)
    plain = DeepSeekForCausalLM(c)
    with_mtp = DeepSeekForCausalLM(DeepSeekConfig(**{**TINY, "num_nextn_predict_layers": 1}))
    assert with_mtp.num_parameters() == plain.num_parameters()
    assert with_mtp.num_active_parameters() == plain.num_active_parameters()
    mtp = sum(p.numel() for p in with_mtp.mtp.parameters())
    assert mtp > 0 and sum(p.numel() for p in with_mtp.parameters()) == plain.num_parameters() + mtp
