"""The balancing study of notebook 18: one small MoE language model, four ways to balance it.

:func:`run_balancing_study` trains the same model (same seed, data, steps and optimizer) with

- ``"none"``: no balancing at all;
- ``"switch"``: the Switch / DeepSeek-V2 expert-level auxiliary loss over the whole batch;
- ``"bias"``: DeepSeek-V3's auxiliary-loss-free bias update after every step;
- ``"bias+seq"``: the bias update plus V3's small sequence-wise auxiliary loss,

and records, per step, the language-model loss and the share of routed tokens each expert of
each MoE layer received; at the end it measures held-out loss and greedy accuracy on the
arithmetic task (:func:`course_utils.data.check_completion`).

The model comes from a ``make_model(vocab_size)`` callable: any module whose
``forward(input_ids: (B, S)) -> logits (B, S, vocab)`` uses :class:`course_utils.moe.DeepSeekMoE`
layers with the V3 (sigmoid) router, so all four methods apply to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arithmetic import evaluate_accuracy
from .data import (
    ArithmeticProblem,
    make_arithmetic_corpus,
    random_windows,
    sample_arithmetic_problems,
)
from .moe import (
    AuxLossFreeBalancer,
    DeepSeekMoE,
    expert_balance_loss,
    normalized_affinities,
    sequence_balance_loss,
)
from .tokenizer import CharTokenizer

__all__ = ["METHODS", "BalancingRun", "greedy_accuracy", "moe_layers", "run_balancing_study",
           "summarize"]

METHODS = ("none", "switch", "bias", "bias+seq")


@dataclass
class BalancingRun:
    """What one training run recorded.

    losses: per-step training LM loss (auxiliary terms excluded, so runs compare);
    loads: (steps, n_layers, E) share of each layer's routed (token, expert) pairs per expert;
    biases: (steps, n_layers, E) the correction bias after each step;
    eval_loss / accuracy: held-out next-token loss and greedy task accuracy at the end.
    """

    method: str
    losses: list[float] = field(default_factory=list)
    loads: Tensor | None = None
    biases: Tensor | None = None
    eval_loss: float = math.nan
    accuracy: float = math.nan
    seconds: float = 0.0

    def max_over_mean(self) -> Tensor:
        """(steps,) the worst layer's max load over mean load (1.0 = balanced)."""
        n_experts = self.loads.shape[-1]
        return (self.loads.amax(dim=-1) * n_experts).amax(dim=-1)

    def starved_experts(self, last: int = 20, below: float = 0.1) -> int:
        """Experts (over all layers) whose mean load over the last ``last`` steps is below
        ``below`` times the mean: the mark of a routing collapse."""
        n_experts = self.loads.shape[-1]
        recent = self.loads[-last:].mean(dim=0) * n_experts
        return int((recent < below).sum())


def moe_layers(model: nn.Module) -> list[DeepSeekMoE]:
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    if not layers:
        raise ValueError("make_model must build a model with at least one DeepSeekMoE layer")
    return layers


