"""Hugging Face checkpoints both ways against transformers 5 DeepseekV2/V3ForCausalLM, and
bit-identical resumption of training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from course_utils import DeepSeekConfig, DeepSeekForCausalLM, load_hf_checkpoint, save_hf_checkpoint
from course_utils.checkpoint import load_training_state, save_training_state

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=40,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=6,
    v_head_dim=5,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    max_position_embeddings=64,
)
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.6,
}

#: (name, family, config keys): q_lora_rank None and set, one or two groups, 0 or 1 dense
#: layers, YaRN, half-split RoPE, V2 greedy and group-limited routers, tied embeddings.
CASES = [
    (
        "v3_qlora_groups_dense1",
        3,
        dict(
            q_lora_rank=12,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
        ),
    ),
    (
        "v3_noq_yarn_dense0",
        3,
        dict(
            q_lora_rank=None,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            rope_scaling=YARN,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
        ),
    ),
    (
        "v3_half_split_tied",
        3,
        dict(
            q_lora_rank=12,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            rope_interleave=False,
            tie_word_embeddings=True,
        ),
    ),
    (
        "v2_greedy_noq_yarn",
        2,
        dict(
            q_lora_rank=None,
            topk_method="greedy",
            first_k_dense_replace=1,
            rope_scaling=YARN,
            routed_scaling_factor=1.0,
        ),
    ),
    (
        "v2_group_limited_qlora",
        2,
        dict(
            q_lora_rank=12,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            routed_scaling_factor=2.0,
        ),
    ),
]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights larger than transformers' 0.02 init (and a non-zero V3 bias) so that every
    tensor, every routing choice and every layout mistake shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _hf_model(family: int, keys: dict, seed: int = 0):
    if family == 3:
        config = transformers.DeepseekV3Config(**BASE, **keys)
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        config = transformers.DeepseekV2Config(**BASE, **keys)
        model = transformers.DeepseekV2ForCausalLM(config)
    model.eval()
    _randomize(model, seed)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))


def _hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    # An explicit all-ones mask: transformers would otherwise treat pad-id tokens as padding.
    # No eos (min_new_tokens would instead forbid the eos token, changing the argmax).
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert out.shape[1] == ids.shape[1] + n
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case saved once with transformers' save_pretrained: {name: (hf model, dir)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, family, keys) in enumerate(CASES):
        model = _hf_model(family, keys, seed=i)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_transformers_checkpoint_loads_with_equal_logits_and_generation(saved, name, tmp_path):
    hf, path = saved[name]
    ours = load_hf_checkpoint(path)
    assert ours.config.model_type == hf.config.model_type
    with torch.no_grad():
        want = hf(IDS).logits
        assert _rel(ours(IDS), want) < 1e-5
    # Greedy: ours with the latent cache == ours without == transformers, token for token.
    cached = ours.generate(IDS, 10)
    assert torch.equal(cached, ours.generate(IDS, 10, use_cache=False))
    assert torch.equal(cached, _hf_greedy(hf, IDS, 10))
    # And back: our export loads into transformers with the same logits.
    save_hf_checkpoint(ours, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert _rel(back(IDS).logits, want) < 1e-5


def test_state_dict_keys_are_the_checkpoint_keys(saved):
    for name, (_, path) in saved.items():
        ours = load_hf_checkpoint(path)
        keys = set(load_file(path / "model.safetensors"))
        expected = set(ours.state_dict())
        if ours.config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        assert keys == expected, name
        assert "model.layers.2.mlp.experts.7.gate_proj.weight" in keys  # per-expert on disk
    half = load_hf_checkpoint(saved["v3_qlora_groups_dense1"][1], dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in half.moe_layers())


def test_course_model_exports_to_transformers(tmp_path):
    """A model made by the course (cpu preset), not by transformers, round-trips."""
    torch.manual_seed(0)
    ours = DeepSeekForCausalLM(
        DeepSeekConfig.preset("cpu", vocab_size=16, bos_token_id=1, eos_token_id=2)
    ).eval()
    _randomize(ours, 5)
    save_hf_checkpoint(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    ids = IDS % 16
    with torch.no_grad():
        assert _rel(hf(ids).logits, ours(ids)) < 1e-5
    assert torch.equal(_hf_greedy(hf, ids, 8), ours.generate(ids, 8))
    again = load_hf_checkpoint(tmp_path)
    assert again.config == ours.config
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_hub_style_config_json_loads(saved, tmp_path):
    """Hub files spell RoPE as rope_theta + rope_scaling ("type": "yarn"), name the router,
    and may list several eos ids; the weights are the same."""
    hf, path = saved["v3_noq_yarn_dense0"]
    hub = json.loads((path / "config.json").read_text())
    params = hub.pop("rope_parameters")
    hub["rope_theta"] = params.pop("rope_theta")
    hub["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_type"}, "type": "yarn"}
    hub.update(
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
        ep_size=1,
        eos_token_id=[1],
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    )
    (tmp_path / "config.json").write_text(json.dumps(hub))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    ours = load_hf_checkpoint(tmp_path)
    assert ours.config.yarn is not None and ours.config.eos_token_id == 1
    with torch.no_grad():
        assert _rel(ours(IDS), hf(IDS).logits) < 1e-5


def test_fused_expert_tensors_load(saved, tmp_path):
    """transformers' in-memory state dict (experts fused per layer) is understood too."""
    hf, path = saved["v3_qlora_groups_dense1"]
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    with torch.no_grad():
        assert _rel(load_hf_checkpoint(tmp_path)(IDS), hf(IDS).logits) < 1e-5


