"""A small, readable training loop for the course's language models.

AdamW with (0.9, 0.95) betas and decoupled weight decay on matrices only, linear warm-up then
cosine decay, gradient clipping, a tqdm progress bar, and two hooks later tracks need:
``extra_loss(model)`` adds a term (an MoE balancing loss, say) and ``after_step(model, step)``
runs outside autograd after each optimizer step (the auxiliary-loss-free bias update).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["TrainResult", "lr_schedule", "language_model_loss", "train_language_model",
           "evaluate_language_model"]


def lr_schedule(step: int, total_steps: int, peak_lr: float, warmup_frac: float = 0.05,
                min_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup_frac`` of the steps,
    then cosine decay from ``peak_lr`` to ``min_ratio * peak_lr``."""
    warmup = max(1, int(round(warmup_frac * total_steps)))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def language_model_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy. logits (b, t, v), targets (b, t) -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index)


@dataclass
class TrainResult:
    """Per-step training losses (and learning rates), plus anything a hook chose to record."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_language_model(
    model: nn.Module,
    get_batch: Callable[[], tuple[Tensor, Tensor]],
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_frac: float = 0.05,
    grad_clip: float | None = 1.0,
    extra_loss: Callable[[nn.Module], Tensor] | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
    desc: str = "training",
    compute_loss: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> TrainResult:
    """Train ``model`` (input_ids -> logits) for ``steps`` steps on batches from ``get_batch``.

    ``get_batch()`` returns (inputs, targets), each (b, t) on the model's device; targets of
    -100 are ignored. Returns the per-step losses (the language-model term only).
    ``compute_loss(model, x, y) -> (lm_loss, total_loss)`` replaces the plain next-token loss
    when a method needs the batch itself (multi-token prediction, :mod:`course_utils.mtp`);
    ``extra_loss(model)`` is added to the total in either case.
    """
    import time

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=betas)
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        step_lr = lr_schedule(step, steps, lr, warmup_frac)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        x, y = get_batch()
        if compute_loss is None:
            loss = total = language_model_loss(model(x), y)
        else:
            loss, total = compute_loss(model, x, y)
        if extra_loss is not None:
            total = total + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(model, step)
        result.losses.append(loss.item())
        result.lrs.append(step_lr)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate_language_model(
    model: nn.Module, get_batch: Callable[[], tuple[Tensor, Tensor]], n_batches: int = 10
) -> tuple[float, float]:
    """Mean loss and next-token accuracy (argmax == target) over ``n_batches`` batches."""
    was_training = model.training
    model.eval()
    losses, correct, count = [], 0, 0
    for _ in range(n_batches):
        x, y = get_batch()
        logits = model(x)
        losses.append(language_model_loss(logits, y).item())
        valid = y != -100
        correct += (logits.argmax(-1) == y)[valid].sum().item()
        count += valid.sum().item()
    model.train(was_training)
    return sum(losses) / len(losses), correct / max(count, 1)
