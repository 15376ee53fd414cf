"""MLA against transformers' DeepseekV2/V3 attention, naive == absorbed, cache accounting."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils.cache import KVCache, kv_cache_bytes
from course_utils.mla import (
    REAL_CONFIGS,
    LatentCache,
    MLAConfig,
    MultiHeadLatentAttention,
    cache_size_table,
    latent_cache_bytes,
    rope_rows_to_half_split,
)

TINY = dict(
    hidden_size=32,
    num_attention_heads=4,
    kv_lora_rank=8,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
    max_position_embeddings=64,
    rope_theta=10000.0,
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


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):  # norms start at 1: make them matter
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _hf_pair(version: str, q_lora_rank: int | None, yarn: bool, interleave: bool = True):
    """A random transformers attention of DeepSeek `version` and ours with the same weights."""
    kw = dict(TINY, q_lora_rank=q_lora_rank, num_key_value_heads=4)
    if yarn:
        kw["rope_scaling"] = dict(YARN)
    if version == "v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3Attention as Attn,
        )
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3RotaryEmbedding as Rope,
        )

        cfg = DeepseekV3Config(**kw, rope_interleave=interleave)
    else:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
            DeepseekV2Attention as Attn,
        )
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
            DeepseekV2RotaryEmbedding as Rope,
        )

        cfg = DeepseekV2Config(**kw)
    cfg._attn_implementation = "eager"
    hf, rope = Attn(cfg, 0).eval(), Rope(cfg)
    _randomize(hf, seed=7)
    ours = MultiHeadLatentAttention(MLAConfig.from_hf(cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())

    def run_hf(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t)[None].expand(x.shape[0], -1)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        if version == "v3":
            return hf(x, rope(x, pos), mask)[0]
        return hf(x, mask, position_embeddings=rope(x, pos))[0]

    return ours, run_hf


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [
    ("v3", 16, False, True),
    ("v3", None, True, True),
    ("v3", 16, True, False),
    ("v2", 16, False, True),
    ("v2", None, True, True),
]


@pytest.mark.parametrize("version,q_lora_rank,yarn,interleave", CASES)
def test_matches_transformers_full_prompt_and_cached_decode(version, q_lora_rank, yarn, interleave):
    ours, run_hf = _hf_pair(version, q_lora_rank, yarn, interleave)
    assert (ours.config.yarn is not None) == yarn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = run_hf(x)
        assert _rel(ours(x), want) < 1e-5
        assert _rel(ours(x, absorb=True), want) < 1e-5
        for absorb in (False, True):
            cache = ours.new_cache(2, 9)
            steps = [ours(x[:, :3], cache, absorb=absorb)]  # a prompt, then one token at a time
            steps += [ours(x[:, t : t + 1], cache, absorb=absorb) for t in range(3, 9)]
            assert _rel(torch.cat(steps, 1), want) < 1e-5


def test_wrong_scale_or_unshared_layout_would_be_caught():
    # Sanity check that the comparison is sharp: a different softmax scale breaks it.
    ours, run_hf = _hf_pair("v3", 16, False)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        want = run_hf(x)
        ours.softmax_scale = ours.config.qk_nope_head_dim**-0.5
        assert _rel(ours(x), want) > 1e-3


def test_interleaved_checkpoint_runs_half_split_only_after_permuting_rows():
    ours, run_hf = _hf_pair("v3", 16, False, interleave=True)
    x = torch.randn(1, 7, 32)
    half_cfg = MLAConfig(**{**vars(ours.config), "rope_interleave": False})
    half = MultiHeadLatentAttention(half_cfg).eval()
    with torch.no_grad():
        want = run_hf(x)
        half.load_state_dict(ours.state_dict())  # rotate_half on interleaved weights: wrong
        assert _rel(half(x), want) > 1e-3
        half.load_state_dict(rope_rows_to_half_split(ours.state_dict(), half_cfg))
        assert _rel(half(x), want) < 1e-5


def _tiny(**over) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(MLAConfig(**{**TINY, "q_lora_rank": 12, **over})).eval()
    _randomize(m, 3)
    return m


@pytest.mark.parametrize("rope_dim", [0, 4])
def test_absorbed_equals_naive(rope_dim):
    m = _tiny(qk_rope_head_dim=rope_dim, rope_scaling=YARN)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        naive, absorbed = m(x), m(x, absorb=True)
        assert _rel(absorbed, naive) < 1e-5
        cache = m.new_cache(3, 16)
        m(x[:, :5], cache, absorb=True)
        tail = m(x[:, 5:], cache, absorb=True)  # a chunk after a cached prefix: causal offset
        assert _rel(tail, naive[:, 5:]) < 1e-5


def test_cache_holds_only_the_normed_latent_and_rotated_shared_key():
    m = _tiny()
    x = torch.randn(1, 5, 32)
    cache = m.new_cache(1, 8)
    with torch.no_grad():
        m(x, cache)
        q_nope, q_pe, c_kv, k_pe = m.project(x)
        raw_c, raw_pe = m.kv_a_proj_with_mqa(x).split([8, 4], -1)
    assert [b.shape for b in cache.buffers()] == [torch.Size([1, 8, 8]), torch.Size([1, 8, 4])]
    torch.testing.assert_close(cache.c_kv[:, :5], m.kv_a_layernorm(raw_c))
    torch.testing.assert_close(cache.k_pe[:, :5], m.rotary(raw_pe))
    assert cache.length == 5
    # one rotary key for all heads: kv_a_proj_with_mqa emits kv_lora_rank + qk_rope_head_dim
    assert m.kv_a_proj_with_mqa.out_features == 8 + 4
    assert m.softmax_scale == pytest.approx((6 + 4) ** -0.5)


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_per_token(dtype, size):
    layers = 3
    m = _tiny()
    caches = [m.new_cache(2, 10, dtype=dtype) for _ in range(layers)]
    measured = sum(c.bytes_per_token for c in caches)
    assert measured == (8 + 4) * size * layers
    assert latent_cache_bytes(layers, 8, 4, bytes_per_element=size) == measured
    assert (
        latent_cache_bytes(layers, 8, 4, seq_len=10, batch_size=2, bytes_per_element=size)
        == measured * 20
    )
    kv = KVCache(2, 10, n_kv_heads=4, head_dim=6, dtype=dtype)
    assert kv_cache_bytes(1, 4, 6, bytes_per_element=size) == kv.bytes_per_token == 2 * 4 * 6 * size
    with pytest.raises(ValueError, match="kv_lora_rank"):
        latent_cache_bytes(1, 0, 4)


def test_real_config_table():
    v3 = MLAConfig.from_hf({**REAL_CONFIGS["DeepSeek-V3 (671B)"], "n_routed_experts": 256})
    assert (v3.kv_lora_rank + v3.qk_rope_head_dim) == 576
    assert v3.yarn is not None and v3.yarn.factor == 40
    assert v3.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    rows = {(r["model"], r["scheme"]): r for r in cache_size_table()}
    mla = rows[("DeepSeek-V3 (671B)", "MLA")]
    mha = rows[("DeepSeek-V3 (671B)", "MHA")]
    assert mla["elements_per_token_per_layer"] == 576
    assert mha["elements_per_token_per_layer"] == 2 * 128 * 128
    assert mla["bytes_per_token"] == 576 * 2 * 61
    llama = rows[("Llama-3-70B-like (GQA baseline)", "GQA (8 KV heads)")]
    assert llama["bytes_per_token"] == 2 * 8 * 128 * 2 * 80
    assert mla["GiB_at_context"] == pytest.approx(576 * 2 * 61 * 131072 / 2**30)


def test_clear_errors():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAConfig(**{**TINY, "qk_rope_head_dim": 3})
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLAConfig(**{**TINY, "kv_lora_rank": 0})
    with pytest.raises(ValueError, match="q_lora_rank"):
        MLAConfig(**{**TINY, "q_lora_rank": 0})
    cache = LatentCache(1, 4, 8, 4)
    with pytest.raises(ValueError, match="c_kv must be"):
        cache.append(torch.zeros(1, 2, 7), torch.zeros(1, 2, 4))
    m = _tiny()
    with pytest.raises(ValueError, match="LatentCache"):
        m(torch.randn(1, 2, 32), KVCache(1, 4, 4, 6))
    with pytest.raises(ValueError, match="capacity exceeded"):
        m(torch.randn(1, 5, 32), m.new_cache(1, 4))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 2, 31))