def greedy_accuracy(model: nn.Module, tokenizer: CharTokenizer,
                    problems: Sequence[ArithmeticProblem], max_new_tokens: int | None = None,
                    batch_size: int = 128) -> float:
    """Share of ``problems`` whose greedy completion ends in the right answer: the course's
    :func:`course_utils.arithmetic.evaluate_accuracy`, without a cache so that any
    ``forward(ids) -> logits`` model works. ``tokenizer`` must be the arithmetic one."""
    if tokenizer.alphabet != CharTokenizer().alphabet:
        raise ValueError("greedy_accuracy needs the arithmetic CharTokenizer (ARITHMETIC_ALPHABET)")
    was_training = model.training
    model.eval()
    result = evaluate_accuracy(model, problems, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, use_cache=False)
    model.train(was_training)
    return result.accuracy


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_balancing_study(
    make_model: Callable[[int], nn.Module],
    methods: Sequence[str] = METHODS,
    steps: int = 300,
    batch_size: int = 32,
    block_size: int = 48,
    lr: float = 3e-3,
    aux_alpha: float = 0.01,
    seq_alpha: float = 0.001,
    gamma: float = 0.01,
    n_train_lines: int = 20000,
    n_eval_problems: int = 200,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, BalancingRun]:
    """Train ``make_model(vocab_size)`` once per method at an equal budget; see the module doc.

    ``aux_alpha`` weighs the Switch loss, ``seq_alpha`` the sequence-wise loss (DeepSeek-V3 used
    0.0001 at its scale), ``gamma`` is the bias step (V3 used 0.001 over ~15k steps; our runs
    are a few hundred steps, so the default is larger). Every run starts from the same seed, so
    from the same initial weights and batches.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = torch.device(device or "cpu")
    tokenizer = CharTokenizer()
    train_ids = torch.tensor(tokenizer.encode(make_arithmetic_corpus(n_train_lines, seed=seed)))
    eval_ids = torch.tensor(tokenizer.encode(
        make_arithmetic_corpus(max(200, n_eval_problems), seed=seed + 1, split="test")))
    problems = sample_arithmetic_problems(n_eval_problems, seed=seed + 2, split="test")
    runs = {}
    for method in methods:
        runs[method] = _train_one(make_model, method, tokenizer, train_ids, eval_ids, problems,
                                  steps, batch_size, block_size, lr, aux_alpha, seq_alpha,
                                  gamma, seed, device, progress)
    return runs


def _train_one(make_model, method, tokenizer, train_ids, eval_ids, problems, steps, batch_size,
               block_size, lr, aux_alpha, seq_alpha, gamma, seed, device, progress):
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = make_model(tokenizer.vocab_size).to(device).train()
    layers = moe_layers(model)
    balancer = AuxLossFreeBalancer(model, gamma=gamma) if method.startswith("bias") else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    run = BalancingRun(method)
    loads, biases = [], []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=method, disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, max(1, steps // 20))
        x, y = random_windows(train_ids, batch_size, block_size, gen)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = lm_loss
        for layer in layers:
            r = layer.last_routing
            if method == "switch":
                loss = loss + aux_alpha * expert_balance_loss(normalized_affinities(r.scores),
                                                              r.indices)
            elif method == "bias+seq":
                loss = loss + seq_alpha * sequence_balance_loss(
                    r.scores.view(batch_size, block_size, -1),
                    r.indices.view(batch_size, block_size, -1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if balancer is not None:
            balancer.step()
        else:
            for layer in layers:
                layer.load_since_update.zero_()
        loads.append(torch.stack([layer.last_counts / layer.last_counts.sum()
                                  for layer in layers]).cpu())
        biases.append(torch.stack([getattr(layer.gate, "e_score_correction_bias",
                                           torch.zeros_like(layer.last_counts)).detach().float()
                                   for layer in layers]).cpu())
        run.losses.append(lm_loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
    run.seconds = time.perf_counter() - start
    run.loads, run.biases = torch.stack(loads), torch.stack(biases)
    run.eval_loss = _eval_loss(model, eval_ids, batch_size, block_size, device)
    run.accuracy = greedy_accuracy(model, tokenizer, problems)
    return run


@torch.no_grad()
def _eval_loss(model: nn.Module, ids: Tensor, batch_size: int, block_size: int,
               device: torch.device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(4):
        x, y = random_windows(ids, batch_size, block_size, gen)
        logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      y.to(device).reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def summarize(runs: dict[str, BalancingRun], last: int = 20) -> list[dict[str, float | str]]:
    """One row per method: final train loss (mean of the last steps), held-out loss, accuracy,
    mean max/mean load over the last steps, starved experts, seconds."""
    rows = []
    for name, run in runs.items():
        rows.append({
            "method": name,
            "train_loss": sum(run.losses[-last:]) / len(run.losses[-last:]),
            "eval_loss": run.eval_loss,
            "accuracy": run.accuracy,
            "max_over_mean": float(run.max_over_mean()[-last:].mean()),
            "starved_experts": run.starved_experts(last),
            "seconds": run.seconds,
        })
    return rows
