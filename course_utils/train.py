"""The course's one supervised training loop, and the optimizer set-up every trainer shares.

- :func:`param_groups` / :func:`make_optimizer`: the one parameter-group rule (weight decay on
  matrices, none on vectors such as RMSNorm weights and biases; frozen parameters left out) and
  AdamW. The supervised loop below and GRPO's update (:mod:`course_utils.rl`) both build their
  optimizer here.
- :func:`lr_schedule`: linear warm-up, then cosine decay to a floor.
- :class:`Trainer`: the loop. Each step draws a batch, computes the loss, adds optional extra
  terms, clips, steps AdamW and runs the after-step hooks outside autograd. Named hooks plug the
  course's variants into it without copying it: ``compute_loss`` (multi-token prediction,
  logit distillation), ``extra_loss`` (an MoE balancing loss), ``after_step`` (the
  auxiliary-loss-free bias update, recording expert loads, periodic evaluation). It saves and
  resumes its whole state (model, optimizer, step, RNGs), so a resumed run continues
  bit-identically on the CPU.
- :func:`train_language_model`: a :class:`Trainer` run in one call.

Pretraining (:mod:`course_utils.pretrain`), notebook 18's balancing study
(:mod:`course_utils.moe_training`) and SFT / logit distillation (:mod:`course_utils.distill`)
all run through :class:`Trainer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "HOOKS",
    "TrainResult",
    "Trainer",
    "evaluate_language_model",
    "language_model_loss",
    "lr_schedule",
    "make_optimizer",
    "param_groups",
    "train_language_model",
]

#: The hooks :class:`Trainer` knows, and their signatures:
#: ``compute_loss(model, x, y) -> (lm_loss, total_loss)`` replaces the next-token loss;
#: ``extra_loss(model) -> Tensor`` is added to the total after the forward pass;
#: ``after_step(model, step, lm_loss) -> None`` runs under ``no_grad`` after each optimizer
#: step (``step`` 0-based, ``lm_loss`` a float).
HOOKS = ("compute_loss", "extra_loss", "after_step")


def lr_schedule(
    step: int, total_steps: int, peak_lr: float, warmup_frac: float = 0.05, min_ratio: float = 0.1
) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup_frac`` of the steps,
    then cosine decay from ``peak_lr`` to ``min_ratio * peak_lr`` at the last step."""
    warmup = max(1, int(round(warmup_frac * total_steps)))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def language_model_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy. logits (b, t, v), targets (b, t) -> scalar."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
    )


