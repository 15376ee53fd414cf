"""Each checker of notebooks 05, 07-09: right answers pass, typical mistakes fail with the
reason, None is "not attempted", and a crashing answer is reported, not raised."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils import exercises as ex
from course_utils.attention import scaled_dot_product_attention


def _crash(*args):
    raise RuntimeError("oops")


def _bytes(c, seq, batch, elem, heads_key="num_key_value_heads", k_and_v=2, layers=True):
    hd = c["hidden_size"] // c["num_attention_heads"]
    n_layers = c["num_hidden_layers"] if layers else 1
    return k_and_v * n_layers * c[heads_key] * hd * seq * batch * elem


def _decode_step(attn, x_new, k_past, v_past, scale=True, append=True):
    b, t, d = x_new.shape
    h, hd = attn.n_heads, attn.head_dim
    q = attn.q_proj(x_new).view(b, t, h, hd).transpose(1, 2)
    k = attn.k_proj(x_new).view(b, t, h, hd).transpose(1, 2)
    v = attn.v_proj(x_new).view(b, t, h, hd).transpose(1, 2)
    k_all, v_all = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)
    keys, values = (k_all, v_all) if append else (k_past, v_past)
    scores = q @ keys.transpose(-2, -1) / (math.sqrt(hd) if scale else 1.0)
    out = torch.softmax(scores, -1) @ values
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, d)), k_all, v_all


def _mqa(q, k, v, causal=True):
    return scaled_dot_product_attention(q, k, v, is_causal=causal)


def _expand(w, n_heads, n_kv, tile=False):
    if tile:
        return w.repeat(n_heads // n_kv, 1)
    hd = w.shape[0] // n_kv
    return w.view(n_kv, hd, -1).repeat_interleave(n_heads // n_kv, 0).reshape(n_heads * hd, -1)


@pytest.mark.parametrize(
    "checker, right, wrongs",
    [
        (
            ex.check_offset_attention,
            lambda w, k: w.diagonal(offset=-k, dim1=-2, dim2=-1).mean(-1),
            [
                (lambda w, k: w.diagonal(offset=k, dim1=-2, dim2=-1).mean(-1), "FUTURE"),
                (
                    lambda w, k: w.diagonal(offset=-k, dim1=-2, dim2=-1).sum(-1) / w.shape[-1],
                    "divided by all t",
                ),
                (lambda w, k: w.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1), "off by"),
            ],
        ),
        (
            ex.check_attention_entropy,
            lambda w: -torch.special.xlogy(w[:, 1:], w[:, 1:]).sum(-1).mean(-1),
            [
                (lambda w: -(w[:, 1:] * w[:, 1:].log()).sum(-1).mean(-1), "nan"),
                (lambda w: -torch.special.xlogy(w, w).sum(-1).mean(-1), "query 0"),
                (
                    lambda w: (
                        -(torch.special.xlogy(w[:, 1:], w[:, 1:]) / math.log(2)).sum(-1).mean(-1)
                    ),
                    "bits",
                ),
            ],
        ),
        (
            ex.check_kv_cache_bytes,
            _bytes,
            [
                (lambda c, s, b, e: _bytes(c, s, b, e, k_and_v=1), "keys AND values"),
                (lambda c, s, b, e: _bytes(c, s, b, e, layers=False), "every layer"),
                (
                    lambda c, s, b, e: _bytes(c, s, b, e, heads_key="num_attention_heads"),
                    "num_key_value_heads",
                ),
                (lambda c, s, b, e: _bytes(c, s, b, 1), "bytes_per_element"),
                (lambda c, s, b, e: _bytes(c, s, 1, e), "batch_size"),
                (lambda c, s, b, e: "many", "a number"),
            ],
        ),
        (
            ex.check_cached_decode_step,
            _decode_step,
            [
                (lambda *a: _decode_step(*a, scale=False), "sqrt"),
                (lambda *a: _decode_step(*a, append=False), "attend to itself"),
                (lambda *a: _decode_step(*a)[0], "three things"),
            ],
        ),
        (
            ex.check_mqa_attention,
            _mqa,
            [
                (lambda q, k, v: _mqa(q, k, v, causal=False), "causal mask"),
                (lambda q, k, v: _mqa(q, k, v)[:, :1], "shape"),
            ],
        ),
        (
            ex.check_query_heads_of_kv_head,
            lambda h, n, j: list(range(j * h // n, (j + 1) * h // n)),
            [
                (lambda h, n, j: list(range(j, h, n)), "interleaved"),
                (lambda h, n, j: [j], "serves"),
            ],
        ),
        (
            ex.check_expand_kv_weight,
            _expand,
            [
                (lambda w, h, n: _expand(w, h, n, tile=True), "tiled"),
                (lambda w, h, n: w.repeat_interleave(h // n, dim=0), "single rows"),
            ],
        ),
    ],
)
def test_function_checkers(checker, right, wrongs):
    verdict = checker(right)
    assert verdict and verdict.attempted, verdict
    for wrong, reason in wrongs:
        verdict = checker(wrong)
        assert not verdict and verdict.attempted and reason in verdict.message, verdict
    assert not checker(None) and not checker(None).attempted
    assert not checker(lambda *a: (_ for _ in ()).throw(NotImplementedError())).attempted
    crashed = checker(_crash)
    assert not crashed and "RuntimeError" in crashed.message


def test_mqa_cache_gib():
    mha, mqa = 2 * 32 * 32 * 128 * 4096 * 8 * 2 / 2**30, 2 * 32 * 128 * 4096 * 8 * 2 / 2**30
    assert mha == 16.0 and mqa == 0.5
    assert ex.check_mqa_cache_gib((mha, mqa))
    assert "K and V" in ex.check_mqa_cache_gib((mha / 2, mqa / 2)).message
    assert "GB" in ex.check_mqa_cache_gib((mha * 2**30 / 1e9, mqa * 2**30 / 1e9)).message
    assert "32x less" in ex.check_mqa_cache_gib((mha, mha)).message
    assert "pair" in ex.check_mqa_cache_gib("sixteen").message
    assert not ex.check_mqa_cache_gib(None).attempted
