"""Exercise checkers for notebooks 05 (heads, visually), 07 (KV cache), 08 (MQA) and 09 (GQA)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..attention import MultiHeadAttention, repeat_kv, scaled_dot_product_attention
from ..cache import kv_cache_bytes
from ._feedback import Feedback, call_learner, compare_tensors, not_attempted

__all__ = [
    "check_offset_attention",
    "check_attention_entropy",
    "check_kv_cache_bytes",
    "check_cached_decode_step",
    "check_mqa_attention",
    "check_mqa_cache_gib",
    "check_query_heads_of_kv_head",
    "check_expand_kv_weight",
]


def _causal_weights(h: int = 3, t: int = 6, seed: int = 0) -> Tensor:
    """Random causal attention weights (h, t, t): each row a distribution over keys 0..i."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(h, t, t, generator=g) * 2
    return scaled_dot_product_attention(
        scores,
        torch.eye(t).expand(h, t, t),
        torch.eye(t).expand(h, t, t),
        is_causal=True,
        scale=1.0,
        return_weights=True,
    )[1]


# -- 05 multi-head attention, visually ------------------------------------------------------


def offset_attention(weights: Tensor, k: int) -> Tensor:
    """Per head, the mean weight query i gives key i - k, over queries k..t-1. (h, t, t) -> (h,)."""
    return weights.diagonal(offset=-k, dim1=-2, dim2=-1).mean(-1)


def attention_entropy(weights: Tensor) -> Tensor:
    """Per head, the mean entropy (nats) of the rows of queries 1..t-1. (h, t, t) -> (h,)."""
    rows = weights[..., 1:, :]
    return -torch.special.xlogy(rows, rows).sum(-1).mean(-1)


def check_offset_attention(fn: Callable[[Tensor, int], Tensor] | None) -> Feedback:
    """Exercise 05.1: ``fn(weights, k)`` with weights (heads, t, t) returns, per head, the mean
    attention a query gives the token k places before it (k = 1: the previous token)."""
    hint = (
        "write offset_score(weights, k) that averages weights[h, i, i - k] over "
        "i = k .. t-1 for each head h"
    )
    w = _causal_weights(t=7)
    for k in (1, 2, 3):
        got, fb = call_learner(fn, hint, w.clone(), k)
        if fb is not None:
            return fb
        if isinstance(got, Tensor) and got.shape == (w.shape[0],):
            if torch.allclose(got.float(), w.diagonal(offset=k, dim1=-2, dim2=-1).mean(-1)):
                return Feedback(
                    False,
                    f"offset +{k} is {k} tokens in the FUTURE, which the "
                    f"causal mask hides (always 0); use offset -{k}",
                )
            sub = w.diagonal(offset=-k, dim1=-2, dim2=-1)
            if torch.allclose(got.float(), sub.sum(-1) / w.shape[-1], atol=1e-6):
                return Feedback(
                    False,
                    f"you divided by all t queries; the first {k} have no "
                    f"token {k} back, so average over the t - {k} that do",
                )
        bad = compare_tensors(got, offset_attention(w, k), f"offset_score(weights, {k})")
        if bad is not None:
            return bad
    return Feedback(
        True, "the k-th diagonal below the main one, averaged: k = 1 finds 'previous-token heads'"
    )


def check_attention_entropy(fn: Callable[[Tensor], Tensor] | None) -> Feedback:
    """Exercise 05.2: ``fn(weights)`` returns each head's mean entropy in nats over the rows of
    queries 1..t-1 (query 0 has one choice, entropy 0), with 0 * log 0 taken as 0."""
    hint = (
        "write attention_entropy(weights): -(w * log w).sum(-1) per row, 0 log 0 = 0, "
        "averaged over queries 1 .. t-1"
    )
    w = _causal_weights(seed=1)
    got, fb = call_learner(fn, hint, w.clone())
    if fb is not None:
        return fb
    want = attention_entropy(w)
    if isinstance(got, Tensor) and got.shape == want.shape:
        got = got.detach().float().cpu()
        if torch.isnan(got).any():
            return Feedback(
                False,
                "you got nan: the masked weights are 0 and 0 * log 0 is nan "
                "in floating point; treat it as 0 (torch.special.xlogy)",
            )
        all_rows = -torch.special.xlogy(w, w).sum(-1).mean(-1)
        if torch.allclose(got, all_rows, atol=1e-5):
            return Feedback(
                False,
                "you included query 0, whose entropy is always 0; average over queries 1 .. t-1",
            )
        if torch.allclose(got, want / torch.log(torch.tensor(2.0)), atol=1e-5):
            return Feedback(False, "that is in bits (log2); use the natural log (nats)")
    bad = compare_tensors(got, want, "attention_entropy(weights)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "low entropy = a focused head (one token gets most weight); high = a "
        "head that averages over many tokens",
    )