def param_groups(
    params: nn.Module | Iterable[nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups, the course's one rule: matrices (2 or more dims: projections,
    embeddings, experts) decay by ``weight_decay``; vectors (RMSNorm weights, biases) do not,
    since shrinking a norm's gain towards 0 is not regularisation. Parameters that do not
    require grad (frozen weights, a LoRA base) are left out. Empty groups are dropped."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    items = params.parameters() if isinstance(params, nn.Module) else params
    trainable = [p for p in items if p.requires_grad]
    if not trainable:
        raise ValueError(
            "no parameter requires grad: there is nothing to train (unfreeze "
            "some parameters, or pass the adapters' parameters)"
        )
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(
    params: nn.Module | Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``params`` (a module or its parameters). The
    defaults (0.9, 0.95) and 0.1 are DeepSeek-V3's pretraining settings (technical report,
    section 4.2); GRPO passes its own."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=betas)


@dataclass
class TrainResult:
    """Per-step language-model losses (extra terms excluded, so runs compare) and learning
    rates, and the seconds spent in :meth:`Trainer.train`."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _check_hooks(hooks: Mapping[str, Callable[..., Any]] | None) -> dict[str, Callable[..., Any]]:
    hooks = dict(hooks or {})
    unknown = sorted(set(hooks) - set(HOOKS))
    if unknown:
        raise ValueError(f"unknown hook name(s) {unknown}; Trainer knows {list(HOOKS)}")
    for name, fn in hooks.items():
        if not callable(fn):
            raise ValueError(f"hook {name!r} must be callable, got {type(fn).__name__}")
    return hooks


class Trainer:
    """One supervised training run of ``model`` on batches from ``get_batch``.

    ``get_batch()`` returns (inputs, targets), each (b, t) on the model's device; targets of
    -100 are ignored. ``steps`` is the whole budget: the learning-rate schedule (warm-up over
    ``warmup_frac``, cosine to ``min_lr_ratio * lr``) spans it even when :meth:`train` runs it in
    pieces. AdamW from :func:`make_optimizer` (``lr``, ``weight_decay``, ``betas``), gradient
    norm clipped to ``grad_clip`` (None: no clipping). ``hooks`` maps names of :data:`HOOKS` to
    callables.

    >>> # trainer = Trainer(model, get_batch, steps=1000, hooks={"after_step": balancer_step})
    >>> # trainer.train(400); trainer.save("ckpt"); ...; Trainer(...).resume("ckpt").train()
    """

    def __init__(
        self,
        model: nn.Module,
        get_batch: Callable[[], tuple[Tensor, Tensor]],
        steps: int,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_frac: float = 0.05,
        min_lr_ratio: float = 0.1,
        grad_clip: float | None = 1.0,
        hooks: Mapping[str, Callable[..., Any]] | None = None,
        desc: str = "training",
    ) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int (the whole budget), got {steps!r}")
        if not 0.0 <= warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None (no clipping), got {grad_clip}")
        if not callable(get_batch):
            raise ValueError("get_batch must be a callable returning (inputs, targets)")
        self.model = model
        self.get_batch = get_batch
        self.steps = steps
        self.lr, self.warmup_frac, self.min_lr_ratio = lr, warmup_frac, min_lr_ratio
        self.grad_clip = grad_clip
        self.hooks = _check_hooks(hooks)
        self.desc = desc
        self.optimizer = make_optimizer(model, lr, weight_decay, betas)
        self.step = 0
        self.result = TrainResult()

    @property
    def steps_left(self) -> int:
        return self.steps - self.step

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        compute = self.hooks.get("compute_loss")
        if compute is None:
            loss = language_model_loss(self.model(x), y)
            return loss, loss
        return compute(self.model, x, y)

    def train(self, n_steps: int | None = None, progress: bool = True) -> TrainResult:
        """Run ``n_steps`` more steps (default: to the end of the budget); returns the
        :class:`TrainResult` of the whole run so far. The model is left in eval mode."""
        n_steps = self.steps_left if n_steps is None else n_steps
        if not isinstance(n_steps, int) or not 0 <= n_steps <= self.steps_left:
            raise ValueError(
                f"n_steps must be an int in [0, {self.steps_left}] (the budget "
                f"left of steps={self.steps}), got {n_steps!r}"
            )
        model, result = self.model.train(), self.result
        extra, after = self.hooks.get("extra_loss"), self.hooks.get("after_step")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        start = time.perf_counter()
        bar = tqdm(range(n_steps), desc=self.desc, disable=not progress, mininterval=0.5)
        for _ in bar:
            lr = lr_schedule(self.step, self.steps, self.lr, self.warmup_frac, self.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self.get_batch()
            loss, total = self._loss(x, y)
            if extra is not None:
                total = total + extra(model)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
            value = loss.item()
            if after is not None:
                with torch.no_grad():
                    after(model, self.step, value)
            result.losses.append(value)
            result.lrs.append(lr)
            self.step += 1
            if self.step % 20 == 0 or self.step == self.steps:
                bar.set_postfix(loss=f"{value:.3f}")
        result.seconds += time.perf_counter() - start
        model.eval()
        return result

    # -- save and resume ----------------------------------------------------------------------

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Model, optimizer, RNG states, step and losses into directory ``path`` (plus
        ``extra``, JSON-able: a caller's own history)."""
        from .checkpoint import save_training_state

        state = {
            "steps": self.steps,
            "losses": self.result.losses,
            "lrs": self.result.lrs,
            "seconds": self.result.seconds,
            "caller": dict(extra or {}),
        }
        return save_training_state(path, self.model, self.optimizer, self.step, state)

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote into this trainer (built the same way: same model
        architecture and hyper-parameters) and return the caller's ``extra``."""
        from .checkpoint import load_training_state

        state = load_training_state(path, self.model, self.optimizer)
        saved = state["extra"]
        if saved.get("steps") != self.steps:
            raise ValueError(
                f"{path} was saved by a run with steps={saved.get('steps')}, this "
                f"trainer has steps={self.steps}; build it with the saved budget"
            )
        self.step = state["step"]
        self.result = TrainResult(list(saved["losses"]), list(saved["lrs"]), saved["seconds"])
        return saved["caller"]


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
    """Train ``model`` (input_ids -> logits) for ``steps`` steps: a :class:`Trainer` run to
    the end in one call. ``compute_loss`` and ``extra_loss`` are the hooks of the same name;
    ``after_step(model, step)`` runs after each optimizer step. Returns the per-step losses
    (the language-model term only)."""
    hooks: dict[str, Callable[..., Any]] = {}
    if compute_loss is not None:
        hooks["compute_loss"] = compute_loss
    if extra_loss is not None:
        hooks["extra_loss"] = extra_loss
    if after_step is not None:
        hooks["after_step"] = lambda m, step, loss: after_step(m, step)
    trainer = Trainer(
        model,
        get_batch,
        steps,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        warmup_frac=warmup_frac,
        grad_clip=grad_clip,
        hooks=hooks,
        desc=desc,
    )
    return trainer.train(progress=progress)


@torch.no_grad()
def evaluate_language_model(
    model: nn.Module, get_batch: Callable[[], tuple[Tensor, Tensor]], n_batches: int = 10
) -> tuple[float, float]:
    """Mean loss and next-token accuracy (argmax == target) over ``n_batches`` batches."""
    was_training = model.training
    model.eval()
    losses, correct = [], 0
    count: float = 0  # a sum of Tensor.item() values, which torch types as int | float
    for _ in range(n_batches):
        x, y = get_batch()
        logits = model(x)
        losses.append(language_model_loss(logits, y).item())
        valid = y != -100
        correct += (logits.argmax(-1) == y)[valid].sum().item()
        count += valid.sum().item()
    model.train(was_training)
    return sum(losses) / len(losses), correct / max(count, 1)
