"""DPO on preference pairs a verifier builds from the model's own samples.

Direct preference optimisation (Rafailov et al. 2023) needs pairs (prompt, chosen, rejected)
and a frozen reference; its loss is :func:`course_utils.rl.dpo_loss`. With a rule-based
verifier the pairs cost nothing to label: sample a few completions per prompt from the model,
and pair one the verifier accepts with one it rejects. Unlike GRPO, the pairs are built once,
offline, and training is supervised-style: it runs through the course's one training loop
(:class:`course_utils.train.Trainer`) with a ``compute_loss`` hook.

- :func:`build_preference_pairs`: sample, verify, pair;
- :func:`dpo_tensors`: pairs -> (inputs, targets) rows, chosen rows first;
- :func:`train_dpo`: the run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .arithmetic import ArithmeticTask, generate_completions
from .data import ArithmeticProblem, check_completion
from .distill import sft_tensors
from .generation import CausalLM
from .rl import _token_logprobs, dpo_loss, make_reference, sequence_logprobs
from .runtime import device_of
from .train import Trainer, TrainResult

__all__ = ["PreferencePairs", "DPORun", "build_preference_pairs", "dpo_tensors", "train_dpo"]


@dataclass
class PreferencePairs:
    """``chosen[i]`` (accepted by the verifier) and ``rejected[i]`` (refused) answer
    ``problems[i]``. ``n_sampled``: completions drawn to build them; ``n_prompts``: prompts
    sampled (a prompt whose samples were all right or all wrong gives no pair)."""

    problems: list[ArithmeticProblem]
    chosen: list[str]
    rejected: list[str]
    n_sampled: int
    n_prompts: int
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.problems)


@torch.no_grad()
def build_preference_pairs(
    model: nn.Module,
    problems: Sequence[ArithmeticProblem],
    samples_per_problem: int = 8,
    pairs_per_problem: int = 1,
    temperature: float = 1.0,
    verifier: Callable[[ArithmeticProblem, str], bool] = check_completion,
    generator: torch.Generator | None = None,
    seed: int = 0,
    task: ArithmeticTask | None = None,
) -> PreferencePairs:
    """Sample ``samples_per_problem`` completions per problem from ``model`` at
    ``temperature``; for each problem with at least one completion ``verifier`` accepts and one
    it refuses, make up to ``pairs_per_problem`` pairs (distinct accepted and refused
    completions, chosen at random with ``seed``). An empty completion is never used: it has
    no token to learn from."""
    if samples_per_problem < 2:
        raise ValueError(
            f"samples_per_problem must be >= 2 to find a right and a wrong "
            f"answer, got {samples_per_problem}"
        )
    if pairs_per_problem < 1:
        raise ValueError(f"pairs_per_problem must be >= 1, got {pairs_per_problem}")
    start = time.perf_counter()
    texts = generate_completions(
        cast(CausalLM, model),  # a causal language model: an nn.Module with new_caches
        problems,
        greedy=False,
        temperature=temperature,
        samples=samples_per_problem,
        generator=generator,
        task=task,
    )
    rng = random.Random(seed)
    out_p, out_c, out_r = [], [], []
    for i, problem in enumerate(problems):
        group = texts[i * samples_per_problem : (i + 1) * samples_per_problem]
        right = sorted({c for c in group if verifier(problem, c)})
        wrong = sorted({c for c in group if not verifier(problem, c) and c.strip()})
        for _ in range(min(pairs_per_problem, len(right), len(wrong))):
            out_p.append(problem)
            out_c.append(right.pop(rng.randrange(len(right))))
            out_r.append(wrong.pop(rng.randrange(len(wrong))))
    return PreferencePairs(
        out_p, out_c, out_r, len(texts), len(problems), time.perf_counter() - start
    )


def dpo_tensors(
    pairs: PreferencePairs, task: ArithmeticTask | None = None
) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (2P, L): rows 0..P-1 the chosen lines, rows P..2P-1 the
    rejected ones, targets -100 outside the completions (:func:`course_utils.distill.
    sft_tensors` on both at once, so they share one width)."""
    if not len(pairs):
        raise ValueError(
            "no preference pairs: every prompt's samples were all right or all "
            "wrong; sample more per prompt or use more prompts"
        )
    return sft_tensors(pairs.problems * 2, pairs.chosen + pairs.rejected, task)


def _sequence_logps(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    mask = targets != -100
    logp = _token_logprobs(model(inputs), targets.clamp(min=0), 1.0)
    return sequence_logprobs(logp, mask)


@dataclass
class DPORun:
    """What :func:`train_dpo` returns: the Trainer's ``result`` (``losses`` are the DPO
    losses, ``seconds``), one stats dict per step (``accuracy``: fraction of pairs whose
    implicit reward ranks chosen above rejected; ``margin``), and the ``optimizer`` (to measure
    its state)."""

    result: TrainResult
    stats: list[dict[str, float]]
    optimizer: torch.optim.Optimizer


def train_dpo(
    policy: nn.Module,
    pairs: PreferencePairs,
    steps: int,
    beta: float = 0.1,
    batch_size: int = 32,
    lr: float = 1e-4,
    reference: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "DPO",
    **trainer_kwargs,
) -> DPORun:
    """Train ``policy`` in place with :func:`course_utils.rl.dpo_loss` on ``batch_size`` pairs
    a step (drawn with replacement, ``seed``), against ``reference`` (default: a frozen copy of
    the policy as it is now), through :class:`course_utils.train.Trainer` (AdamW, warm-up and
    cosine decay, clipping; ``trainer_kwargs`` go to it, weight decay 0 unless given)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (0.1 is usual), got {beta}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs, targets = dpo_tensors(pairs)
    device = device_of(policy)
    inputs, targets = inputs.to(device), targets.to(device)
    n = len(pairs)
    reference = reference if reference is not None else make_reference(policy)
    generator = torch.Generator().manual_seed(seed)
    stats: list[dict[str, float]] = []

    def get_batch() -> tuple[Tensor, Tensor]:
        rows = torch.randint(0, n, (batch_size,), generator=generator).to(device)
        rows = torch.cat([rows, rows + n])
        return inputs[rows], targets[rows]

    def compute_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logps = _sequence_logps(model, x, y)
        with torch.no_grad():
            ref = _sequence_logps(reference, x, y)
        half = x.shape[0] // 2
        loss, step_stats = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta)
        stats.append(step_stats)
        return loss, loss

    trainer_kwargs.setdefault("weight_decay", 0.0)
    trainer = Trainer(
        policy,
        get_batch,
        steps,
        lr=lr,
        hooks={"compute_loss": compute_loss},
        desc=desc,
        **trainer_kwargs,
    )
    result = trainer.train(progress=progress)
    return DPORun(result, stats, trainer.optimizer)
