"""Exercise checkers for notebooks 16-18: mixture of experts, DeepSeekMoE, balancing."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..moe import (
    DeepSeekV3Router,
    MoEConfig,
    dispatch_reference,
    sequence_balance_loss,
    update_correction_bias,
)
from ._feedback import Feedback, call_learner, compare_tensors, not_attempted

__all__ = [
    "check_bias_update",
    "check_expert_capacity",
    "check_moe_dispatch",
    "check_sequence_balance_loss",
    "check_topk_softmax_router",
    "check_v3_active_expert_parameters",
    "check_v3_routing",
]


def _sorted_pair(indices: torch.Tensor, weights: torch.Tensor):
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def _unpack_choice(got, what: str) -> tuple[torch.Tensor, torch.Tensor] | Feedback:
    if not (
        isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)
    ):
        return Feedback(False, f"{what} should return a tuple (weights, indices) of tensors")
    weights, indices = got
    if indices.dtype.is_floating_point:
        return Feedback(
            False,
            f"{what}: the second item should be the integer expert indices "
            "(did you swap weights and indices?)",
        )
    return weights.float(), indices.long()


# -- 16 mixture of experts, the idea -------------------------------------------------------

_LOGITS = torch.tensor(
    [
        [2.0, 0.5, -1.0, 1.5, 0.0, 0.3],
        [-0.5, 0.1, 3.0, 0.2, 2.9, -2.0],
        [0.0, 0.0, 0.1, 0.0, -0.1, 1.0],
    ]
)


def check_topk_softmax_router(
    fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None,
) -> Feedback:
    """Exercise 16.1: ``fn(logits (T, E), k) -> (weights (T, k), indices (T, k))``: keep each
    token's k largest logits and softmax over just those k."""
    hint = "write topk_softmax_router(logits, k): top-k of the logits, then softmax over the k"
    for k in (1, 2, 3):
        got, fb = call_learner(fn, hint, _LOGITS.clone(), k)
        if fb is not None:
            return fb
        unpacked = _unpack_choice(got, "topk_softmax_router")
        if isinstance(unpacked, Feedback):
            return unpacked
        weights, indices = unpacked
        top, want_idx = _LOGITS.topk(k, dim=-1)
        want_w = top.softmax(-1)
        if indices.shape != want_idx.shape:
            return Feedback(
                False,
                f"with k={k} the indices should have shape "
                f"{tuple(want_idx.shape)}, got {tuple(indices.shape)}",
            )
        got_idx, got_w = _sorted_pair(indices, weights)
        want_idx_s, want_w_s = _sorted_pair(want_idx, want_w)
        if not torch.equal(got_idx, want_idx_s):
            return Feedback(
                False, f"with k={k} you chose other experts than the k largest logits of each token"
            )
        all_probs = _LOGITS.softmax(-1).gather(1, want_idx)
        if torch.allclose(got_w, _sorted_pair(want_idx, all_probs)[1], atol=1e-5):
            return Feedback(
                False,
                "those are the probabilities of a softmax over all experts; "
                "renormalise over the k chosen so each token's weights sum "
                "to 1",
            )
        bad = compare_tensors(got_w, want_w_s, "the weights")
        if bad is not None:
            return bad
    return Feedback(
        True, "each token keeps its k best experts, weighted by a softmax over just those k logits"
    )


def check_v3_active_expert_parameters(answer: int | float | None) -> Feedback:
    """Exercise 16.2: expert parameters of one DeepSeek-V3 MoE layer used per token (router
    excluded): hidden 7168, moe_intermediate_size 2048, 8 routed + 1 shared expert active."""
    if answer is None:
        return not_attempted(
            "each SwiGLU expert has 3 matrices of 7168 x 2048; count the "
            "experts a token actually uses"
        )
    per_expert = 3 * 7168 * 2048
    want = 9 * per_expert
    got = float(answer)
    if math.isclose(got, want, rel_tol=1e-6):
        return Feedback(
            True,
            f"9 experts (8 routed + 1 shared) x 3 x 7168 x 2048 = {want:,} "
            f"of the layer's {257 * per_expert:,} expert parameters",
        )
    if math.isclose(got, 8 * per_expert, rel_tol=1e-6):
        return Feedback(
            False, "you counted the 8 routed experts; the shared expert is always on too"
        )
    if math.isclose(got, 9 * 2 * 7168 * 2048, rel_tol=1e-6):
        return Feedback(False, "a SwiGLU expert has three matrices (gate, up, down), not two")
    if math.isclose(got, 257 * per_expert, rel_tol=1e-6):
        return Feedback(
            False,
            "that is every expert in the layer; a token only runs the ones "
            "its router picks, plus the shared one",
        )
    return Feedback(False, f"{answer} is not it: experts per token x parameters per expert")


