"""The balancing study of notebook 18: one small MoE language model, several ways to balance it.

:func:`run_balancing_study` trains the same model (same seed, data, steps and optimizer) once
per *arm*:

- ``"none"``: no balancing at all;
- ``"switch"``: the Switch / DeepSeek-V2 expert-level auxiliary loss over the whole batch, once
  per weight in ``aux_alphas`` (arms ``"switch α=0.01"``, ...);
- ``"bias"``: DeepSeek-V3's auxiliary-loss-free bias update after every step;
- ``"bias+seq"``: the bias update plus V3's small sequence-wise auxiliary loss.

Every arm runs the course's one training loop (:class:`course_utils.train.Trainer`): the
balancing losses plug in as its ``extra_loss`` hook, the bias update and the recorder as its
``after_step`` hook. Each run records, per step, the language-model loss, the share of routed
tokens each expert of each MoE layer received and the routing biases; at the end, the held-out
loss on the answer tokens (the worked format, unless ``worked_fraction`` is 0) and the greedy
accuracy on held-out sums.

The data are the arithmetic task's lines (:class:`course_utils.arithmetic.ArithmeticTask`),
one padded line a row with the loss on the completion only, as notebook 21 trains; by default
every answer shows its column steps (``worked_fraction=1.0``), a format a small model learns in
a few hundred steps, so the held-out accuracy can tell the arms apart.

The model comes from a ``make_model(vocab_size)`` callable: any module whose
``forward(input_ids: (B, S)) -> logits (B, S, vocab)`` uses :class:`course_utils.moe.DeepSeekMoE`
layers with the V3 (sigmoid) router, so every arm applies to it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from .arithmetic import ArithmeticTask, evaluate_accuracy
from .data import ArithmeticProblem
from .generation import CausalLM
from .moe import (
    AuxLossFreeBalancer,
    DeepSeekMoE,
    Routing,
    expert_balance_loss,
    normalized_affinities,
    sequence_balance_loss,
)
from .tokenizer import CharTokenizer
from .train import Trainer, language_model_loss

__all__ = [
    "METHODS",
    "BalancingRun",
    "Spread",
    "arm_names",
    "greedy_accuracy",
    "moe_layers",
    "run_balancing_study",
    "summarize",
    "summarize_over_seeds",
]

METHODS = ("none", "switch", "bias", "bias+seq")


def arm_names(methods: Sequence[str] = METHODS, aux_alphas: Sequence[float] = (0.01,)) -> list[str]:
    """The arms :func:`run_balancing_study` trains, in order: each method once, ``"switch"``
    once per weight (``"switch α=0.1"``)."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    if "switch" in methods and (not aux_alphas or any(a <= 0 for a in aux_alphas)):
        raise ValueError(
            f"aux_alphas must be positive weights for the switch arms, got {tuple(aux_alphas)}"
        )
    names = []
    for m in methods:
        names += [f"switch α={a:g}" for a in aux_alphas] if m == "switch" else [m]
    return names


@dataclass
class BalancingRun:
    """What one training run recorded.

    losses: per-step training LM loss (auxiliary terms excluded, so runs compare);
    loads: (steps, n_layers, E) share of each layer's routed (token, expert) pairs per expert;
    biases: (steps, n_layers, E) the correction bias after each step;
    eval_loss: held-out next-token loss on the answer tokens; accuracy: greedy held-out
    accuracy on the sums.
    """

    method: str
    alpha: float = 0.0
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    loads: Tensor | None = None
    biases: Tensor | None = None
    eval_loss: float = math.nan
    accuracy: float = math.nan
    seconds: float = 0.0

    def max_over_mean(self) -> Tensor:
        """(steps,) the worst layer's max load over mean load (1.0 = balanced)."""
        loads = cast(Tensor, self.loads)  # recorded by the run
        n_experts = loads.shape[-1]
        return (loads.amax(dim=-1) * n_experts).amax(dim=-1)

    def starved_experts(self, last: int = 20, below: float = 0.1) -> int:
        """Experts (over all layers) whose mean load over the last ``last`` steps is below
        ``below`` times the mean: the mark of a routing collapse."""
        loads = cast(Tensor, self.loads)  # recorded by the run
        n_experts = loads.shape[-1]
        recent = loads[-last:].mean(dim=0) * n_experts
        return int((recent < below).sum())


