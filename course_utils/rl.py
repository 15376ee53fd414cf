"""Reinforcement learning with rule-based rewards: GRPO, as in DeepSeekMath and DeepSeek-R1.

Group Relative Policy Optimization (DeepSeekMath paper, section 4.1) drops PPO's value network:
for each prompt it samples a **group** of G completions, scores them with a reward, and uses
each completion's reward relative to its group as the advantage of all its tokens,

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)          (Bessel-corrected std)

The loss for one group is, with ratio_t = pi_theta(o_t | ...) / pi_old(o_t | ...),

    - 1/G sum_i 1/|o_i| sum_t [ min(ratio_t A_i, clip(ratio_t, 1-eps, 1+eps) A_i)
                                - beta * KL_t ],
    KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1     (the "k3" estimator, always >= 0)

This module has each piece separately so notebook 22 can build and test it term by term:

- rewards: :func:`correctness_reward`, :func:`format_reward`, combined with named weights by
  :func:`make_reward_fn`;
- :func:`sample_groups`: G completions per prompt from the KV-cached generator, with per-token
  log-probabilities and a completion mask; :func:`completion_logprobs` recomputes them with
  gradients;
- :func:`group_advantages`, :func:`k3_kl`, :func:`grpo_loss` (with the DAPO and Dr. GRPO
  variants named);
- :func:`grpo_step` and :func:`train_grpo`: the loop, with a history of what changed.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arithmetic import ArithmeticTask, evaluate_accuracy
from .data import ArithmeticProblem, check_completion, is_well_formed, uses_worked_steps
from .generation import CausalLM, generate
from .moe import (
    forget_routing,
    moe_modules,
    recorded_routing,
    replay_routing,
    routing_changed,
)
from .runtime import device_of, make_generator
from .train import make_optimizer

if TYPE_CHECKING:
    from .model import DeepSeekForCausalLM
    from .pretrain import PretrainConfig

__all__ = [
    "correctness_reward",
    "format_reward",
    "is_well_formed",
    "REWARD_FUNCTIONS",
    "Rewards",
    "make_reward_fn",
    "check_rewards",
    "GroupSamples",
    "completion_mask",
    "sample_groups",
    "completion_logprobs",
    "group_advantages",
    "count_zero_variance_groups",
    "k3_kl",
    "AGGREGATIONS",
    "grpo_loss",
    "sequence_logprobs",
    "dpo_loss",
    "GRPOConfig",
    "GRPOHistory",
    "grpo_step",
    "run_policy_loop",
    "train_grpo",
    "grpo_training_problems",
    "load_or_train_grpo",
    "grpo_checkpoint_path",
    "save_grpo_checkpoint",
]

# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------

RewardFn = Callable[[ArithmeticProblem, str], float]


def correctness_reward(problem: ArithmeticProblem, completion: str) -> float:
    """1.0 when the completion's final answer equals the sum, else 0.0.

    The exact verifier :func:`course_utils.data.check_completion`: the answer must be digits
    followed by the end token, after an optional closed ``<...>`` block; anything unterminated,
    malformed or with extra characters scores 0.
    """
    return 1.0 if check_completion(problem, completion) else 0.0


def format_reward(problem: ArithmeticProblem, completion: str) -> float:
    """1.0 for a well-formed worked-steps completion (:func:`is_well_formed`), else 0.0. It
    rewards the shape of the reasoning, not its truth, like R1's format reward for
    ``<think>`` tags."""
    return 1.0 if is_well_formed(problem, completion) else 0.0


#: The rewards :func:`make_reward_fn` knows by name.
REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "correctness": correctness_reward,
    "format": format_reward,
}


@dataclass
class Rewards:
    """Rewards of N completions: ``total`` (N,) float32 = sum_k weight_k * ``components[k]``."""

    total: Tensor
    components: dict[str, Tensor]


def make_reward_fn(
    weights: Mapping[str, float] | None = None,
    reward_fns: Mapping[str, RewardFn] | None = None,
) -> Callable[[Sequence[ArithmeticProblem], Sequence[str]], Rewards]:
    """A reward function ``(problems, completions) -> Rewards`` that sums named rewards.

    ``weights`` maps a reward's name to its weight (default ``{"correctness": 1.0}``); names
    are looked up in ``reward_fns`` first, then in :data:`REWARD_FUNCTIONS`. Pass your own
    ``reward_fns`` to try another verifier (a buggy one, to watch reward hacking).
    """
    weights = dict({"correctness": 1.0} if weights is None else weights)
    known = {**REWARD_FUNCTIONS, **(reward_fns or {})}
    if not weights:
        raise ValueError("weights is empty; name at least one reward, e.g. {'correctness': 1}")
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(
            f"unknown reward(s) {unknown}; known: {sorted(known)} (pass your own in reward_fns)"
        )

    def reward_fn(problems: Sequence[ArithmeticProblem], completions: Sequence[str]) -> Rewards:
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        components = {
            name: check_rewards(
                torch.tensor(
                    [float(known[name](p, c)) for p, c in zip(problems, completions, strict=True)],
                    dtype=torch.float32,
                ),
                len(completions),
                f"reward {name!r}",
            )
            for name in weights
        }
        # weights is not empty, so the sum is a tensor (not sum()'s int start 0)
        total = cast(Tensor, sum(w * components[name] for name, w in weights.items()))
        return Rewards(total, components)

    return reward_fn


def check_rewards(rewards: object, n: int, name: str = "reward_fn") -> Tensor:
    """``rewards`` as a float32 (n,) tensor, or a ``ValueError`` naming ``name`` when it is not
    a tensor of n finite numbers (a NaN reward would silently poison every advantage of its
    group)."""
    if not isinstance(rewards, Tensor):
        raise ValueError(
            f"{name} must return a tensor of {n} rewards, got {type(rewards).__name__}"
        )
    if rewards.shape != (n,):
        raise ValueError(
            f"{name} returned shape {tuple(rewards.shape)}; expected ({n},), one "
            "reward per completion"
        )
    if not torch.isfinite(rewards).all():
        bad = int((~torch.isfinite(rewards)).sum())
        raise ValueError(
            f"{name} returned {bad} non-finite reward(s) (NaN or inf); make the "
            "verifier return a number for every completion, e.g. 0 for unparsable"
        )
    return rewards.float()


# --------------------------------------------------------------------------------------------
# Sampling groups
# --------------------------------------------------------------------------------------------


def completion_mask(completion_ids: Tensor, eos_token_id: int | None) -> Tensor:
    """(N, T) bool: True for the tokens of each completion up to and including its first end
    token, False after it (generation pads finished rows with more end tokens). Without an end
    token every token counts."""
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be (N, T), got {tuple(completion_ids.shape)}")
    if eos_token_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_end = (completion_ids == eos_token_id).long()
    ends_before = is_end.cumsum(dim=1) - is_end  # end tokens strictly before each position
    return ends_before == 0


@dataclass
class GroupSamples:
    """G completions for each of B prompts, rows ``i*G .. i*G + G - 1`` for prompt i.

    prompt_ids: (B*G, P); completion_ids: (B*G, T) with T <= max_new_tokens; logprobs:
    (B*G, T) float32, log-probability of each sampled token under the sampling policy (the
    model's softmax at ``temperature``), 0 where masked; mask: (B*G, T) bool (see
    :func:`completion_mask`).
    """

    prompt_ids: Tensor
    completion_ids: Tensor
    logprobs: Tensor
    mask: Tensor
    group_size: int
    temperature: float

    @property
    def lengths(self) -> Tensor:
        """(B*G,) tokens per completion, end token included."""
        return self.mask.sum(dim=1)


def _token_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) at ``tokens``. logits (N, T, V), tokens (N, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_groups(
    model: CausalLM,
    prompts: Tensor,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GroupSamples:
    """Sample ``group_size`` completions for each prompt of ``prompts`` (B, P) with the
    KV-cached :func:`~course_utils.generation.generate` (no top-k / top-p: the policy whose
    probabilities the loss uses must be the one that sampled)."""
    if prompts.dim() != 2:
        raise ValueError(f"prompts must be (B, P), got shape {tuple(prompts.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0: a group of greedy completions is G copies "
            f"of one, got {temperature}"
        )
    repeated = prompts.repeat_interleave(group_size, dim=0)
    ids, logits = generate(
        model,
        repeated,
        max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        generator=generator,
        return_logits=True,
    )
    completions = ids[:, prompts.shape[1] :]
    mask = completion_mask(completions, eos_token_id)
    logprobs = _token_logprobs(logits, completions, temperature).masked_fill(~mask, 0.0)
    return GroupSamples(repeated, completions, logprobs, mask, group_size, temperature)


def completion_logprobs(
    model: nn.Module | CausalLM,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Log-probabilities (N, T) of ``completion_ids`` (N, T) after ``prompt_ids`` (N, P), from
    one full forward pass (with gradients unless called under ``torch.no_grad``). Use the
    sampling temperature so that, before any update, they equal the sampler's."""
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"prompt_ids has {prompt_ids.shape[0]} rows, completion_ids {completion_ids.shape[0]}"
        )
    if completion_ids.shape[1] == 0:
        raise ValueError("completion_ids has no tokens")
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    logits = model(ids[:, :-1])[:, prompt_ids.shape[1] - 1 :]
    return _token_logprobs(logits, completion_ids, temperature)


