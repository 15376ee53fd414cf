from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils.attention import (
    CausalSelfAttention,
    MultiHeadAttention,
    SelfAttention,
    causal_mask,
    scaled_dot_product_attention,
)
from course_utils.cache import KVCache
from course_utils.decoder import DecoderConfig, TinyDecoder
from course_utils.generation import generate


def _qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(3)]


# -- the bare formula ----------------------------------------------------------------------


def test_sdpa_matches_pytorch_without_and_with_causal_mask():
    q, k, v = _qkv(2, 3, 7, 8)
    assert torch.allclose(
        scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6
    )
    assert torch.allclose(
        scaled_dot_product_attention(q, k, v, is_causal=True),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        atol=1e-6,
    )


def test_sdpa_masks_and_scale_match_pytorch():
    q, k, v = _qkv(2, 5, 8)
    bool_mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    bool_mask |= torch.eye(5, dtype=torch.bool)  # every query sees at least one key
    float_mask = torch.randn(5, 5)
    for mask in (bool_mask, float_mask):
        assert torch.allclose(
            scaled_dot_product_attention(q, k, v, mask=mask, scale=0.3),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
            atol=1e-6,
        )


def test_causal_with_fewer_queries_is_bottom_right_aligned():
    # 3 new queries after 4 cached keys: query i sits at position 4 + i
    q, _, _ = _qkv(1, 3, 8, seed=2)
    _, k, v = _qkv(1, 7, 8, seed=3)
    mask = torch.tensor([[j <= 4 + i for j in range(7)] for i in range(3)])
    assert torch.equal(causal_mask(3, 7), mask)
    assert torch.allclose(
        scaled_dot_product_attention(q, k, v, is_causal=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        atol=1e-6,
    )


def test_weights_are_returned_and_rows_sum_to_one():
    q, k, v = _qkv(4, 6)
    out, w = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    assert torch.allclose(w.sum(-1), torch.ones(4))
    assert torch.all(w.triu(1) == 0)
    assert torch.allclose(out, w @ v)


def test_dropout_is_unbiased_and_reproducible():
    q, k, v = _qkv(6, 4)
    ref = scaled_dot_product_attention(q, k, v)
    g = torch.Generator().manual_seed(0)
    runs = torch.stack(
        [scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=g) for _ in range(4000)]
    )
    assert torch.allclose(runs.mean(0), ref, atol=0.05)
    a, b = (
        scaled_dot_product_attention(
            q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    )
    assert torch.equal(a, b) and not torch.allclose(a, ref)


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv(5, 8)
    with pytest.raises(ValueError, match="mask must broadcast"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same last dimension"):
        scaled_dot_product_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=16"):
        MultiHeadAttention(16, 3)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        MultiHeadAttention(16, 4, n_kv_heads=3)


# -- single heads --------------------------------------------------------------------------


def test_self_attention_is_sdpa_of_its_projections():
    torch.manual_seed(0)
    sa, x = SelfAttention(6, 4), torch.randn(2, 5, 6)
    ref = F.scaled_dot_product_attention(sa.W_q(x), sa.W_k(x), sa.W_v(x))
    assert torch.allclose(sa(x), ref, atol=1e-6)
    csa = CausalSelfAttention(6, 4)
    csa.load_state_dict(sa.state_dict())
    ref = F.scaled_dot_product_attention(sa.W_q(x), sa.W_k(x), sa.W_v(x), is_causal=True)
    assert torch.allclose(csa(x), ref, atol=1e-6)


# -- multi-head ----------------------------------------------------------------------------


def test_mha_matches_torch_multihead_attention():
    torch.manual_seed(0)
    d, h = 16, 4
    ours = MultiHeadAttention(d, h, bias=True, causal=False)
    ref = torch.nn.MultiheadAttention(d, h, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)
    x = torch.randn(3, 7, d)
    want, _ = ref(x, x, x, need_weights=False)
    assert torch.allclose(ours(x), want, atol=1e-5)
    # causal: PyTorch's mask convention is True = blocked
    ours.causal = True
    want, _ = ref(x, x, x, attn_mask=~causal_mask(7), need_weights=False)
    assert torch.allclose(ours(x), want, atol=1e-5)


def test_mha_equals_concatenated_single_heads():
    torch.manual_seed(1)
    d, h = 12, 3
    mha, x = MultiHeadAttention(d, h), torch.randn(2, 6, d)
    hd = d // h
    heads = []
    for i in range(h):
        rows = slice(i * hd, (i + 1) * hd)
        q = x @ mha.q_proj.weight[rows].T
        k = x @ mha.k_proj.weight[rows].T
        v = x @ mha.v_proj.weight[rows].T
        heads.append(scaled_dot_product_attention(q, k, v, is_causal=True))
    want = torch.cat(heads, dim=-1) @ mha.o_proj.weight.T
    assert torch.allclose(mha(x), want, atol=1e-5)


def test_keep_weights_path_equals_fused_path():
    torch.manual_seed(2)
    mha, x = MultiHeadAttention(16, 4, n_kv_heads=2), torch.randn(2, 5, 16)
    fast = mha(x)
    mha.keep_weights = True
    slow = mha(x)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert mha.last_weights.shape == (2, 4, 5, 5)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_shared_kv_weights(n_kv_heads):
    torch.manual_seed(3)
    d, h = 16, 4
    gqa = MultiHeadAttention(d, h, n_kv_heads=n_kv_heads)
    mha = MultiHeadAttention(d, h)
    hd, group = d // h, h // n_kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        # KV head j serves query heads j*group .. j*group+group-1: repeat its rows per head
        for proj in ("k_proj", "v_proj"):
            w = getattr(gqa, proj).weight.view(n_kv_heads, hd, d)
            getattr(mha, proj).weight.copy_(w.repeat_interleave(group, dim=0).reshape(d, d))
    x = torch.randn(2, 6, d)
    assert torch.allclose(gqa(x), mha(x), atol=1e-6)
    assert gqa.k_proj.weight.shape == (n_kv_heads * hd, d)


# -- causality -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_future_tokens_never_change_the_past(t, seed):
    torch.manual_seed(0)
    model = TinyDecoder(
        DecoderConfig(
            vocab_size=20,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (2, 10), generator=g)
    changed = ids.clone()
    changed[:, t:] = torch.randint(0, 20, (2, 10 - t), generator=g)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)


# -- the KV cache --------------------------------------------------------------------------


def test_kv_cache_capacity_reset_and_bytes():
    cache = KVCache(batch_size=2, capacity=5, n_kv_heads=3, head_dim=4)
    assert cache.bytes_per_token == 2 * 3 * 4 * 4  # K and V, fp32
    k = torch.randn(2, 3, 4, 4)
    ks, _ = cache.append(k, k)
    assert ks.shape == (2, 3, 4, 4) and cache.length == 4
    with pytest.raises(ValueError, match="capacity exceeded"):
        cache.append(k[:, :, :2], k[:, :, :2])
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="batch_size=2"):
        cache.append(k[:1], k[:1])
    with pytest.raises(ValueError, match="k and v must both be"):
        cache.append(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_cached_forward_equals_full_forward(n_kv_heads):
    torch.manual_seed(4)
    mha = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads).eval()
    x = torch.randn(2, 9, 16)
    full = mha(x)
    cache = mha.new_cache(2, 9)
    pieces = [mha(x[:, :4], cache=cache)] + [mha(x[:, i : i + 1], cache=cache) for i in range(4, 7)]
    pieces.append(mha(x[:, 7:], cache=cache))  # two tokens at once after a prefix
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_cached_generation_equals_uncached(n_kv_heads):
    torch.manual_seed(5)
    model = TinyDecoder(
        DecoderConfig(
            vocab_size=30,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=n_kv_heads,
        )
    )
    prompt = torch.randint(0, 30, (3, 5))
    a, la = generate(model, prompt, 12, use_cache=True, return_logits=True)
    b, lb = generate(model, prompt, 12, use_cache=False, return_logits=True)
    assert torch.equal(a, b)
    assert torch.allclose(la, lb, atol=1e-6)
    # sampling with the same generator seed also agrees
    s1 = generate(
        model, prompt, 8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0)
    )
    s2 = generate(
        model,
        prompt,
        8,
        temperature=1.0,
        top_k=10,
        use_cache=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(s1, s2)


def test_generation_stops_at_eos_and_checks_capacity():
    torch.manual_seed(6)
    model = TinyDecoder(
        DecoderConfig(
            vocab_size=10,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    )
    prompt = torch.zeros(2, 3, dtype=torch.long)
    greedy = generate(model, prompt, 5)
    eos = int(greedy[0, 3])  # the first generated token of row 0 becomes "end of sequence"
    out = generate(model, prompt, 5, eos_token_id=eos)
    first = out[0, 3:]
    assert torch.all(first == eos)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, prompt, 20)


def test_kv_cache_bytes_formula_matches_a_real_cache():
    from course_utils.cache import kv_cache_bytes

    model = TinyDecoder(
        DecoderConfig(
            vocab_size=10,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    caches = model.new_caches(batch_size=2, capacity=7)
    measured = sum(c.nbytes for c in caches)
    assert measured == kv_cache_bytes(3, 2, 8, seq_len=7, batch_size=2, bytes_per_element=4)
    # Llama-2-7B-like: 32 layers x 32 heads x 128, fp16 -> 0.5 MiB per token
    assert kv_cache_bytes(32, 32, 128) == 512 * 1024
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_cache_bytes(32, 0, 128)


# -- TinyDecoder with multi-head latent attention (notebooks 08/09's fifth arm) -------------


def _mla_decoder(**overrides) -> TinyDecoder:
    torch.manual_seed(7)
    cfg = dict(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=6
    )
    return TinyDecoder(DecoderConfig(**{**cfg, **overrides}))


def test_tiny_decoder_with_mla_runs_the_library_mla_block():
    from course_utils.mla import LatentCache, MLAConfig, MultiHeadLatentAttention

    model = _mla_decoder()
    attn = model.layers[0].self_attn
    assert isinstance(attn, MultiHeadLatentAttention)
    # heads keep the MHA head size; positions come from the decoder's embedding (no RoPE part)
    want = MLAConfig(
        hidden_size=32,
        num_attention_heads=4,
        kv_lora_rank=6,
        qk_nope_head_dim=8,
        qk_rope_head_dim=0,
        v_head_dim=8,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    assert attn.config == want
    ref = MultiHeadLatentAttention(want)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref(x))
        # the decoder's block is x + attn(norm(x)), then + mlp(norm(x))
        block = model.layers[0]
        h = x + ref(block.input_layernorm(x))
        h = h + block.mlp(block.post_attention_layernorm(h))
        torch.testing.assert_close(block(x), h)
    caches = model.new_caches(batch_size=2, capacity=5)
    assert all(isinstance(c, LatentCache) for c in caches)
    # kv_lora_rank numbers per token and layer, fp32: 6 * 4 bytes * 2 layers
    assert sum(c.bytes_per_token for c in caches) == 6 * 4 * 2


def test_tiny_decoder_with_mla_caches_exactly_and_is_causal():
    model = _mla_decoder().eval()
    prompt = torch.randint(0, 30, (3, 5))
    a, la = generate(model, prompt, 10, use_cache=True, return_logits=True)
    b, lb = generate(model, prompt, 10, use_cache=False, return_logits=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, 30, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 30
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :5], model(changed)[:, :5])


def test_tiny_decoder_mla_options_are_checked():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        _mla_decoder(kv_lora_rank=0)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        _mla_decoder(num_key_value_heads=2)  # GQA and MLA are two different answers
