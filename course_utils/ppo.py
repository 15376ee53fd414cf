"""PPO with a learned critic and GAE: the method GRPO replaced, built to compare with it.

PPO (Schulman et al. 2017) as used for language models (InstructGPT, Ouyang et al. 2022)
needs a **value model** (the critic) next to the policy: V(s_t) predicts the reward still to
come after the first t completion tokens. The advantage of token t is then estimated with
**GAE** (generalized advantage estimation, Schulman et al. 2016, eq. 16),

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),
    A_t     = sum_l (gamma * lambda)^l * delta_{t+l},

with V = 0 after the completion's last token and, for a verifier, r_t = 0 except at the last
token, where it is the verifier's score. GRPO (DeepSeekMath paper, section 4.1) drops the critic
and uses the group's mean reward as the baseline instead: one model less to hold and train.
This module is that critic and its bookkeeping:

- :class:`ValueModel`: a copy of the policy's trunk with a scalar head (zero-initialised, so
  it starts by predicting 0) instead of the language-model head;
- :func:`gae`, :func:`terminal_rewards`, :func:`value_loss` (PPO's clipped value loss);
- :func:`ppo_step` / :func:`train_ppo`: one sample per prompt, advantages from GAE, the same
  clipped surrogate as GRPO (:func:`course_utils.rl.grpo_loss` with per-token advantages),
  through the loop GRPO uses (:func:`course_utils.rl.run_policy_loop`);
- :func:`memory_footprint`: bytes actually held by models and optimizer states.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .arithmetic import ArithmeticTask
from .data import ArithmeticProblem, check_completion, uses_worked_steps
from .generation import CausalLM
from .rl import (
    GRPOHistory,
    Rewards,
    check_rewards,
    completion_logprobs,
    grpo_loss,
    make_reference,
    make_reward_fn,
    run_policy_loop,
    sample_groups,
)
from .runtime import device_of
from .train import make_optimizer

__all__ = [
    "ValueModel",
    "token_values",
    "terminal_rewards",
    "gae",
    "value_loss",
    "PPOConfig",
    "ppo_step",
    "train_ppo",
    "memory_footprint",
]


class ValueModel(nn.Module):
    """The critic: a deep copy of ``policy``'s trunk (embeddings, layers, final norm) with a
    linear head to one number in place of the language-model head.

    ``policy`` must have ``forward_with_hidden(ids) -> (logits, hidden)`` (the course's
    :class:`~course_utils.model.DeepSeekForCausalLM` and ``TinyDecoder`` do). Its
    language-model head and multi-token-prediction modules are dropped from the copy, so the
    critic holds only what it uses. forward(ids: (N, S)) -> values (N, S) float32.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not hasattr(policy, "forward_with_hidden"):
            raise ValueError(
                f"{type(policy).__name__} has no forward_with_hidden(ids) -> "
                "(logits, hidden); the critic needs the policy's hidden states"
            )
        body = copy.deepcopy(policy)
        head = getattr(body, "lm_head", None)
        embed = getattr(getattr(body, "model", body), "embed_tokens", None)
        tied = head is not None and embed is not None and head.weight is embed.weight
        if head is not None and not tied:  # a tied head is the embedding table: keep it
            body.lm_head = nn.Identity()
        if hasattr(body, "mtp"):
            body.mtp = nn.ModuleList()
        for p in body.parameters():
            p.requires_grad_(True)
        self.body = body
        hidden = self._hidden(torch.zeros(1, 1, dtype=torch.long, device=device_of(policy))).shape[
            -1
        ]
        self.head = nn.Linear(hidden, 1).to(device_of(policy))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _hidden(self, ids: Tensor) -> Tensor:
        # __init__ checked that the policy copied into body has forward_with_hidden
        forward_with_hidden = cast(
            "Callable[[Tensor], tuple[Tensor, Tensor]]", self.body.forward_with_hidden
        )
        return forward_with_hidden(ids)[1]

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self._hidden(ids).float()).squeeze(-1)


def token_values(critic: nn.Module, prompt_ids: Tensor, completion_ids: Tensor) -> Tensor:
    """V(s_t) for every completion token t: (N, T), the critic's value at the position that
    predicts token t (the state before it), from one forward over prompt + completion[:-1],
    aligned like :func:`course_utils.rl.completion_logprobs`."""
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"prompt_ids has {prompt_ids.shape[0]} rows, completion_ids {completion_ids.shape[0]}"
        )
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    return critic(ids[:, :-1])[:, prompt_ids.shape[1] - 1 :]