# --------------------------------------------------------------------------------------------
# Advantages, KL and the loss
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, eps: float = 1e-4, scale_std: bool = True) -> Tensor:
    """Group-relative advantages. rewards (B, G) -> (B, G).

    ``(r - mean) / (std + eps)`` per group (row), with the **Bessel-corrected** (unbiased,
    divide by G - 1) standard deviation, as ``torch.std`` computes by default. ``scale_std=False``
    keeps only ``r - mean``: the Dr. GRPO variant (Liu et al. 2025, "Understanding R1-Zero-Like
    Training"), which argues dividing by the std over-weights groups that are nearly all right
    or all wrong. A group whose rewards are all equal gets advantages of exactly 0: it carries
    no signal (see :func:`count_zero_variance_groups`).
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be (B, G), one row per group, got shape {tuple(rewards.shape)}"
        )
    if rewards.shape[1] < 2:
        raise ValueError(
            f"groups need at least 2 completions to compare, got G = {rewards.shape[1]}"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_std:
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return centered.masked_fill(equal, 0.0)  # exactly 0, whatever the rounding of the mean


def count_zero_variance_groups(rewards: Tensor) -> int:
    """How many groups (rows of (B, G) rewards) have all-equal rewards; their gradient is 0."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    return int((rewards == rewards[:, :1]).all(dim=1).sum())