def test_sharded_checkpoint_written_by_hand_loads(saved, tmp_path):
    hf, path = saved["v2_group_limited_qlora"]
    tensors = load_file(path / "model.safetensors")
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(names, file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    with torch.no_grad():
        assert _rel(load_hf_checkpoint(tmp_path)(IDS), hf(IDS).logits) < 1e-5
    # Our own sharded export loads in transformers too.
    ours = load_hf_checkpoint(tmp_path)
    save_hf_checkpoint(ours, tmp_path / "out", max_shard_bytes=20_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _rel(back(IDS).logits, hf(IDS).logits) < 1e-5


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(saved, tmp_path):
    _, path = saved["v3_qlora_groups_dense1"]
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    missing = _copy_with(path, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*experts\.3\.up_proj.*\(12, 32\)"):
        load_hf_checkpoint(missing)

    def reshape(t):
        t["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(44, 9)

    bad = _copy_with(path, tmp_path / "shape", reshape)
    with pytest.raises(ValueError, match=r"kv_b_proj.*\(44, 8\).*\(44, 9\)"):
        load_hf_checkpoint(bad)

    def add(t):
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(44, 32)

    extra = _copy_with(path, tmp_path / "extra", add)
    with pytest.raises(ValueError, match=r"does not use.*q_proj"):
        load_hf_checkpoint(extra)

    def fp8(t):
        t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)

    with pytest.raises(ValueError, match="weight_scale_inv.*quantized"):
        load_hf_checkpoint(_copy_with(path, tmp_path / "fp8", fp8))
    with pytest.raises(ValueError, match="config.json"):
        load_hf_checkpoint(tmp_path)


def test_mtp_layers_round_trip_in_the_release_layout(saved, tmp_path):
    """MTP depth 1 is written as layer num_hidden_layers with its own copies of the embedding
    and head (as DeepSeek-V3's release stores it), loads back into model.mtp[0] exactly, and
    transformers (which does not run MTP) still loads the file with equal logits."""
    torch.manual_seed(0)
    ours = DeepSeekForCausalLM(
        DeepSeekConfig.preset("cpu", vocab_size=16, num_nextn_predict_layers=1)
    ).eval()
    _randomize(ours, 6)
    save_hf_checkpoint(ours, tmp_path / "mtp")
    from safetensors.torch import load_file

    written = load_file(tmp_path / "mtp" / "model.safetensors")
    layer = f"model.layers.{ours.config.num_hidden_layers}."
    assert torch.equal(written[layer + "eh_proj.weight"], ours.mtp[0].eh_proj.weight)
    assert torch.equal(written[layer + "embed_tokens.weight"], ours.model.embed_tokens.weight)
    assert torch.equal(written[layer + "shared_head.head.weight"], ours.lm_head.weight)
    again = load_hf_checkpoint(tmp_path / "mtp")
    assert again.config.num_nextn_predict_layers == 1
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp").eval()
    ids = IDS % 16
    with torch.no_grad():
        assert _rel(hf(ids).logits, ours(ids)) < 1e-5


def test_incomplete_mtp_layers_are_named(saved, tmp_path):
    hf, path = saved["v3_qlora_groups_dense1"]

    def add_mtp(t):  # half an MTP layer at index num_hidden_layers (here 3)
        t["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
        t["model.layers.3.enorm.weight"] = torch.ones(32)

    mtp = _copy_with(path, tmp_path / "mtp", add_mtp)
    with pytest.raises(ValueError, match=r"mtp\.0\.hnorm\.weight"):
        load_hf_checkpoint(mtp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = load_hf_checkpoint(path)  # transformers writes num_nextn_predict_layers=1 ...
    assert plain.config.num_nextn_predict_layers == 0  # ... but saved no MTP weights
    with torch.no_grad():
        assert _rel(plain(IDS), hf(IDS).logits) < 1e-5


def test_layout_mistakes_are_caught(saved):
    """Sharpness: loading interleaved RoPE rows as half-split, or dropping the routed scaling
    factor, changes the logits far beyond the 1e-5 tolerance."""
    hf, path = saved["v3_qlora_groups_dense1"]
    with torch.no_grad():
        want = hf(IDS).logits
        ours = load_hf_checkpoint(path)
        for layer in ours.model.layers:
            layer.self_attn.rotary.interleaved = False
        assert _rel(ours(IDS), want) > 1e-3
        ours = load_hf_checkpoint(path)
        for moe in ours.moe_layers():
            moe.config.routed_scaling_factor = 1.0
        assert _rel(ours(IDS), want) > 1e-3


def test_v2_export_warns_when_transformers_would_ignore_norm_topk_prob(tmp_path):
    model = DeepSeekForCausalLM(
        DeepSeekConfig(**{**BASE, "model_type": "deepseek_v2", "norm_topk_prob": True})
    )
    with pytest.warns(UserWarning, match="norm_topk_prob"):
        save_hf_checkpoint(model, tmp_path)


# -- training state ---------------------------------------------------------------------------


def _training_run(model, optimizer, steps, balancer):
    """A few AdamW steps on random batches drawn from torch's global generator, with the
    auxiliary-loss-free bias update: everything a resume must reproduce."""
    for _ in range(steps):
        ids = torch.randint(0, 16, (4, 12))
        loss = torch.nn.functional.cross_entropy(
            model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        balancer.step()


def _fresh(seed):
    from course_utils.moe import AuxLossFreeBalancer

    torch.manual_seed(seed)
    config = DeepSeekConfig(
        **{
            **BASE,
            "vocab_size": 16,
            "num_hidden_layers": 2,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "q_lora_rank": 12,
        }
    )
    model = DeepSeekForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer, AuxLossFreeBalancer(model, gamma=0.01)


def test_resumed_training_is_bit_identical(tmp_path):
    import random

    import numpy as np

    straight, opt, bal = _fresh(0)
    torch.manual_seed(123)
    _training_run(straight, opt, 6, bal)

    half, opt, bal = _fresh(0)
    torch.manual_seed(123)
    _training_run(half, opt, 3, bal)
    random.random(), np.random.rand()  # other generators move too; they must be restored
    save_training_state(tmp_path, half, opt, step=3, extra={"note": "halfway"})
    py_next, np_next = random.random(), float(np.random.rand())
    torch.manual_seed(999)  # whatever happens between runs

    resumed, opt2, bal2 = _fresh(7)  # fresh objects, different init
    info = load_training_state(tmp_path, resumed, opt2)
    assert info == {"step": 3, "extra": {"note": "halfway"}}
    assert (random.random(), float(np.random.rand())) == (py_next, np_next)
    _training_run(resumed, opt2, 3, bal2)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert sum(m.gate.e_score_correction_bias.abs().sum() for m in resumed.moe_layers()) > 0


def test_training_state_refuses_a_different_model(tmp_path):
    model, opt, _ = _fresh(0)
    save_training_state(tmp_path, model, opt, step=0)
    other = DeepSeekForCausalLM(DeepSeekConfig(**{**BASE, "vocab_size": 16}))
    with pytest.raises(ValueError, match="do not match"):
        load_training_state(tmp_path, other, torch.optim.AdamW(other.parameters()))