# -- 07 KV cache -----------------------------------------------------------------------------

_CONFIGS = [
    # (config, seq_len, batch, bytes per element); GQA first so query-heads mistakes show
    (
        {
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "hidden_size": 256,
        },
        1000,
        3,
        4,
    ),
    (
        {
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "hidden_size": 64,
        },
        77,
        1,
        2,
    ),
]


def _config_bytes(c: dict, seq: int, batch: int, elem: int, **change: int) -> int:
    args = {
        "num_layers": c["num_hidden_layers"],
        "num_kv_heads": c["num_key_value_heads"],
        "head_dim": c["hidden_size"] // c["num_attention_heads"],
        "seq_len": seq,
        "batch_size": batch,
        "bytes_per_element": elem,
    }
    args.update(change)
    return kv_cache_bytes(**args)


def check_kv_cache_bytes(fn: Callable[[dict, int, int, int], Any] | None) -> Feedback:
    """Exercise 07.1: ``fn(config, seq_len, batch_size, bytes_per_element)`` returns the bytes
    of the K/V cache of a model described by a Hugging Face style config dict
    (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``)."""
    hint = (
        "write cache_bytes(config, seq_len, batch_size, bytes_per_element) from the config "
        "keys; head_dim = hidden_size // num_attention_heads"
    )
    for c, seq, batch, elem in _CONFIGS:
        got, fb = call_learner(fn, hint, dict(c), seq, batch, elem)
        if fb is not None:
            return fb
        want = _config_bytes(c, seq, batch, elem)
        try:
            got_int = int(got)
        except (TypeError, ValueError):
            return Feedback(False, f"cache_bytes should return a number, got {got!r}")
        if got_int == want:
            continue
        mistakes = [
            (want // 2, "that is half: the cache stores keys AND values (a factor 2)"),
            (
                want // c["num_hidden_layers"],
                "that is one layer's cache; every layer keeps its own K and V",
            ),
            (
                _config_bytes(c, seq, batch, elem, num_kv_heads=c["num_attention_heads"]),
                "you used num_attention_heads; only the num_key_value_heads K/V heads are cached",
            ),
            (want // elem, "that counts elements; multiply by bytes_per_element for bytes"),
            (want // batch, "that is one sequence; each of the batch_size sequences has a cache"),
        ]
        for value, why in mistakes:
            if got_int == value:
                return Feedback(False, why)
        return Feedback(
            False,
            f"for {c} with seq_len={seq}, batch_size={batch}, "
            f"bytes_per_element={elem} you got {got_int:,}, expected {want:,}",
        )
    return Feedback(
        True,
        "2 (K and V) x layers x KV heads x head_dim x tokens x batch x bytes: "
        "the cache grows linearly with context and batch",
    )


def check_cached_decode_step(
    fn: Callable[[MultiHeadAttention, Tensor, Tensor, Tensor], Any] | None,
) -> Feedback:
    """Exercise 07.2: ``fn(attn, x_new, k_past, v_past)`` runs one decoding step by hand.

    attn: a :class:`MultiHeadAttention` (n_kv_heads == n_heads); x_new (b, 1, d_model);
    k_past, v_past (b, h, s, head_dim). Returns (out (b, 1, d_model), k_all, v_all) where k_all,
    v_all (b, h, s + 1, head_dim) are the caches with the new token appended.
    """
    hint = (
        "write decode_step(attn, x_new, k_past, v_past): project x_new, append its k/v to "
        "the caches, attend over all of them, apply o_proj"
    )
    torch.manual_seed(11)
    attn = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        cache = attn.new_cache(2, 6)
        attn(x[:, :5], cache=cache)
        k_past, v_past = cache.k[:, :, :5].clone(), cache.v[:, :, :5].clone()
        want = attn(x[:, 5:], cache=cache)
        k_all, v_all = cache.k.clone(), cache.v.clone()
        got, fb = call_learner(fn, hint, attn, x[:, 5:].clone(), k_past.clone(), v_past.clone())
    if fb is not None:
        return fb
    if not isinstance(got, tuple | list) or len(got) != 3:
        return Feedback(False, "decode_step should return three things: (out, k_all, v_all)")
    out, k_got, v_got = got
    bad = compare_tensors(k_got, k_all, "k_all") or compare_tensors(v_got, v_all, "v_all")
    if bad is not None:
        return bad
    if isinstance(out, Tensor) and out.shape == want.shape:
        with torch.no_grad():
            q = attn._split(attn.q_proj(x[:, 5:]), 4)
            unscaled = scaled_dot_product_attention(q, k_all, v_all, scale=1.0)
            past_only = scaled_dot_product_attention(q, k_past, v_past)
            variants = {
                "unscaled": attn.o_proj(unscaled.transpose(1, 2).reshape(2, 1, 16)),
                "past": attn.o_proj(past_only.transpose(1, 2).reshape(2, 1, 16)),
            }
        if torch.allclose(out.float(), variants["unscaled"], atol=1e-5):
            return Feedback(False, "the scores need the 1/sqrt(head_dim) scale, as in training")
        if torch.allclose(out.float(), variants["past"], atol=1e-5):
            return Feedback(
                False,
                "the new token must also attend to itself: append its k/v "
                "to the cache before attending",
            )
    bad = compare_tensors(out, want, "out", atol=1e-5)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "one new query against every cached key plus its own: the same "
        "output as re-running the whole sequence, for 1/t of the work",
    )


# -- 08 multi-query attention ----------------------------------------------------------------


def check_mqa_attention(fn: Callable[[Tensor, Tensor, Tensor], Any] | None) -> Feedback:
    """Exercise 08.1: ``fn(q, k, v)`` with q (b, h, t, d) and one shared K/V head k, v
    (b, 1, t, d) returns causal attention (b, h, t, d), every query head using the same K/V."""
    hint = "write mqa(q, k, v): softmax(q @ k^T / sqrt(d) + causal mask) @ v, broadcasting k, v"
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 4, 5, 8, generator=g),
        torch.randn(2, 1, 5, 8, generator=g),
        torch.randn(2, 1, 5, 8, generator=g),
    )
    got, fb = call_learner(fn, hint, q.clone(), k.clone(), v.clone())
    if fb is not None:
        return fb
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.expand_as(q), v.expand_as(q), is_causal=True
    )
    if isinstance(got, Tensor) and got.shape == want.shape:
        no_mask = scaled_dot_product_attention(q, k, v)
        if torch.allclose(got.float(), no_mask, atol=1e-5):
            return Feedback(False, "without the causal mask each query sees future tokens")
    bad = compare_tensors(got, want, "mqa(q, k, v)")
    if bad is not None:
        return bad
    return Feedback(True, "the one K/V head broadcasts over the query heads: no copy is needed")


