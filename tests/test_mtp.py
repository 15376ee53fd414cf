"""Multi-token prediction: alignment of the depth-k targets, the release's concatenation order,
the lambda-weighted loss, and speculative decoding that reproduces greedy decoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import DeepSeekConfig, DeepSeekForCausalLM
from course_utils.cache import KVCache
from course_utils.mtp import mtp_forward, mtp_loss_fn, mtp_parameter_count, speculative_generate
from course_utils.train import language_model_loss, train_language_model

TINY = dict(
    vocab_size=24,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=12,
    num_hidden_layers=2,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=8,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    num_nextn_predict_layers=1,
)


def _model(seed: int = 0, **over) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(DeepSeekConfig(**{**TINY, **over})).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _batch(seed: int, t: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(
        0, TINY["vocab_size"], (2, t + 1), generator=torch.Generator().manual_seed(seed)
    )
    return seq[:, :-1], seq[:, 1:]


def test_mtp_modules_exist_only_when_asked():
    assert len(_model().mtp) == 1 and mtp_parameter_count(_model()) > 0
    plain = _model(num_nextn_predict_layers=0)
    assert len(plain.mtp) == 0
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        mtp_forward(plain, *_batch(0))


@settings(max_examples=10, deadline=None)
@given(pos=st.integers(0, 7), seed=st.integers(0, 1000))
def test_depth_k_sees_exactly_the_tokens_up_to_i_plus_k(pos, seed):
    """Depth-k logits at position i use tokens x[0 .. i + k] and nothing after: changing
    x[i + k + 1] leaves them alone, changing x[i + k] moves them."""
    model = _model(seed % 3, num_nextn_predict_layers=2)
    x, y = _batch(seed)
    base = mtp_forward(model, x, y)
    full = torch.cat([x, y[:, -1:]], dim=1)  # the whole sequence x0 .. xT
    for k in (1, 2):
        if pos >= x.shape[1] - k:
            continue
        later = full.clone()
        later[:, pos + k + 1] = (later[:, pos + k + 1] + 1) % TINY["vocab_size"]
        out = mtp_forward(model, later[:, :-1], later[:, 1:])
        torch.testing.assert_close(out.mtp_logits[k - 1][:, pos], base.mtp_logits[k - 1][:, pos])
        now = full.clone()
        now[:, pos + k] = (now[:, pos + k] + 1) % TINY["vocab_size"]
        out = mtp_forward(model, now[:, :-1], now[:, 1:])
        assert not torch.allclose(out.mtp_logits[k - 1][:, pos], base.mtp_logits[k - 1][:, pos])


def test_depth_logits_have_one_position_less_per_depth():
    model = _model(num_nextn_predict_layers=2)
    x, y = _batch(1)
    out = mtp_forward(model, x, y)
    assert [tuple(t.shape[:2]) for t in out.mtp_logits] == [(2, 9), (2, 8)]
    torch.testing.assert_close(out.logits, model(x))


def test_concatenation_puts_the_embedding_first():
    """Zero eh_proj's second half of columns: if the embedding comes first (the released
    weights' order), the depth-1 output no longer depends on the trunk's hidden state."""
    model = _model()
    with torch.no_grad():
        model.mtp[0].eh_proj.weight[:, TINY["hidden_size"] :] = 0
    layer = model.mtp[0]
    e = torch.randn(1, 5, TINY["hidden_size"])
    h1, h2 = torch.randn(2, 1, 5, TINY["hidden_size"])
    torch.testing.assert_close(layer(h1, e), layer(h2, e))
    assert not torch.allclose(layer(h1, e), layer(h1, e + 1))


def test_loss_is_main_plus_lambda_times_mean_depth_loss():
    model = _model(num_nextn_predict_layers=2)
    x, y = _batch(2)
    record: list[list[float]] = []
    main, total = mtp_loss_fn(0.3, record)(model, x, y)
    out = mtp_forward(model, x, y)
    depth = [
        language_model_loss(out.mtp_logits[0], y[:, 1:]),
        language_model_loss(out.mtp_logits[1], y[:, 2:]),
    ]
    torch.testing.assert_close(main, language_model_loss(model(x), y))
    torch.testing.assert_close(total, main + 0.3 * (depth[0] + depth[1]) / 2)
    assert record == [[d.item() for d in depth]]
    _, only_main = mtp_loss_fn(0.0)(model, x, y)
    torch.testing.assert_close(only_main, main)
    with pytest.raises(ValueError, match="lam"):
        mtp_loss_fn(-1.0)


def test_training_with_the_mtp_loss_updates_the_mtp_module():
    model = _model().train()
    before = model.mtp[0].eh_proj.weight.detach().clone()
    x, y = _batch(3)
    result = train_language_model(
        model, lambda: (x, y), steps=3, lr=1e-2, progress=False, compute_loss=mtp_loss_fn(0.3)
    )
    assert len(result.losses) == 3
    assert not torch.equal(before, model.mtp[0].eh_proj.weight)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_decoding_reproduces_greedy(seed):
    model = _model(seed)
    prompt = torch.randint(
        0, TINY["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(seed)
    )
    want = model.generate(prompt, 20)
    got, stats = speculative_generate(model, prompt, 20)
    assert torch.equal(got, want)
    assert stats.new_tokens == 20
    assert stats.forwards + stats.accepted >= 20  # each accepted draft saves a forward
    assert stats.forwards <= 20


def test_speculative_decoding_stops_at_the_end_token():
    model = _model(4)
    prompt = torch.randint(
        0, TINY["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(4)
    )
    greedy = model.generate(prompt, 15)[0, 4:].tolist()
    eos = greedy[5]
    cut = greedy.index(eos) + 1
    got, stats = speculative_generate(model, prompt, 15, eos_token_id=eos)
    assert got[0, 4:].tolist() == greedy[:cut] and stats.new_tokens == cut


def test_a_draft_that_always_agrees_gives_two_tokens_per_forward():
    """Zero both final norms: main head and MTP head both output all-zero logits, so both
    choose token 0 every time and every draft is accepted."""
    model = _model()
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.mtp[0].shared_head.norm.weight.zero_()
    _, stats = speculative_generate(model, torch.zeros(1, 3, dtype=torch.long), 21)
    assert stats.acceptance_rate == 1.0
    assert stats.forwards == 11 and stats.tokens_per_forward == pytest.approx(21 / 11)


def test_speculative_decoding_rejects_batches():
    with pytest.raises(ValueError, match=r"\(1, t\)"):
        speculative_generate(_model(), torch.zeros(2, 3, dtype=torch.long), 4)


def test_cache_truncate_rolls_back_and_checks_its_argument():
    cache = KVCache(1, 8, 2, 4)
    k = torch.randn(1, 2, 5, 4)
    cache.append(k, k)
    cache.truncate(3)
    assert cache.length == 3
    keys, _ = cache.append(k[:, :, :1] + 1, k[:, :, :1])
    torch.testing.assert_close(keys[:, :, :3], k[:, :, :3])
    torch.testing.assert_close(keys[:, :, 3], k[:, :, 0] + 1)
    with pytest.raises(ValueError, match="length"):
        cache.truncate(9)


def test_masked_targets_are_ignored_not_embedded():
    """Completion-only batches carry -100 targets (prompt, padding). Depth k reads the token
    k steps ahead from the inputs, so masking a target changes no logit, and the loss skips
    exactly the masked positions."""
    model = _model(1, num_nextn_predict_layers=2)
    x, y = _batch(5)
    masked = y.clone()
    masked[:, :3] = -100
    masked[1, 7:] = -100
    plain, out = mtp_forward(model, x, y), mtp_forward(model, x, masked)
    for a, b in zip(plain.mtp_logits, out.mtp_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, total = mtp_loss_fn(0.3)(model, x, masked)
    main = language_model_loss(out.logits, masked)
    depth = [
        language_model_loss(logits, masked[:, k:])
        for k, logits in enumerate(out.mtp_logits, start=1)
    ]
    torch.testing.assert_close(total, main + 0.3 * sum(depth) / 2)
    assert torch.isfinite(total)


@pytest.mark.parametrize("seed", [0, 1])
def test_mtp_module_equals_transformers_mtp_path(tmp_path, seed):
    """transformers' MtpModel (what generate(use_mtp=True) drafts with) loads our saved MTP
    layer and gives the same depth-1 logits: it reads the main model's final (normed) hidden
    state, concatenates [enorm(embedding); hnorm(hidden)] and applies shared_head.norm (its
    post_norm) before the shared head."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_layers import MtpModel

    from course_utils.checkpoint import save_hf_checkpoint

    model = _model(seed)
    with torch.no_grad():  # norms away from 1, so a missing or misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)
    save_hf_checkpoint(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # transformers finds the MTP weights by DeepSeek-V3's own layer number (model.layers.61.*);
    # a tiny model stores them after its own last layer, as the release does after its 61st
    layers = model.config.num_hidden_layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{layers}.*"]
    hf_mtp = MtpModel.from_pretrained(hf).eval()
    x, y = _batch(seed, t=9)
    with torch.no_grad():
        ours = mtp_forward(model, x, y)
        out = hf(x, output_hidden_states=True)
        torch.testing.assert_close(out.logits, ours.logits, rtol=1e-4, atol=1e-5)
        last = out.hidden_states[-1][:, :-1]
        positions = torch.arange(1, x.shape[1])[None]  # the embedded tokens' positions
        h = hf_mtp.forward_layer(0, last, positions, None, input_ids=x[:, 1:])
        theirs = hf_mtp._project_to_logits(h)
    torch.testing.assert_close(theirs, ours.mtp_logits[0], rtol=1e-4, atol=1e-5)