def moe_layers(model: nn.Module) -> list[DeepSeekMoE]:
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    if not layers:
        raise ValueError("make_model must build a model with at least one DeepSeekMoE layer")
    return layers


def greedy_accuracy(
    model: nn.Module,
    tokenizer: CharTokenizer,
    problems: Sequence[ArithmeticProblem],
    max_new_tokens: int | None = None,
    batch_size: int = 128,
) -> float:
    """Share of ``problems`` whose greedy completion ends in the right answer: the course's
    :func:`course_utils.arithmetic.evaluate_accuracy`, without a cache so that any
    ``forward(ids) -> logits`` model works. ``tokenizer`` must be the arithmetic one."""
    if tokenizer.alphabet != CharTokenizer().alphabet:
        raise ValueError("greedy_accuracy needs the arithmetic CharTokenizer (ARITHMETIC_ALPHABET)")
    was_training = model.training
    model.eval()
    result = evaluate_accuracy(
        cast(CausalLM, model),  # use_cache=False: only model(ids) is called
        problems,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        use_cache=False,
    )
    model.train(was_training)
    return result.accuracy


def run_balancing_study(
    make_model: Callable[[int], nn.Module],
    methods: Sequence[str] = METHODS,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    aux_alphas: Sequence[float] = (0.01,),
    seq_alpha: float = 0.001,
    gamma: float = 0.01,
    n_train_lines: int = 20000,
    worked_fraction: float = 1.0,
    n_eval_problems: int = 200,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, BalancingRun]:
    """Train ``make_model(vocab_size)`` once per arm (:func:`arm_names`) at an equal budget;
    see the module doc. Returns ``{arm name: BalancingRun}``.

    ``aux_alphas`` are the Switch-loss weights (one arm each), ``seq_alpha`` weighs the
    sequence-wise loss (DeepSeek-V3 used 0.0001 at its scale), ``gamma`` is the bias step (V3
    used 0.001 over ~15k steps; our runs are a few hundred steps, so the default is larger).
    ``seed`` drives the corpus, the initial weights, the batches and the held-out problems;
    every arm starts from the same initial weights and sees the same batches.
    """
    names = arm_names(methods, aux_alphas)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    device = torch.device(device or "cpu")
    task = ArithmeticTask()
    corpus = task.training_tokens(n_train_lines, seed=seed, worked_fraction=worked_fraction)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= corpus.n_lines:
        raise ValueError(
            f"batch_size must be an int in [1, n_train_lines={n_train_lines}], got {batch_size!r}"
        )
    problems = task.problems(n_eval_problems, seed=seed + 2, split="test")
    held_out = task.corpus_from_text(
        "".join(
            p.prompt + (p.worked_answer if worked_fraction > 0 else p.direct_answer)
            for p in problems
        )
    )
    eval_x, eval_y = task.line_tensors(held_out, device=device)
    runs = {}
    for name in names:
        method, _, alpha = name.partition(" α=")
        run = BalancingRun(method, float(alpha) if alpha else 0.0, seed)
        runs[name] = _train_one(
            make_model,
            run,
            task,
            corpus,
            eval_x,
            eval_y,
            problems,
            steps,
            batch_size,
            lr,
            seq_alpha,
            gamma,
            device,
            progress,
        )
    return runs