def k3_kl(logp_new: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate ``exp(d) - d - 1`` with
    ``d = logp_ref - logp_new`` (Schulman's "k3"; DeepSeekMath eq. 4). Unbiased for tokens
    sampled from pi_theta, never negative (e^d >= 1 + d), and exactly 0 where the two agree.
    Computed as ``expm1(d) - d``: the same value, but it cannot round to a tiny negative number
    the way ``exp(d) - d - 1`` can for d near 0."""
    d = logp_ref - logp_new
    return torch.expm1(d) - d


#: How the per-token terms become one number: "sequence" averages each completion's tokens,
#: then the completions (DeepSeekMath); "token" averages over every token of the batch at once
#: (DAPO, Yu et al. 2025), so long completions weigh more; "constant" sums tokens and divides
#: by a fixed budget, N x max_tokens (Dr. GRPO), removing the length bias of both.
AGGREGATIONS = ("sequence", "token", "constant")


def grpo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    logp_ref: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "sequence",
    max_tokens: int | None = None,
    kl_bias_correction: bool = False,
    off_policy_mask: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss (to minimise) and diagnostics.

    logp_new, logp_old, logp_ref: (N, T) per-token log-probabilities of the sampled tokens
    under the policy being trained (with gradients), the policy that sampled them, and the
    frozen reference (``None`` allowed when ``beta == 0``). advantages: (N,) one per completion
    (any shape with N elements, e.g. (B, G)), or (N, T) per token. mask: (N, T), True for
    completion tokens (masked tokens do not affect the loss or its gradient).

    Per token: ``min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) - beta * k3``;
    the loss is minus its aggregate (see :data:`AGGREGATIONS`; ``max_tokens`` is the constant
    of ``"constant"``, default T). With one update per batch, ``logp_old`` is
    ``logp_new.detach()``: the ratio is exactly 1, clipping never acts, and the gradient is the
    group-baseline REINFORCE gradient ``-mean_i A_i / |o_i| sum_t grad log pi(o_t)``.

    Two of DeepSeek-V3.2's changes to GRPO (DeepSeek-V3.2 report, arXiv 2512.02556, the GRPO
    part of its reinforcement-learning section; the sequence mask is its equation 9), both off
    by default:

    - ``kl_bias_correction=True`` weights each token's k3 by the ratio ``pi_theta / pi_old``
      (with its gradient). The tokens were sampled from pi_old, not pi_theta; the ratio makes
      the k3 term's expected gradient the gradient of KL(pi_theta || pi_ref) even off-policy.
    - ``off_policy_mask=delta`` drops the surrogate term of a completion whose advantage is
      negative *and* whose mean per-token ``log pi_old - log pi_theta`` exceeds ``delta``: a
      wrong answer the policy has already moved away from is not pushed further. (The KL term
      stays.)

    Diagnostics: ``clip_fraction`` (tokens whose gradient the clip removed), ``kl`` (mean k3 per
    token, before any bias correction), ``ratio`` (mean ratio per token), all over masked-in
    tokens, and ``masked_fraction`` (completions the off-policy mask dropped).
    """
    if logp_new.dim() != 2:
        raise ValueError(f"logp_new must be (N, T), got shape {tuple(logp_new.shape)}")
    for name, other in (("logp_old", logp_old), ("mask", mask)):
        if other.shape != logp_new.shape:
            raise ValueError(
                f"{name} has shape {tuple(other.shape)}, expected {tuple(logp_new.shape)} like "
                "logp_new"
            )
    if logp_ref is not None and logp_ref.shape != logp_new.shape:
        raise ValueError(
            f"logp_ref has shape {tuple(logp_ref.shape)}, expected "
            f"{tuple(logp_new.shape)} like logp_new"
        )
    if beta != 0 and logp_ref is None:
        raise ValueError(
            f"beta={beta} needs logp_ref, the reference model's log-probs; pass them or set beta=0"
        )
    if beta < 0 or clip_eps < 0:
        raise ValueError(f"beta and clip_eps must be >= 0, got beta={beta}, clip_eps={clip_eps}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if off_policy_mask is not None and not off_policy_mask >= 0:
        raise ValueError(
            f"off_policy_mask must be a threshold >= 0 on the mean per-token "
            f"log(pi_old / pi_theta), or None to keep every completion; got "
            f"{off_policy_mask}"
        )
    n, t = logp_new.shape
    if advantages.shape == logp_new.shape:
        adv = advantages
    elif advantages.numel() == n:
        adv = advantages.reshape(n, 1)
    else:
        raise ValueError(
            f"advantages must have N={n} elements (one per completion) or shape "
            f"{(n, t)}, got shape {tuple(advantages.shape)}"
        )
    mask = mask.bool()
    adv = adv.to(logp_new.dtype)
    # zero the masked entries first, so junk there (even inf) cannot leak in through 0 * inf
    new = logp_new.masked_fill(~mask, 0.0)
    old = logp_old.detach().masked_fill(~mask, 0.0)
    ratio = torch.exp(new - old)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    objective = torch.minimum(ratio * adv, clipped * adv)
    maskf = mask.to(new.dtype)
    keep = torch.ones(n, 1, dtype=new.dtype, device=new.device)
    if off_policy_mask is not None:
        drift = ((old - new.detach()) * maskf).sum(1, keepdim=True) / maskf.sum(
            1, keepdim=True
        ).clamp(min=1.0)
        negative = (adv < 0).any(dim=1, keepdim=True)  # per completion (or any token of it)
        keep = (~(negative & (drift > off_policy_mask))).to(new.dtype)
        objective = objective * keep
    if logp_ref is not None:
        kl = k3_kl(new, logp_ref.detach().masked_fill(~mask, 0.0))
    else:
        kl = torch.zeros_like(new)
    kl_term = kl * ratio if kl_bias_correction else kl
    per_token = (objective - beta * kl_term).masked_fill(~mask, 0.0)

    if aggregation == "sequence":
        per_seq = per_token.sum(dim=1) / maskf.sum(dim=1).clamp(min=1.0)
        value = per_seq.mean()
    elif aggregation == "token":
        value = per_token.sum() / maskf.sum().clamp(min=1.0)
    else:
        budget = t if max_tokens is None else max_tokens
        if budget < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        value = per_token.sum() / (n * budget)

    with torch.no_grad():
        count = maskf.sum().clamp(min=1.0)
        was_clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
        stats = {
            "clip_fraction": float((was_clipped & mask).sum() / count),
            "kl": float((kl * maskf).sum() / count),
            "ratio": float((ratio * maskf).sum() / count),
            "masked_fraction": float(1.0 - keep.mean()),
        }
    return -value, stats


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log pi(completion | prompt) per row: the sum of ``token_logprobs`` (N, T) over the
    tokens where ``mask`` (N, T) is True (what masked positions hold does not matter). -> (N,)."""
    if token_logprobs.dim() != 2 or mask.shape != token_logprobs.shape:
        raise ValueError(
            f"token_logprobs and mask must both be (N, T), got "
            f"{tuple(token_logprobs.shape)} and {tuple(mask.shape)}"
        )
    return token_logprobs.masked_fill(~mask.bool(), 0.0).sum(dim=1)


def dpo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7), to minimise.

    Each argument is (P,): the sequence log-probability (:func:`sequence_logprobs`) of the
    preferred (``chosen``) and the dispreferred (``rejected``) completion of P pairs, under the
    policy (with gradients) and under the frozen reference. The implicit reward of a completion
    is ``beta * (log pi - log pi_ref)``; the loss is ``-log sigmoid(reward_chosen -
    reward_rejected)``, averaged over pairs. No reward model and no sampling during training:
    the pairs are fixed data. Diagnostics: ``accuracy`` (pairs whose chosen reward is higher)
    and ``margin`` (mean reward difference).
    """
    if not beta > 0:
        raise ValueError(
            f"beta must be > 0 (it scales the implicit reward; 0.1 is usual), got {beta}"
        )
    shapes = {t.shape for t in (logp_chosen, logp_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or logp_chosen.dim() != 1:
        raise ValueError(
            f"the four log-probs must all be (P,), one per pair; got shapes "
            f"{sorted(tuple(s) for s in shapes)}"
        )
    chosen = beta * (logp_chosen - ref_chosen.detach())
    rejected = beta * (logp_rejected - ref_rejected.detach())
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        stats = {
            "accuracy": float((chosen > rejected).float().mean()),
            "margin": float((chosen - rejected).mean()),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """Settings of :func:`grpo_step` / :func:`train_grpo`.

    ``updates_per_batch`` is mu in DeepSeekMath's Algorithm 1: gradient steps on one batch of
    samples (1: the ratio is 1 and the clip inactive; more: the clip starts to matter).
    ``max_new_tokens`` None: the task's default (worked format plus slack).
    ``kl_bias_correction`` and ``off_policy_mask`` are DeepSeek-V3.2's changes (see
    :func:`grpo_loss`); off by default, as in DeepSeekMath's GRPO. ``keep_routing`` is V3.2's
    third ("Keep Routing", same part of the report), for MoE policies: every update reuses the
    experts the policy chose when the batch was sampled
    (:func:`course_utils.moe.replay_routing`), so the ratio compares the same sub-network;
    off, an MoE router that moved between updates may send a sampled token to other experts.
    """

    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-4
    clip_eps: float = 0.2
    beta: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int | None = None
    updates_per_batch: int = 1
    aggregation: str = "sequence"
    scale_std: bool = True
    adv_eps: float = 1e-4
    reward_weights: dict[str, float] = field(default_factory=lambda: {"correctness": 1.0})
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    kl_bias_correction: bool = False
    off_policy_mask: float | None = None
    keep_routing: bool = False

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (advantages compare completions within "
                f"a group), got {self.group_size}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be > 0, got {self.temperature}, {self.lr}")
        if not self.clip_eps > 0:
            raise ValueError(
                f"clip_eps must be > 0 (the trust region is 1 +- clip_eps; 0.2 is "
                f"usual), got {self.clip_eps}"
            )
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 (0: no KL penalty), got {self.beta}")
        if self.off_policy_mask is not None and not self.off_policy_mask >= 0:
            raise ValueError(f"off_policy_mask must be >= 0 or None, got {self.off_policy_mask}")


@dataclass
class GRPOHistory:
    """One record per step (see :func:`grpo_step` for the keys), plus held-out evaluations.

    ``history["reward"]`` is the list of one key over the steps.
    """

    records: list[dict[str, float]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_worked_fraction: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def train_seconds(self) -> float:
        """Seconds spent in the GRPO steps themselves (sampling, scoring, updates), without the
        held-out evaluations that ``seconds`` includes."""
        return sum(r["seconds"] for r in self.records)

    def __getitem__(self, key: str) -> list[float]:
        if self.records and key not in self.records[0]:
            raise KeyError(f"{key!r} is not recorded; keys: {sorted(self.records[0])}")
        return [r[key] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def make_reference(policy: nn.Module) -> nn.Module:
    """A frozen copy of ``policy`` (eval mode, no gradients): the KL term's reference."""
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def grpo_step(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: ArithmeticTask,
    problems: Sequence[ArithmeticProblem],
    config: GRPOConfig,
    reference: nn.Module | None = None,
    reward_fn: Callable[[Sequence[ArithmeticProblem], Sequence[str]], Rewards] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One GRPO iteration on ``problems`` (B prompts): sample G completions each, score them,
    compute group advantages, and take ``config.updates_per_batch`` gradient steps.

    Returns the step's record: ``reward`` (mean total reward), ``accuracy`` (fraction of
    samples the exact verifier accepts, whatever the reward), ``length`` (mean completion
    tokens), ``worked_fraction``, ``zero_variance_groups`` (of B), ``loss``, ``kl``,
    ``clip_fraction``, ``ratio`` (of the last update), ``seconds``; for an MoE policy with
    ``updates_per_batch > 1`` also ``routing_changed``: the fraction of (MoE layer, completion
    token) expert choices in the last update that differ from the sampling-time forward (0
    with ``keep_routing``).

    The sampling-time routing is recorded from a full forward of the policy right after
    sampling (the policy that sampled, before any update), not from the cached sampler itself:
    in this course both run the same code, so they choose the same experts up to float noise.
    """
    start = time.perf_counter()
    if reference is None and config.beta > 0:
        raise ValueError(
            f"beta={config.beta} needs a reference model; pass "
            "reference=make_reference(policy) or set beta=0"
        )
    reward_fn = reward_fn or make_reward_fn(config.reward_weights)
    device = device_of(policy)
    max_new = config.max_new_tokens or task.default_max_new_tokens
    g = config.group_size
    prompts = task.encode_prompts(problems, device)
    samples = sample_groups(
        cast(CausalLM, policy),
        prompts,
        g,
        max_new,
        config.temperature,
        task.eos_token_id,
        generator,
    )
    texts = task.decode_completions(samples.completion_ids)
    expanded = [p for p in problems for _ in range(g)]
    rewards = reward_fn(expanded, texts)
    total = check_rewards(getattr(rewards, "total", rewards), len(expanded), "reward_fn")
    grouped = total.view(len(problems), g)
    advantages = group_advantages(grouped, config.adv_eps, config.scale_std).view(-1).to(device)
    mask = samples.mask

    has_moe = bool(moe_modules(policy))
    if config.keep_routing and not has_moe:
        raise ValueError("keep_routing=True needs an MoE policy (no DeepSeekMoE layer found)")
    track_routing = has_moe and (config.keep_routing or config.updates_per_batch > 1)
    with torch.no_grad():
        logp_ref = (
            completion_logprobs(
                # checked above: beta > 0 comes with a reference
                cast(nn.Module, reference),
                samples.prompt_ids,
                samples.completion_ids,
                config.temperature,
            )
            if config.beta > 0
            else None
        )
        if track_routing:
            forget_routing(policy)
        logp_old = (
            completion_logprobs(
                policy, samples.prompt_ids, samples.completion_ids, config.temperature
            )
            if config.updates_per_batch > 1 or config.keep_routing
            else None
        )
        sampled_routing = recorded_routing(policy) if track_routing else None
    routing_stat: dict[str, float] = {}
    if track_routing:  # the completion tokens' rows of the flattened (N * (P + T - 1)) routing
        p_len = samples.prompt_ids.shape[1]
        scored = torch.zeros(
            mask.shape[0], p_len + mask.shape[1] - 1, dtype=torch.bool, device=mask.device
        )
        scored[:, p_len - 1 :] = mask
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(config.updates_per_batch):
        if config.keep_routing:
            # keep_routing implies track_routing, so sampled_routing was recorded
            with replay_routing(policy, cast(dict[str, Tensor], sampled_routing)):
                logp_new = completion_logprobs(
                    policy, samples.prompt_ids, samples.completion_ids, config.temperature
                )
        else:
            logp_new = completion_logprobs(
                policy, samples.prompt_ids, samples.completion_ids, config.temperature
            )
        if track_routing:
            routing_stat["routing_changed"] = routing_changed(
                cast(dict[str, Tensor], sampled_routing), recorded_routing(policy), scored
            )
        old = logp_new.detach() if logp_old is None else logp_old
        loss, stats = grpo_loss(
            logp_new,
            old,
            logp_ref,
            advantages,
            mask,
            config.clip_eps,
            config.beta,
            config.aggregation,
            max_new,
            kl_bias_correction=config.kl_bias_correction,
            off_policy_mask=config.off_policy_mask,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
    policy.eval()
    correct = [check_completion(p, c) for p, c in zip(expanded, texts, strict=True)]
    return {
        "reward": float(total.mean()),
        "accuracy": sum(correct) / len(correct),
        "length": float(samples.lengths.float().mean()),
        "worked_fraction": sum(map(uses_worked_steps, texts)) / len(texts),
        "zero_variance_groups": count_zero_variance_groups(grouped),
        "loss": float(loss.detach()),
        **stats,
        **routing_stat,
        "seconds": time.perf_counter() - start,
    }


def run_policy_loop(
    policy: nn.Module,
    problems: Sequence[ArithmeticProblem] | Callable[[int], Sequence[ArithmeticProblem]],
    steps: int,
    prompts_per_step: int,
    step_fn: Callable[
        [ArithmeticTask, Sequence[ArithmeticProblem], torch.Generator], dict[str, float]
    ],
    eval_problems: Sequence[ArithmeticProblem] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "RL",
) -> GRPOHistory:
    """The on-policy RL loop GRPO and PPO (:mod:`course_utils.ppo`) share: each step draws
    ``prompts_per_step`` prompts and calls ``step_fn(task, batch, generator) -> record`` (one
    sample-score-update iteration; the record needs a ``seconds`` key), with held-out greedy
    accuracy before the first step, every ``eval_every`` steps and after the last.

    ``problems``: a pool to draw from (without replacement within a step; ``seed`` drives the
    draws and the sampling generator), or a function ``step -> problems``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eval_every and not eval_problems:
        raise ValueError("eval_every > 0 needs eval_problems")
    rng = random.Random(seed)
    if callable(problems):
        draw = problems
    else:
        pool = list(problems)
        if len(pool) < prompts_per_step:
            raise ValueError(
                f"problems has {len(pool)} items, fewer than prompts_per_step={prompts_per_step}"
            )

        def draw(step: int) -> Sequence[ArithmeticProblem]:
            return rng.sample(pool, prompts_per_step)

    first = list(draw(0))
    task = ArithmeticTask.for_problems(first)
    generator = make_generator(seed, device_of(policy))
    history = GRPOHistory()

    def evaluate(step: int) -> None:
        # The policy is a causal language model (an nn.Module with new_caches); evaluate runs
        # only when eval_every > 0, which needs eval_problems (checked above).
        held_out = cast(Sequence[ArithmeticProblem], eval_problems)
        result = evaluate_accuracy(cast(CausalLM, policy), held_out, task=task)
        history.eval_steps.append(step)
        history.eval_accuracy.append(result.accuracy)
        history.eval_worked_fraction.append(result.worked_fraction)

    start = time.perf_counter()
    if eval_every:
        evaluate(0)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        batch = first if step == 0 else list(draw(step))
        record = step_fn(task, batch, generator)
        history.records.append(record)
        bar.set_postfix(
            reward=f"{record['reward']:.2f}",
            acc=f"{record['accuracy']:.2f}",
            len=f"{record['length']:.1f}",
        )
        if eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            if not history.eval_steps or history.eval_steps[-1] != step + 1:
                evaluate(step + 1)
    history.seconds = time.perf_counter() - start
    return history


def train_grpo(
    policy: nn.Module,
    problems: Sequence[ArithmeticProblem] | Callable[[int], Sequence[ArithmeticProblem]],
    steps: int,
    config: GRPOConfig | None = None,
    reference: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    reward_fn: Callable[[Sequence[ArithmeticProblem], Sequence[str]], Rewards] | None = None,
    eval_problems: Sequence[ArithmeticProblem] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "GRPO",
) -> GRPOHistory:
    """Run ``steps`` GRPO steps on ``policy`` in place and return the history.

    ``problems``: a pool to draw ``config.prompts_per_step`` prompts from each step (without
    replacement within a step), or a function ``step -> problems``. ``reference``: the frozen
    KL reference, made from the policy when ``config.beta > 0`` and none is given.
    ``optimizer``: default AdamW(lr=config.lr, betas (0.9, 0.99), weight_decay) on the
    parameters that require grad (a LoRA-wrapped model trains only its adapters).
    ``reward_fn``: default :func:`make_reward_fn` of ``config.reward_weights``. With
    ``eval_problems`` and ``eval_every > 0``, greedy held-out accuracy is measured before the
    first step, every ``eval_every`` steps and after the last (:func:`run_policy_loop`).
    """
    config = config or GRPOConfig()
    if reference is None and config.beta > 0:
        reference = make_reference(policy)
    if optimizer is None:
        optimizer = make_optimizer(policy, config.lr, config.weight_decay, betas=(0.9, 0.99))
    reward_fn = reward_fn or make_reward_fn(config.reward_weights)

    def step_fn(
        task: ArithmeticTask, batch: Sequence[ArithmeticProblem], generator: torch.Generator
    ) -> dict[str, float]:
        return grpo_step(
            policy,
            optimizer,
            task,
            batch,
            config,
            reference,
            reward_fn,
            generator,
        )

    return run_policy_loop(
        policy,
        problems,
        steps,
        config.prompts_per_step,
        step_fn,
        eval_problems,
        eval_every,
        seed,
        progress,
        desc,
    )


# --------------------------------------------------------------------------------------------
# The course's GRPO-tuned model (notebook 22), for notebook 23
# --------------------------------------------------------------------------------------------


def grpo_training_problems(n: int = 4096, seed: int = 0) -> list[ArithmeticProblem]:
    """The prompt pool notebook 22's run draws from: ``n`` training-split problems (never the
    held-out test split) of the course task."""
    return ArithmeticTask().problems(n, seed=seed, split="train")


#: The artifact kind of notebook 22's GRPO-tuned model (:mod:`course_utils.artifacts`).
ARTIFACT_KIND = "grpo"


def _grpo_spec(
    pretrain_config: PretrainConfig, grpo_config: GRPOConfig, steps: int, seed: int
) -> dict:
    return {
        "pretrain": pretrain_config.spec(),
        "grpo": dataclasses.asdict(grpo_config),
        "steps": steps,
        "seed": seed,
    }


def load_or_train_grpo(
    pretrain_config: PretrainConfig | None = None,
    grpo_config: GRPOConfig | None = None,
    device: torch.device | str | None = None,
    steps: int = 150,
    seed: int = 0,
    root: str | Path | None = None,
    progress: bool = True,
) -> nn.Module:
    """The GRPO-tuned mini-DeepSeek of notebook 22: loaded from its artifact
    (:func:`grpo_checkpoint_path`, keyed by both configs, ``steps``, ``seed`` and the code) when
    saved, else made now: :func:`course_utils.pretrain.load_or_pretrain` of ``pretrain_config``
    (default :func:`~course_utils.pretrain.course_config`), then :func:`train_grpo` for
    ``steps`` steps of ``grpo_config`` (default :class:`GRPOConfig`) on
    :func:`grpo_training_problems`, with ``seed``. Returned in eval mode on ``device``."""
    from .artifacts import load_or_build
    from .checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from .pretrain import course_config, load_or_pretrain

    pretrain_config = pretrain_config or course_config()
    grpo_config = grpo_config or GRPOConfig()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def build(path: Path) -> None:
        policy = load_or_pretrain(
            pretrain_config,
            device,
            root=root,
            progress=progress,
        )
        train_grpo(
            policy,
            grpo_training_problems(seed=seed),
            steps,
            grpo_config,
            seed=seed,
            progress=progress,
            desc="GRPO (notebook 22's run)",
        )
        save_hf_checkpoint(policy, path)

    return load_or_build(
        ARTIFACT_KIND,
        _grpo_spec(pretrain_config, grpo_config, steps, seed),
        build,
        lambda path: load_hf_checkpoint(path, device=device).eval(),
        root,
    )


def grpo_checkpoint_path(
    pretrain_config: PretrainConfig,
    grpo_config: GRPOConfig,
    steps: int,
    seed: int,
    root: str | Path | None = None,
) -> Path:
    """Where :func:`load_or_train_grpo` keeps the GRPO run of these settings (``root`` defaults
    to :func:`course_utils.artifacts.artifacts_dir`)."""
    from .artifacts import artifact_path

    return artifact_path(ARTIFACT_KIND, _grpo_spec(pretrain_config, grpo_config, steps, seed), root)


def save_grpo_checkpoint(
    policy: DeepSeekForCausalLM,
    pretrain_config: PretrainConfig,
    grpo_config: GRPOConfig,
    steps: int,
    seed: int,
    root: str | Path | None = None,
) -> Path:
    """Save a GRPO-tuned model where :func:`load_or_train_grpo` finds it (an intact artifact
    of the same run and code already there is kept). Returns the directory."""
    from .artifacts import load_or_build
    from .checkpoint import save_hf_checkpoint

    return load_or_build(
        ARTIFACT_KIND,
        _grpo_spec(pretrain_config, grpo_config, steps, seed),
        lambda path: save_hf_checkpoint(policy, path),
        lambda path: path,
        root,
    )