def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards (N, T) float32: ``scores`` (N,) at each completion's last masked token,
    0 elsewhere (a verifier scores the whole answer, once it is finished)."""
    if mask.dim() != 2 or scores.shape != (mask.shape[0],):
        raise ValueError(
            f"scores must be (N,) and mask (N, T); got {tuple(scores.shape)} and "
            f"{tuple(mask.shape)}"
        )
    lengths = mask.long().sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("a completion has no tokens in mask")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[torch.arange(mask.shape[0], device=mask.device), lengths - 1] = scores.float().to(
        mask.device
    )
    return out


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over completions of different lengths.

    rewards, values, mask: (N, T); mask True on each completion's tokens (a prefix of the row).
    Returns (advantages, returns), both (N, T) and 0 where ``mask`` is False:
    ``A_t = sum_l (gamma lam)^l delta_{t+l}`` with ``delta_t = r_t + gamma V_{t+1} - V_t`` and
    V = 0 past the last token; ``returns = A + V`` (the critic's regression target).
    ``lam = 1`` gives Monte-Carlo returns minus V; ``lam = 0`` the one-step TD error.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must all be (N, T); got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(torch.float32)
    v = values.detach().float() * m
    r = rewards.float() * m
    n, t = r.shape
    advantages = torch.zeros_like(r)
    running = torch.zeros(n, dtype=r.dtype, device=r.device)
    for i in range(t - 1, -1, -1):
        next_value = v[:, i + 1] if i + 1 < t else torch.zeros_like(running)
        next_in = m[:, i + 1] if i + 1 < t else torch.zeros_like(running)
        delta = r[:, i] + gamma * next_value - v[:, i]
        running = delta + gamma * lam * next_in * running
        advantages[:, i] = running * m[:, i]
    return advantages, (advantages + v) * m


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> Tensor:
    """PPO's clipped value loss, mean over masked tokens:
    ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2)``; ``clip=None``
    gives the plain squared error. All arguments (N, T); gradients flow through ``values``."""
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError("values, old_values, returns and mask must have the same shape")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    m = mask.to(values.dtype)
    err = (values - returns.detach()) ** 2
    if clip is not None:
        old = old_values.detach()
        clipped = old + (values - old).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns.detach()) ** 2)
    return 0.5 * (err * m).sum() / m.sum().clamp(min=1.0)


@dataclass
class PPOConfig:
    """Settings of :func:`ppo_step` / :func:`train_ppo`.

    ``prompts_per_step`` prompts, one sampled completion each (no groups: the critic is the
    baseline). ``lr`` for the policy, ``critic_lr`` for the critic. ``clip_eps`` the policy's
    trust region, ``value_clip`` the critic's (None: none). ``gamma`` / ``lam`` GAE's discount
    and trace decay. ``beta`` > 0 subtracts ``beta * (log pi_old - log pi_ref)`` from each
    token's reward (InstructGPT's per-token KL penalty; needs a reference).
    ``updates_per_batch`` gradient steps of both models on each batch.
    """

    prompts_per_step: int = 128
    lr: float = 1e-4
    critic_lr: float = 1e-3
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int | None = None
    updates_per_batch: int = 1
    whiten_advantages: bool = True
    grad_clip: float | None = 1.0
    reward_weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.critic_lr <= 0 or self.temperature <= 0:
            raise ValueError(
                f"lr, critic_lr and temperature must be > 0, got {self.lr}, "
                f"{self.critic_lr}, {self.temperature}"
            )
        if not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0 (0.2 is usual), got {self.clip_eps}")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"value_clip must be > 0 or None, got {self.value_clip}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 (0: no KL penalty), got {self.beta}")


def _masked_whiten(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    count = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / count
    var = (((x - mean) * m) ** 2).sum() / count
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def ppo_step(
    policy: nn.Module,
    critic: nn.Module,
    policy_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    task: ArithmeticTask,
    problems: Sequence[ArithmeticProblem],
    config: PPOConfig,
    reference: nn.Module | None = None,
    reward_fn: Callable[[Sequence[ArithmeticProblem], Sequence[str]], Rewards] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One PPO iteration: sample one completion per problem, score it, estimate per-token
    advantages with GAE from the critic's values, then ``config.updates_per_batch`` steps of
    the clipped surrogate (policy) and the clipped value loss (critic).

    Returns the step's record: ``reward``, ``accuracy`` (exact verifier), ``length``,
    ``worked_fraction``, ``loss`` (policy), ``value_loss``, ``explained_variance`` of the
    returns by the critic's values before the update (1: perfect, 0: no better than their
    mean), ``clip_fraction``, ``kl``, ``ratio``, ``seconds``.
    """
    start = time.perf_counter()
    if config.beta > 0 and reference is None:
        raise ValueError(f"beta={config.beta} needs a reference model")
    reward_fn = reward_fn or make_reward_fn(dict(config.reward_weights or {"correctness": 1.0}))
    max_new = config.max_new_tokens or task.default_max_new_tokens
    prompts = task.encode_prompts(problems, device_of(policy))
    samples = sample_groups(
        cast(CausalLM, policy),
        prompts,
        1,
        max_new,
        config.temperature,
        task.eos_token_id,
        generator,
    )
    texts = task.decode_completions(samples.completion_ids)
    scored = reward_fn(list(problems), texts)
    scores = check_rewards(getattr(scored, "total", scored), len(problems), "reward_fn")
    mask = samples.mask
    with torch.no_grad():
        old_values = token_values(critic, samples.prompt_ids, samples.completion_ids)
        logp_old = completion_logprobs(
            policy, samples.prompt_ids, samples.completion_ids, config.temperature
        )
        rewards = terminal_rewards(scores.to(mask.device), mask)
        if config.beta > 0:
            logp_ref = completion_logprobs(
                cast(nn.Module, reference),  # checked above: beta > 0 comes with a reference
                samples.prompt_ids,
                samples.completion_ids,
                config.temperature,
            )
            rewards = rewards - config.beta * (logp_old - logp_ref) * mask
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        m = mask.float()
        residual = ((returns - old_values) * m)[mask]
        target = returns[mask]
        explained = float(1 - residual.var() / target.var().clamp(min=1e-8))
        if config.whiten_advantages:
            advantages = _masked_whiten(advantages, mask)
    policy.train()
    critic.train()
    p_params = [p for p in policy.parameters() if p.requires_grad]
    c_params = [p for p in critic.parameters() if p.requires_grad]
    for _ in range(config.updates_per_batch):
        logp_new = completion_logprobs(
            policy, samples.prompt_ids, samples.completion_ids, config.temperature
        )
        loss, stats = grpo_loss(
            logp_new, logp_old, None, advantages, mask, config.clip_eps, 0.0, aggregation="token"
        )
        policy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(p_params, config.grad_clip)
        policy_optimizer.step()
        values = token_values(critic, samples.prompt_ids, samples.completion_ids)
        v_loss = value_loss(values, old_values, returns, mask, config.value_clip)
        critic_optimizer.zero_grad(set_to_none=True)
        v_loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(c_params, config.grad_clip)
        critic_optimizer.step()
    policy.eval()
    critic.eval()
    correct = [check_completion(p, c) for p, c in zip(problems, texts, strict=True)]
    with torch.no_grad():
        kl = float(((logp_old - logp_new.detach()) * m).sum() / m.sum())
    return {
        "reward": float(scores.mean()),
        "accuracy": sum(correct) / len(correct),
        "length": float(samples.lengths.float().mean()),
        "worked_fraction": sum(map(uses_worked_steps, texts)) / len(texts),
        "loss": float(loss.detach()),
        "value_loss": float(v_loss.detach()),
        "explained_variance": explained,
        "clip_fraction": stats["clip_fraction"],
        "ratio": stats["ratio"],
        "kl": kl,
        "seconds": time.perf_counter() - start,
    }