def _train_one(
    make_model: Callable[[int], nn.Module],
    run: BalancingRun,
    task: ArithmeticTask,
    corpus,
    eval_x: Tensor,
    eval_y: Tensor,
    problems: Sequence[ArithmeticProblem],
    steps: int,
    batch_size: int,
    lr: float,
    seq_alpha: float,
    gamma: float,
    device: torch.device,
    progress: bool,
) -> BalancingRun:
    torch.manual_seed(run.seed)
    model = make_model(task.vocab_size).to(device).train()
    layers = moe_layers(model)
    balancer = AuxLossFreeBalancer(model, gamma=gamma) if run.method.startswith("bias") else None
    get_batch = task.lm_batches(
        corpus,
        batch_size,
        device=device,
        prompt_loss=False,
        generator=torch.Generator().manual_seed(run.seed),
    )
    loads, biases = [], []

    def balance_loss(model: nn.Module) -> Tensor:
        total = torch.zeros((), device=device)
        for layer in layers:
            r = cast(Routing, layer.last_routing)  # set by the forward this loss follows
            if run.method == "switch":
                total = total + run.alpha * expert_balance_loss(
                    normalized_affinities(r.scores), r.indices
                )
            else:  # bias+seq
                total = total + seq_alpha * sequence_balance_loss(
                    r.scores.view(batch_size, -1, r.scores.shape[-1]),
                    r.indices.view(batch_size, -1, r.indices.shape[-1]),
                )
        return total

    def record(model: nn.Module, step: int, loss: float) -> None:
        # the step's forward has just set every layer's last_counts
        counts = [cast(Tensor, layer.last_counts) for layer in layers]
        loads.append(torch.stack([c / c.sum() for c in counts]).cpu())
        if balancer is not None:
            balancer.step()
        else:
            for layer in layers:
                layer.load_since_update.zero_()
        biases.append(
            torch.stack(
                [
                    getattr(
                        layer.gate,
                        "e_score_correction_bias",
                        torch.zeros_like(cast(Tensor, layer.last_counts)),
                    )
                    .detach()
                    .float()
                    for layer in layers
                ]
            ).cpu()
        )

    hooks: dict[str, Callable[..., object]] = {"after_step": record}
    if run.method in ("switch", "bias+seq"):
        hooks["extra_loss"] = balance_loss
    name = run.method + (f" α={run.alpha:g}" if run.method == "switch" else "")
    result = Trainer(model, get_batch, steps, lr=lr, hooks=hooks, desc=name).train(
        progress=progress
    )
    run.losses, run.seconds = result.losses, result.seconds
    run.loads, run.biases = torch.stack(loads), torch.stack(biases)
    run.eval_loss = _eval_loss(model, eval_x, eval_y)
    run.accuracy = greedy_accuracy(model, task.tokenizer, problems)
    return run


@torch.no_grad()
def _eval_loss(model: nn.Module, inputs: Tensor, targets: Tensor, chunk: int = 256) -> float:
    """Mean next-token loss over every target that is not -100 (the answer tokens)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], chunk):
        y = targets[i : i + chunk]
        n = int((y != -100).sum())
        total += language_model_loss(model(inputs[i : i + chunk]), y).item() * n
        count += n
    model.train()
    return total / max(count, 1)


def summarize(runs: Mapping[str, BalancingRun], last: int = 20) -> list[dict[str, float | str]]:
    """One row per arm: final train loss (mean of the last steps), held-out answer loss,
    accuracy, mean max/mean load over the last steps, starved experts, seconds."""
    rows: list[dict[str, float | str]] = []
    for name, run in runs.items():
        rows.append(
            {
                "method": name,
                "train_loss": sum(run.losses[-last:]) / len(run.losses[-last:]),
                "eval_loss": run.eval_loss,
                "accuracy": run.accuracy,
                "max_over_mean": float(run.max_over_mean()[-last:].mean()),
                "starved_experts": run.starved_experts(last),
                "seconds": run.seconds,
            }
        )
    return rows


@dataclass(frozen=True)
class Spread:
    """One figure over seeds: its values (in seed order), mean, min and max."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def summarize_over_seeds(
    runs_by_seed: Mapping[int, Mapping[str, BalancingRun]], last: int = 20
) -> dict[str, dict[str, Spread]]:
    """``{arm: {figure: Spread}}``: each of :func:`summarize`'s figures over the seeds (every
    seed must have run the same arms)."""
    if not runs_by_seed:
        raise ValueError("runs_by_seed is empty: run run_balancing_study for at least one seed")
    arms = [list(runs) for runs in runs_by_seed.values()]
    if any(a != arms[0] for a in arms):
        raise ValueError(f"every seed must run the same arms, got {arms}")
    table: dict[str, dict[str, Spread]] = {}
    per_seed = {
        seed: {r["method"]: r for r in summarize(runs, last)} for seed, runs in runs_by_seed.items()
    }
    for arm in arms[0]:
        table[arm] = {}
        for figure in (
            "train_loss",
            "eval_loss",
            "accuracy",
            "max_over_mean",
            "starved_experts",
            "seconds",
        ):
            table[arm][figure] = Spread(
                tuple(float(per_seed[s][arm][figure]) for s in sorted(per_seed))
            )
    return table
