"""Positions: naive encodings, sinusoids, RoPE in both layouts, cached offsets and YaRN."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils.positional import (
    RotaryEmbedding,
    YarnScaling,
    apply_rope,
    binary_encoding,
    half_split_to_interleaved,
    integer_encoding,
    interleaved_to_half_split,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_encoding,
    yarn_get_mscale,
    yarn_inv_freq,
)


def test_integer_and_binary_encodings():
    assert integer_encoding(4, 3)[3].tolist() == [3.0, 3.0, 3.0]
    assert integer_encoding(5, 2, normalize=True)[:, 0].tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    enc = binary_encoding(8, 3)
    assert enc[5].tolist() == [1.0, 0.0, 1.0]  # 5 = 1 + 4, least significant bit first
    assert enc[6].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="n_bits >= 4"):
        binary_encoding(9, 3)


def test_sinusoidal_matches_the_formula():
    pe = sinusoidal_encoding(50, 16, base=10000.0)
    p, i = 37, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-5)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-5)


def test_sinusoidal_offset_is_a_fixed_linear_map():
    # PE[p + k] = M_k PE[p] with M_k a rotation per pair that does not depend on p.
    d, k = 8, 5
    pe = sinusoidal_encoding(40, d)
    w = rope_inv_freq(d)
    for p in (0, 7, 30):
        s, c = pe[p, 0::2], pe[p, 1::2]
        shifted_s = s * torch.cos(k * w) + c * torch.sin(k * w)
        shifted_c = c * torch.cos(k * w) - s * torch.sin(k * w)
        torch.testing.assert_close(pe[p + k, 0::2], shifted_s, atol=1e-5, rtol=0)
        torch.testing.assert_close(pe[p + k, 1::2], shifted_c, atol=1e-5, rtol=0)


def _score(q, k, m, n, interleaved):
    inv = rope_inv_freq(q.shape[-1])
    cq, sq = rope_cos_sin(torch.tensor([m]), inv)
    ck, sk = rope_cos_sin(torch.tensor([n]), inv)
    return (
        (apply_rope(q[None], cq, sq, interleaved) * apply_rope(k[None], ck, sk, interleaved))
        .sum()
        .item()
    )


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(0, 500),
    seed=st.integers(0, 10_000),
    interleaved=st.booleans(),
)
def test_rope_score_depends_only_on_the_offset(m, n, shift, seed, interleaved):
    g = torch.Generator().manual_seed(seed)
    q, k = (
        torch.randn(8, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64),
    )
    a = _score(q, k, m, n, interleaved)
    b = _score(q, k, m + shift, n + shift, interleaved)
    assert a == pytest.approx(b, abs=1e-4)


def test_rope_changes_scores_when_the_offset_changes():
    q, k = torch.randn(8), torch.randn(8)
    assert abs(_score(q, k, 3, 0, True) - _score(q, k, 4, 0, True)) > 1e-3


def test_rope_rotates_a_pair_by_the_angle():
    x = torch.tensor([[1.0, 0.0]])
    cos, sin = torch.tensor([[math.cos(0.3)]]), torch.tensor([[math.sin(0.3)]])
    torch.testing.assert_close(
        apply_rope(x, cos, sin), torch.tensor([[math.cos(0.3), math.sin(0.3)]])
    )


def test_layouts_agree_once_rows_are_permuted():
    x = torch.randn(2, 3, 6, 16)
    cos, sin = rope_cos_sin(torch.arange(6), rope_inv_freq(16))
    inter = apply_rope(x, cos, sin, interleaved=True)
    half = apply_rope(interleaved_to_half_split(x), cos, sin, interleaved=False)
    torch.testing.assert_close(interleaved_to_half_split(inter), half)
    torch.testing.assert_close(half_split_to_interleaved(interleaved_to_half_split(x)), x)
    # and without the permutation the two layouts are different rotations
    assert (apply_rope(x, cos, sin, interleaved=False) - inter).abs().max() > 1e-2


def test_offset_in_cached_decoding_equals_full_sequence_rotation():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 4, 10, 8)
    full = rope(x)
    steps = torch.cat(
        [rope(x[:, :, :4], 0)] + [rope(x[:, :, t : t + 1], t) for t in range(4, 10)], dim=2
    )
    torch.testing.assert_close(steps, full)


def test_rope_matches_transformers_interleaved_and_half_split():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 1, 7, 8)
    cos, sin = rope_cos_sin(torch.arange(7), rope_inv_freq(8))
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    hq, hk = apply_rotary_pos_emb_interleave(q, k, hf_cos, hf_sin)
    # transformers returns the interleaved rotation de-interleaved (same dot products)
    torch.testing.assert_close(interleaved_to_half_split(apply_rope(q, cos, sin, True)), hq)
    torch.testing.assert_close(interleaved_to_half_split(apply_rope(k, cos, sin, True)), hk)
    hq, _ = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, interleaved=False), hq)


YARN = {
    "type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}


def test_yarn_matches_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=32,
        v_head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rope_scaling=dict(YARN),
    )
    hf = DeepseekV3RotaryEmbedding(cfg)
    yarn = YarnScaling.from_hf(YARN)
    ours = yarn_inv_freq(32, 10000.0, yarn)
    torch.testing.assert_close(ours, hf.inv_freq, rtol=1e-6, atol=0)
    assert yarn.attention_factor == pytest.approx(hf.attention_scaling, rel=1e-12)
    assert yarn.attention_factor != 1.0  # the test config makes the cos/sin factor matter
    rope = RotaryEmbedding(32, 10000.0, yarn)
    cos, sin = rope.cos_sin(0, 300)
    hf_cos, hf_sin = hf(torch.zeros(1), torch.arange(300)[None])
    torch.testing.assert_close(cos, hf_cos[0, :, :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin[0, :, :16], rtol=1e-5, atol=1e-5)
    attn = DeepseekV3Attention(cfg, 0)
    assert (48**-0.5) * yarn.softmax_scale_factor == pytest.approx(attn.scaling, rel=1e-12)


def test_yarn_keeps_fast_pairs_and_slows_slow_ones():
    yarn = YarnScaling(factor=40, original_max_position_embeddings=4096)
    base = rope_inv_freq(64)
    scaled = yarn_inv_freq(64, 10000.0, yarn)
    assert scaled[0] == base[0]
    torch.testing.assert_close(scaled[-1], base[-1] / 40)
    assert yarn_get_mscale(40, 1.0) == pytest.approx(0.1 * math.log(40) + 1)
    assert yarn_get_mscale(1.0, 1.0) == 1.0


def test_clear_errors():
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(7)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(torch.randn(3, 8), torch.randn(3, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="yarn"):
        YarnScaling.from_hf({"type": "linear", "factor": 2})
    with pytest.raises(ValueError, match="beta_fast"):
        YarnScaling(factor=4, original_max_position_embeddings=16, beta_fast=1, beta_slow=2)