def check_expert_capacity(fn: Callable[[int, int, int, float], int] | None) -> Feedback:
    """Exercise 16.3: ``fn(n_tokens, n_experts, k, capacity_factor)`` is the most tokens one
    expert accepts: ceil(capacity_factor * n_tokens * k / n_experts)."""
    hint = "write expert_capacity(n_tokens, n_experts, k, capacity_factor)"
    for args in ((1024, 8, 2, 1.25), (100, 16, 1, 1.0), (33, 4, 2, 1.5)):
        got, fb = call_learner(fn, hint, *args)
        if fb is not None:
            return fb
        n, e, k, cf = args
        want = math.ceil(cf * n * k / e)
        if got == want:
            continue
        if got == math.ceil(cf * n / e) and k > 1:
            return Feedback(False, "each token sends k copies out, so multiply by k")
        if isinstance(got, (int, float)) and math.isclose(got, cf * n * k / e) and got != want:
            return Feedback(False, "round up: a fractional capacity means one more slot")
        return Feedback(False, f"for {args} the capacity is {want}, you returned {got!r}")
    return Feedback(
        True,
        "capacity = ceil(factor x tokens x k / experts); tokens past it are "
        "dropped (or overflow to the next layer through the residual)",
    )


# -- 17 DeepSeekMoE hands-on ---------------------------------------------------------------


def _v3_case(seed: int, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=8, **kw)
    router = DeepSeekV3Router(cfg)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(6, 8)
    return cfg, router, x


