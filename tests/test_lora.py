from __future__ import annotations

import pytest
import torch
from torch import nn

from course_utils import lora
from course_utils.decoder import DecoderConfig, TinyDecoder
from course_utils.mla import MLAConfig, MultiHeadLatentAttention
from course_utils.moe import DeepSeekMoE, MoEConfig


def _decoder(seed=0):
    torch.manual_seed(seed)
    return TinyDecoder(
        DecoderConfig(
            16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    )


def _randomize_adapters(model):
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(std=0.3)


def test_layer_starts_as_the_base_and_adds_the_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base, r=2, alpha=8)
    x = torch.randn(3, 4, 6)
    assert torch.equal(layer(x), base(x))  # B = 0 at init: exactly the base output
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)
    assert layer.lora_A.abs().sum() > 0 and layer.scaling == 4.0
    with torch.no_grad():
        layer.lora_B.normal_()
    want = base(x) + 4.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), want, atol=1e-6)
    assert torch.allclose(layer.weight, base.weight + 4.0 * layer.lora_B @ layer.lora_A)
    assert torch.allclose(layer.merged()(x), layer(x), atol=1e-6)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad


def test_apply_lora_trains_only_adapters_and_starts_unchanged():
    model = _decoder()
    x = torch.randint(0, 16, (2, 10))
    before = model(x)
    names = lora.apply_lora(model, ("q_proj", "v_proj"), r=4, alpha=8)
    assert names == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]
    assert torch.equal(model(x), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in names for m in "AB"}
    # q_proj and v_proj are 32 x 32: each adapter has 4 * (32 + 32) parameters
    assert lora.trainable_parameters(model) == 4 * 4 * 64
    model(x).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # the gradient reaches B first (A is random, B zero), and A's gradient is zero at B = 0
    layer = model.get_submodule(names[0])
    assert layer.lora_B.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() == 0


def test_merged_forward_equals_adapter_forward_and_restores_plain_linears():
    model = _decoder()
    lora.apply_lora(model, lambda name, m: name.endswith("_proj"), r=3, alpha=6)
    _randomize_adapters(model)
    x = torch.randint(0, 16, (3, 12))
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - _decoder()(x)).abs().max() > 1e-2  # the adapters do something
        merged_names = lora.merge_lora(model)
        merged = model(x)
    assert len(merged_names) == 14
    assert torch.allclose(merged, adapted, atol=1e-6), (merged - adapted).abs().max()
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert lora.count_parameters(model) == lora.count_parameters(_decoder())


def test_targets_reach_mla_projections_and_routed_experts_only():
    torch.manual_seed(0)
    cfg = MLAConfig(
        hidden_size=32,
        num_attention_heads=2,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        q_lora_rank=12,
    )
    block = nn.ModuleDict(
        {
            "self_attn": MultiHeadLatentAttention(cfg),
            "mlp": DeepSeekMoE(
                MoEConfig(
                    hidden_size=32,
                    moe_intermediate_size=16,
                    n_routed_experts=4,
                    num_experts_per_tok=2,
                )
            ),
        }
    )
    names = lora.apply_lora(block, ["q_b_proj", "kv_b_proj", "o_proj", "*.experts.*_proj"], r=2)
    assert "self_attn.q_b_proj" in names and "self_attn.kv_b_proj" in names
    assert "mlp.experts.3.down_proj" in names and len(names) == 3 + 4 * 3
    assert not any("shared_experts" in n for n in names)  # the glob chose routed experts only
    _randomize_adapters(block)
    x = torch.randn(2, 5, 32)
    attn = block["self_attn"]
    with torch.no_grad():
        plain, absorbed = attn(x), attn(x, absorb=True)  # absorption reads kv_b_proj.weight
        moe_out = block["mlp"](x)
        assert torch.allclose(plain, absorbed, atol=1e-5)
        lora.merge_lora(block)
        assert torch.allclose(attn(x), plain, atol=1e-5)
        assert torch.allclose(block["mlp"](x), moe_out, atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="rank r"):
        lora.LoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="rank r"):
        lora.apply_lora(_decoder(), "q_proj", r=-1)
    with pytest.raises(ValueError, match="no nn.Linear.*q_b_proj.*named.*o_proj"):
        lora.apply_lora(_decoder(), "q_b_proj", r=2)
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        lora.LoRALinear(nn.Embedding(3, 3), r=1)  # type: ignore[arg-type]


def test_applying_twice_does_not_wrap_the_frozen_base():
    model = _decoder()
    lora.apply_lora(model, "o_proj", r=2)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply_lora(model, "o_proj.base", r=2)
    assert lora.apply_lora(model, "q_proj", r=2, freeze_rest=False) == [
        "layers.0.self_attn.q_proj",
        "layers.1.self_attn.q_proj",
    ]


def _mini_deepseek():
    from course_utils.config import DeepSeekConfig
    from course_utils.model import DeepSeekForCausalLM

    torch.manual_seed(0)
    return DeepSeekForCausalLM(
        DeepSeekConfig(
            vocab_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=4,
            moe_intermediate_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )


def test_lora_on_the_mini_deepseek_attention_and_experts_merges_exactly():
    model = _mini_deepseek()
    names = lora.apply_lora(
        model, ["q_b_proj", "kv_b_proj", "o_proj", "*.experts.*_proj"], r=2, alpha=4
    )
    assert len(names) == 2 * 3 + 4 * 3  # 3 attention projections a layer, 4 routed experts
    assert not any(".mlp.gate_proj" in n or "shared_experts" in n for n in names)
    _randomize_adapters(model)
    x = torch.randint(0, 16, (2, 11))
    with torch.no_grad():
        adapted = model(x)
        model.absorb = True  # MLA's absorbed path reads kv_b_proj.weight: the merged weight
        absorbed = model(x)
        model.absorb = False
        lora.merge_lora(model)
        merged = model(x)
    assert torch.allclose(absorbed, adapted, atol=1e-5)
    assert torch.allclose(merged, adapted, atol=1e-6), (merged - adapted).abs().max()


# -- parity with PEFT (test-only dependency), on the same weights -----------------------------


def test_lora_equals_peft_on_the_same_weights():
    from peft import LoraConfig, get_peft_model

    base = _decoder(seed=3)
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = _decoder(seed=3)
    lora.apply_lora(ours, targets, r=4, alpha=8)
    theirs = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    )
    _randomize_adapters(ours)  # B = 0 at the start would hide the scaling; make it count
    peft_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in theirs.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }
    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, lora.LoRALinear)}
    assert sorted(peft_layers) == sorted(ours_layers)  # the same layers were chosen
    with torch.no_grad():
        for name, m in ours_layers.items():
            peft_layers[name].lora_A["default"].weight.copy_(m.lora_A)  # (r, in), as ours
            peft_layers[name].lora_B["default"].weight.copy_(m.lora_B)  # (out, r), as ours
    # the same trainable parameters: only the adapters
    assert lora.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 16, (2, 11))
    with torch.no_grad():
        want = theirs(ids)
        torch.testing.assert_close(ours(ids), want)
        assert (want - _decoder(seed=3)(ids)).abs().max() > 1e-3  # the adapters matter
        lora.merge_lora(ours)
        merged = theirs.merge_and_unload()
        torch.testing.assert_close(ours(ids), merged(ids))
        torch.testing.assert_close(ours(ids), want, rtol=1e-5, atol=1e-5)


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match="r=40"):
        lora.LoRALinear(nn.Linear(32, 8), r=40)
    with pytest.raises(ValueError, match="r=40"):
        lora.apply_lora(_decoder(), "q_proj", r=40)