def train_ppo(
    policy: nn.Module,
    problems: Sequence[ArithmeticProblem] | Callable[[int], Sequence[ArithmeticProblem]],
    steps: int,
    config: PPOConfig | None = None,
    critic: nn.Module | None = None,
    reference: nn.Module | None = None,
    reward_fn: Callable[[Sequence[ArithmeticProblem], Sequence[str]], Rewards] | None = None,
    eval_problems: Sequence[ArithmeticProblem] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "PPO",
) -> tuple[GRPOHistory, nn.Module, dict[str, torch.optim.Optimizer]]:
    """Run ``steps`` PPO steps on ``policy`` in place, through the loop GRPO uses
    (:func:`course_utils.rl.run_policy_loop`: same prompt draws for a seed, same held-out
    evaluations). ``critic``: default :class:`ValueModel` of the policy as it is now.

    Returns (history, critic, optimizers) -- the optimizers so that their state can be
    measured (:func:`memory_footprint`). Both use AdamW from
    :func:`course_utils.train.make_optimizer`, betas (0.9, 0.99), no weight decay.
    """
    config = config or PPOConfig()
    critic = critic if critic is not None else ValueModel(policy)
    if reference is None and config.beta > 0:
        reference = make_reference(policy)
    optimizers: dict[str, torch.optim.Optimizer] = {
        "policy": make_optimizer(policy, config.lr, 0.0, betas=(0.9, 0.99)),
        "critic": make_optimizer(critic, config.critic_lr, 0.0, betas=(0.9, 0.99)),
    }

    def step_fn(
        task: ArithmeticTask, batch: Sequence[ArithmeticProblem], generator: torch.Generator
    ) -> dict[str, float]:
        return ppo_step(
            policy,
            critic,
            optimizers["policy"],
            optimizers["critic"],
            task,
            batch,
            config,
            reference,
            reward_fn,
            generator,
        )

    history = run_policy_loop(
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
    return history, critic, optimizers


def memory_footprint(
    models: Mapping[str, nn.Module], optimizers: Sequence[torch.optim.Optimizer] = ()
) -> dict[str, int]:
    """Bytes held, measured from the tensors themselves: each named model's parameters and
    buffers (a tensor shared between models is counted once, under the first name), and
    ``"optimizer state"``, every tensor in the optimizers' state (AdamW: two per trained
    parameter). Also ``"total"``."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, model in models.items():
        total = 0
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        out[name] = total
    state = 0
    for opt in optimizers:
        for per_param in opt.state.values():
            for value in per_param.values():
                if isinstance(value, Tensor) and value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    state += value.numel() * value.element_size()
    out["optimizer state"] = state
    out["total"] = sum(out.values())
    return out