def check_v3_routing(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None,
) -> Feedback:
    """Exercise 17.1: ``fn(scores, bias, k, n_group, topk_group, norm_topk_prob, scale)`` ->
    (weights, indices) of the DeepSeek-V3 router, given sigmoid ``scores`` (T, E) and the
    correction ``bias`` (E,)."""
    hint = "write v3_routing(scores, bias, k, n_group, topk_group, norm_topk_prob, scale)"
    cases = [
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        dict(
            n_routed_experts=12,
            num_experts_per_tok=3,
            n_group=3,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
    ]
    for seed, kw in enumerate(cases):
        cfg, router, x = _v3_case(seed, **kw)
        want = router(x)
        scores, bias = want.scores.clone(), router.e_score_correction_bias.clone()
        got, fb = call_learner(
            fn,
            hint,
            scores,
            bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        if fb is not None:
            return fb
        unpacked = _unpack_choice(got, "v3_routing")
        if isinstance(unpacked, Feedback):
            return unpacked
        weights, indices = unpacked
        if indices.shape != want.indices.shape:
            return Feedback(
                False,
                f"indices should have shape {tuple(want.indices.shape)}, "
                f"got {tuple(indices.shape)}",
            )
        got_idx, got_w = _sorted_pair(indices, weights)
        want_idx, want_w = _sorted_pair(want.indices, want.weights)
        if not torch.equal(got_idx, want_idx):
            return Feedback(
                False,
                "other experts than the V3 router picks: add the bias before "
                "choosing, score a group by the sum of its top-2 biased "
                "scores (not the max), and mask the other groups to -inf",
            )
        biased_w = (scores + bias).gather(1, want_idx)
        if cfg.norm_topk_prob:
            biased_w = biased_w / biased_w.sum(-1, keepdim=True)
        if torch.allclose(got_w, biased_w * cfg.routed_scaling_factor, atol=1e-5):
            return Feedback(
                False,
                "the weights must come from the unbiased scores: the bias "
                "only decides which experts are chosen",
            )
        bad = compare_tensors(got_w, want_w, "the weights")
        if bad is not None:
            return bad
    return Feedback(
        True,
        "biased scores choose the groups and experts; unbiased scores, "
        "renormalised when asked and scaled, weigh them",
    )


def check_moe_dispatch(fn: Callable[..., torch.Tensor] | None) -> Feedback:
    """Exercise 17.2: ``fn(x (T, H), experts, indices (T, k), weights (T, k)) -> (T, H)``: every
    token gets the weighted sum of its chosen experts' outputs."""
    hint = "write dispatch(x, experts, indices, weights) -> sum_k weights * experts[idx](x)"
    torch.manual_seed(0)
    from ..layers import SwiGLU

    experts = torch.nn.ModuleList(SwiGLU(6, 4) for _ in range(5))
    x = torch.randn(9, 6)
    indices = torch.stack([torch.randperm(5)[:2] for _ in range(9)])
    weights = torch.rand(9, 2)
    with torch.no_grad():
        want = dispatch_reference(x, experts, indices, weights)
        got, fb = call_learner(fn, hint, x.clone(), experts, indices.clone(), weights.clone())
    if fb is not None:
        return fb
    with torch.no_grad():
        unweighted = dispatch_reference(x, experts, indices, torch.ones_like(weights))
    if (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got.float(), unweighted, atol=1e-5)
    ):
        return Feedback(False, "you summed the expert outputs without the gate weights")
    bad = compare_tensors(got, want, "dispatch", atol=1e-5)
    if bad is not None:
        return bad
    return Feedback(True, "each token's output is the gate-weighted sum of its k experts")


# -- 18 balancing the experts --------------------------------------------------------------


def check_bias_update(
    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None,
) -> Feedback:
    """Exercise 18.1: ``fn(bias (E,), counts (E,), gamma) -> new bias`` with DeepSeek-V3's rule
    b_i + gamma * sign(mean(counts) - counts_i)."""
    hint = "write bias_update(bias, counts, gamma) returning the new bias"
    bias = torch.tensor([0.1, -0.2, 0.0, 0.05, 0.0])
    counts = torch.tensor([40.0, 5.0, 20.0, 15.0, 20.0])
    got, fb = call_learner(fn, hint, bias.clone(), counts.clone(), 0.01)
    if fb is not None:
        return fb
    want = update_correction_bias(bias.clone(), counts, 0.01)
    wrong_sign = update_correction_bias(bias.clone(), counts, -0.01)
    if (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got.float(), wrong_sign, atol=1e-7)
    ):
        return Feedback(
            False,
            "the sign is reversed: an overloaded expert (above the mean) "
            "must get a LOWER bias so it is chosen less",
        )
    bad = compare_tensors(got, want, "bias_update", atol=1e-7)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "overloaded experts step down by gamma, underloaded ones up, an "
        "expert exactly at the mean stays put",
    )


def check_sequence_balance_loss(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> Feedback:
    """Exercise 18.2: ``fn(scores (B, S, E), indices (B, S, k))`` -> DeepSeek-V3's sequence-wise
    balance loss without alpha, averaged over sequences."""
    hint = "write sequence_loss(scores, indices): per sequence sum_i f_i P_i, then the mean"
    torch.manual_seed(1)
    scores = torch.rand(3, 10, 6)
    indices = torch.stack(
        [torch.stack([torch.randperm(6)[:2] for _ in range(10)]) for _ in range(3)]
    )
    got, fb = call_learner(fn, hint, scores.clone(), indices.clone())
    if fb is not None:
        return fb
    want = sequence_balance_loss(scores, indices)
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        unnormalized = _seq_loss_unnormalized(scores, indices)
        if math.isclose(got.item(), unnormalized, rel_tol=1e-4) and not math.isclose(
            unnormalized, want.item(), rel_tol=1e-4
        ):
            return Feedback(
                False,
                "normalise each token's sigmoid scores to sum to 1 before averaging them into P_i",
            )
        bad = compare_tensors(got.reshape(()), want, "sequence_loss", atol=1e-5)
        if bad is not None:
            return bad
        return Feedback(
            True,
            "f_i (share of the sequence's choices, times E/k) times P_i (mean "
            "normalised affinity), summed and averaged over sequences",
        )
    return Feedback(False, "sequence_loss should return a scalar tensor")


def _seq_loss_unnormalized(scores: torch.Tensor, indices: torch.Tensor) -> float:
    b, s, e = scores.shape
    k = indices.shape[-1]
    counts = torch.zeros(b, e).scatter_add_(1, indices.reshape(b, -1), torch.ones(b, s * k))
    return float(((counts * e / (k * s)) * scores.mean(1)).sum(-1).mean())