def check_mqa_cache_gib(answer: tuple[float, float] | None) -> Feedback:
    """Exercise 08.2: GiB of fp16 K/V cache for a Llama-2-7B-shaped model (32 layers, 32 heads
    of 128), batch 8, 4096 tokens, as ``(with MHA, with MQA)``."""
    if answer is None:
        return not_attempted(
            "compute (mha_gib, mqa_gib) with 2 x layers x kv_heads x head_dim x "
            "tokens x batch x 2 bytes / 2**30"
        )
    want_mha = kv_cache_bytes(32, 32, 128, 4096, 8, 2) / 2**30
    want_mqa = kv_cache_bytes(32, 1, 128, 4096, 8, 2) / 2**30
    try:
        mha, mqa = (float(a) for a in answer)
    except (TypeError, ValueError):
        return Feedback(False, f"answer with a pair of numbers (mha_gib, mqa_gib), got {answer!r}")
    if math.isclose(mha, want_mha, rel_tol=1e-3) and math.isclose(mqa, want_mqa, rel_tol=1e-3):
        return Feedback(
            True,
            f"{want_mha:.0f} GiB with MHA (more than the fp16 weights), "
            f"{want_mqa:.1f} GiB with MQA: 32x less, one K/V head per layer",
        )
    if math.isclose(mha, want_mha / 2, rel_tol=1e-3):
        return Feedback(False, "your MHA number is half: count K and V")
    if math.isclose(mha, want_mha * 2**30 / 1e9, rel_tol=1e-3):
        return Feedback(False, "that is GB (10**9 bytes); the question asks GiB (2**30 bytes)")
    if math.isclose(mqa, want_mha, rel_tol=1e-3) or math.isclose(mqa, want_mha / 32 / 32):
        return Feedback(
            False, "MQA keeps one K/V head per layer: 32x less than MHA, not the same and not 1024x"
        )
    return Feedback(
        False, f"({mha}, {mqa}) is not it: compute bytes with the formula and divide by 2**30"
    )


