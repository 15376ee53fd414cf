"""Exercise checkers for notebooks 22-23: GRPO's pieces and LoRA."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..distill import distillation_kl
from ..lora import LoRALinear
from ..ppo import gae
from ..rl import group_advantages, k3_kl
from ._feedback import Feedback, call_learner, compare_tensors

__all__ = [
    "check_group_advantages",
    "check_k3_kl",
    "check_clipped_objective",
    "check_gae",
    "check_lora_merge",
    "check_soft_kl",
    "check_group_signal",
]

# -- 22 GRPO ----------------------------------------------------------------------------------

_REWARDS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 0.25, 1.25, 0.0, 1.0, 0.25],
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    ]
)


def check_group_advantages(fn: Callable[[torch.Tensor, float], torch.Tensor] | None) -> Feedback:
    """Exercise 22.1: ``fn(rewards (B, G), eps) -> (B, G)``: (r - group mean) / (group std +
    eps), with the unbiased (G - 1) standard deviation, 0 for a group of equal rewards."""
    hint = "write group_advantages(rewards, eps): per row, (r - mean) / (std + eps)"
    eps = 1e-4
    got, fb = call_learner(fn, hint, _REWARDS.clone(), eps)
    if fb is not None:
        return fb
    want = group_advantages(_REWARDS, eps)
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().float()
        if torch.isnan(got_f).any():
            return Feedback(
                False,
                "you got NaN: a group whose rewards are all equal has std 0; "
                "add eps to the std (and its advantages are then 0)",
            )
        r = _REWARDS
        centered = r - r.mean(1, keepdim=True)
        population = centered / (r.std(1, keepdim=True, unbiased=False) + eps)
        if torch.allclose(got_f, population, atol=1e-4):
            return Feedback(
                False,
                "you divided by the population std (over G); use the unbiased "
                "one (over G - 1), as torch.std does by default",
            )
        whole = (r - r.mean()) / (r.std() + eps)
        if torch.allclose(got_f, whole, atol=1e-4):
            return Feedback(
                False,
                "you normalised over the whole batch; GRPO compares each "
                "completion with its own group, so take mean and std per row",
            )
        if torch.allclose(got_f, centered, atol=1e-4):
            return Feedback(
                False,
                "you centred the rewards but did not divide by the group's "
                "std (that is the Dr. GRPO variant, not GRPO's)",
            )
    bad = compare_tensors(got, want, "group_advantages", atol=1e-4)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "each completion is scored against its group; the all-zero group gives "
        "advantages of 0, so it teaches nothing",
    )


def check_k3_kl(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> Feedback:
    """Exercise 22.2: ``fn(logp_new, logp_ref) -> per-token k3 estimate`` of
    KL(pi_theta || pi_ref): exp(d) - d - 1 with d = logp_ref - logp_new."""
    hint = "write k3_kl(logp_new, logp_ref): d = logp_ref - logp_new, then exp(d) - d - 1"
    gen = torch.Generator().manual_seed(22)
    new = -torch.rand(3, 5, generator=gen) * 3
    ref = -torch.rand(3, 5, generator=gen) * 3
    got, fb = call_learner(fn, hint, new.clone(), ref.clone())
    if fb is not None:
        return fb
    want = k3_kl(new, ref)
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().float()
        if torch.allclose(got_f, k3_kl(ref, new), atol=1e-5):
            return Feedback(
                False,
                "you swapped the log-probs: d is logp_ref - logp_new (the ratio "
                "is pi_ref / pi_theta, since the samples come from pi_theta)",
            )
        if torch.allclose(got_f, new - ref, atol=1e-5):
            return Feedback(
                False,
                "that is the plain log-ratio (k1): unbiased too, but negative "
                "on many tokens; k3 = exp(d) - d - 1 is never negative",
            )
        if torch.allclose(got_f, torch.exp(ref - new) - (ref - new), atol=1e-5):
            return Feedback(
                False,
                "subtract 1: without it the estimate is 1 when the policies agree instead of 0",
            )
    bad = compare_tensors(got, want, "k3_kl")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "exp(d) - d - 1 >= 0 for every token, 0 where policy and reference "
        "agree, and its mean under the policy is the KL",
    )


def check_clipped_objective(
    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None,
) -> Feedback:
    """Exercise 22.3: ``fn(ratio (N, T), advantages (N, 1), clip_eps) -> (N, T)``: the per-token
    clipped surrogate min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)."""
    hint = (
        "write clipped_objective(ratio, advantages, clip_eps): the min of the plain and "
        "clipped terms"
    )
    ratio = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.1, 1.5]])
    adv = torch.tensor([[1.0], [-2.0]])
    eps = 0.2
    got, fb = call_learner(fn, hint, ratio.clone(), adv.clone(), eps)
    if fb is not None:
        return fb
    clipped = ratio.clamp(1 - eps, 1 + eps)
    want = torch.minimum(ratio * adv, clipped * adv)
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().float()
        if torch.allclose(got_f, clipped * adv):
            return Feedback(
                False,
                "you kept only the clipped term; take the min with the "
                "unclipped ratio * A, so the bound is pessimistic: a bad move "
                "is never clipped away",
            )
        if torch.allclose(got_f, torch.maximum(ratio * adv, clipped * adv)):
            return Feedback(
                False,
                "max instead of min: the objective must be the pessimistic "
                "(lower) of the two terms",
            )
        if torch.allclose(got_f, ratio * adv):
            return Feedback(False, "no clipping: ratios beyond 1 ± clip_eps must be clamped")
    bad = compare_tensors(got, want, "clipped_objective")
    if bad is not None:
        return bad
    return Feedback(
        True,
        "past 1 + eps (A > 0) or below 1 - eps (A < 0) the term is constant, so "
        "its gradient is 0: the update cannot push further",
    )


def check_gae(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor] | None,
) -> Feedback:
    """Exercise 22.4: ``fn(rewards (N, T), values (N, T), mask (N, T), gamma, lam) -> (N, T)``
    advantages by GAE: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 past a completion's last
    token), A_t = delta_t + gamma lam A_{t+1}, and 0 where mask is False."""
    hint = (
        "write gae(rewards, values, mask, gamma, lam): loop t from the last token back, "
        "A_t = delta_t + gamma * lam * A_{t+1}"
    )
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.5, 0.8], [0.3, 0.6, 5.0, 5.0]])  # junk past the end
    gamma, lam = 0.9, 0.8
    got, fb = call_learner(fn, hint, rewards.clone(), values.clone(), mask.clone(), gamma, lam)
    if fb is not None:
        return fb
    want = gae(rewards, values, mask, gamma, lam)[0]
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().float()
        leaky = gae(rewards, values, torch.ones_like(mask), gamma, lam)[0] * mask
        if torch.allclose(got_f, leaky, atol=1e-5):
            return Feedback(
                False,
                "the values after a completion's last token leaked in: V is 0 "
                "past the end (the episode is over), so stop the recursion "
                "at each completion's length",
            )
        if torch.allclose(got_f, gae(rewards, values, mask, gamma, 1.0)[0], atol=1e-5):
            return Feedback(
                False,
                "you left out lam: each later delta is discounted by "
                "(gamma * lam) per step, not gamma alone",
            )
        if torch.allclose(got_f, gae(rewards, values, mask, gamma, 0.0)[0], atol=1e-5):
            return Feedback(
                False,
                "that is the one-step TD error delta_t alone (lam = 0); add gamma * lam * A_{t+1}",
            )
    bad = compare_tensors(got, want, "gae", atol=1e-5)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "lam trades bias for variance: 1 gives the Monte-Carlo return minus V, "
        "0 trusts the critic after one step",
    )


# -- 23 LoRA ----------------------------------------------------------------------------------


def check_lora_merge(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor] | None,
) -> Feedback:
    """Exercise 23.1: ``fn(W (out, in), A (r, in), B (out, r), alpha, r) -> merged (out, in)``
    such that x @ merged.T equals the LoRA layer's output x @ W.T + (alpha / r) x @ A.T @ B.T."""
    hint = "write merge_lora_weight(W, A, B, alpha, r): W plus the scaled low-rank product"
    gen = torch.Generator().manual_seed(23)
    w = torch.randn(6, 5, generator=gen)
    a = torch.randn(2, 5, generator=gen)
    b = torch.randn(6, 2, generator=gen)
    alpha, r = 8.0, 2
    got, fb = call_learner(fn, hint, w.clone(), a.clone(), b.clone(), alpha, r)
    if fb is not None:
        return fb
    base = torch.nn.Linear(5, 6, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
        layer = LoRALinear(base, r, alpha)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    want = layer.merged().weight.detach()
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().float()
        if torch.allclose(got_f, w + b @ a, atol=1e-5):
            return Feedback(False, "you forgot the scale: the update is (alpha / r) * B @ A")
        if torch.allclose(got_f, w + (r / alpha) * b @ a, atol=1e-5):
            return Feedback(False, "the scale is alpha / r, not r / alpha")
    bad = compare_tensors(got, want, "the merged weight")
    if bad is not None:
        return bad
    x = torch.randn(4, 5, generator=gen)
    with torch.no_grad():
        same = torch.allclose(x @ got.detach().float().T, layer(x), atol=1e-5)
    if not same:
        return Feedback(False, "x @ merged.T does not reproduce the adapter's output")
    return Feedback(
        True,
        "W + (alpha / r) B A: one matrix again, so the merged model runs exactly "
        "as fast as the original",
    )


def check_soft_kl(
    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None,
) -> Feedback:
    """Exercise 23.2: ``fn(student_logits (N, V), teacher_logits (N, V), T) -> (N,)``: the
    forward KL(p || q) per row between p = softmax(teacher / T) and q = softmax(student / T),
    times T squared (Hinton et al. 2015), as :func:`course_utils.distill.distillation_kl`."""
    hint = (
        "write soft_kl(student_logits, teacher_logits, T): soften both with / T, then "
        "sum p (log p - log q) per row, times T**2"
    )
    gen = torch.Generator().manual_seed(232)
    student = torch.randn(4, 7, generator=gen) * 2
    teacher = torch.randn(4, 7, generator=gen) * 2
    t = 2.0
    got, fb = call_learner(fn, hint, student.clone(), teacher.clone(), t)
    if fb is not None:
        return fb
    want = distillation_kl(student, teacher, t, "forward", reduction="none")
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().float()
        if torch.allclose(got_f, want / t**2, atol=1e-5):
            return Feedback(
                False,
                "you forgot the T**2 factor: softened targets give gradients "
                "1/T**2 smaller, and T**2 restores their size",
            )
        if torch.allclose(
            got_f, distillation_kl(student, teacher, t, "reverse", reduction="none"), atol=1e-5
        ):
            return Feedback(
                False,
                "that is the reverse KL(q || p): weight by the teacher's p, sum p (log p - log q)",
            )
        if torch.allclose(
            got_f,
            distillation_kl(student, teacher, 1.0, "forward", reduction="none") * t**2,
            atol=1e-5,
        ):
            return Feedback(
                False,
                "divide the logits by T before the softmax: the temperature "
                "softens both distributions",
            )
    bad = compare_tensors(got, want, "soft_kl", atol=1e-5)
    if bad is not None:
        return bad
    return Feedback(
        True,
        "forward KL on softened distributions: the student is pushed to "
        "cover every token the teacher gives mass to",
    )


def check_group_signal(fn: Callable[[torch.Tensor, int], torch.Tensor] | None) -> Feedback:
    """Exercise 23.3: ``fn(p (N,), group_size) -> (N,)``: the chance that a group of
    ``group_size`` independent samples, each right with probability p, holds at least one right
    and at least one wrong answer, ``1 - (1 - p)**G - p**G``: the groups whose rewards differ,
    the only ones that give GRPO a gradient (notebook 23, section 4)."""
    hint = (
        "write group_signal(p, group_size): one minus the chance that all G samples are "
        "wrong, minus the chance that all are right"
    )
    p = torch.tensor([0.0, 0.008, 0.05, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    g = 8
    got, fb = call_learner(fn, hint, p.clone(), g)
    if fb is not None:
        return fb
    want = 1 - (1 - p) ** g - p**g
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got_f = got.detach().double()
        if torch.allclose(got_f, 1 - (1 - p) ** g, atol=1e-6):
            return Feedback(
                False,
                "a group where all G samples are right has no signal either: "
                "every advantage is zero; subtract p**G too",
            )
        if torch.allclose(got_f, g * p, atol=1e-6):
            return Feedback(
                False,
                "G * p is the expected number of right samples, not a "
                "probability (it exceeds 1 for large p)",
            )
    bad = compare_tensors(got, want.float(), "group_signal", atol=1e-5)
    if bad is not None:
        return bad
    return Feedback(
        True,
        f"with p = {p[1].item()} (a weak student) only "
        f"{want[1].item():.1%} of groups of {g} carry a signal; at p = 0.5, "
        f"{want[4].item():.1%}",
    )