# -- 09 grouped-query attention --------------------------------------------------------------


def check_query_heads_of_kv_head(fn: Callable[[int, int, int], Any] | None) -> Feedback:
    """Exercise 09.1: ``fn(n_heads, n_kv_heads, j)`` lists the query heads that read KV head j,
    in the layout of :class:`MultiHeadAttention` (and Hugging Face Llama/Mistral)."""
    hint = "write query_heads_of(n_heads, n_kv_heads, j) returning a list of query head indices"
    for n_heads, n_kv, j in ((8, 2, 1), (8, 4, 3), (4, 1, 0), (6, 6, 2)):
        got, fb = call_learner(fn, hint, n_heads, n_kv, j)
        if fb is not None:
            return fb
        group = n_heads // n_kv
        want = list(range(j * group, (j + 1) * group))
        try:
            got_list = sorted(int(i) for i in got)
        except (TypeError, ValueError):
            return Feedback(False, f"return a list of ints, got {got!r}")
        if got_list == want:
            continue
        if got_list == list(range(j, n_heads, n_kv)):
            return Feedback(
                False,
                f"that is the interleaved layout (every {n_kv}-th head); "
                "here a KV head serves a contiguous block of query heads: "
                "head i reads KV head i // (n_heads // n_kv_heads)",
            )
        return Feedback(
            False,
            f"with n_heads={n_heads}, n_kv_heads={n_kv}, KV head {j} serves "
            f"{len(want)} query heads; you returned {got_list}",
        )
    return Feedback(
        True,
        "query head i reads KV head i // group: each KV head serves a block "
        "of `group` consecutive query heads",
    )


def check_expand_kv_weight(fn: Callable[[Tensor, int, int], Any] | None) -> Feedback:
    """Exercise 09.2: ``fn(w, n_heads, n_kv_heads)`` turns a GQA ``k_proj.weight``
    (n_kv_heads * head_dim, d_model) into the MHA weight (n_heads * head_dim, d_model) that
    makes an MHA layer compute exactly what the GQA layer does."""
    hint = "write expand_kv_weight(w, n_heads, n_kv_heads): copy each KV head's rows per query head"
    n_heads, n_kv, hd, d = 8, 2, 3, 24
    w = torch.randn(n_kv * hd, d, generator=torch.Generator().manual_seed(5))
    got, fb = call_learner(fn, hint, w.clone(), n_heads, n_kv)
    if fb is not None:
        return fb
    per_head = w.view(n_kv, hd, d)
    want = repeat_kv(per_head[None], n_heads // n_kv)[0].reshape(n_heads * hd, d)
    if isinstance(got, Tensor) and got.shape == want.shape:
        tiled = w.repeat(n_heads // n_kv, 1)
        if torch.allclose(got.float(), tiled):
            return Feedback(
                False,
                "you tiled the whole weight (heads 0,1,0,1,...); query heads "
                "0..3 share KV head 0, so repeat each head's block in place "
                "(repeat_interleave over the head axis)",
            )
        if torch.allclose(got.float(), w.repeat_interleave(n_heads // n_kv, dim=0)):
            return Feedback(
                False,
                "you repeated single rows; repeat whole blocks of head_dim "
                "rows (view as (n_kv_heads, head_dim, d_model) first)",
            )
    bad = compare_tensors(got, want, "expand_kv_weight(w, 8, 2)")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "each KV head's block repeated for its group: GQA is MHA whose "
        "heads in a group are forced to share K and V",
    )
