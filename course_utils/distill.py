"""Distillation: teaching a small model what a big one does (notebook 23).

Two ways, both used around DeepSeek-R1:

- **Logit distillation** (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
  Network"): the student matches the teacher's whole next-token distribution, softened by a
  temperature T, through a KL divergence (:func:`distillation_kl`,
  :func:`train_logit_distillation`). Reverse KL on the student's own samples is on-policy
  distillation (:func:`train_on_policy_distillation`).
- **Sequence-level distillation**, the recipe of the R1-distill models (DeepSeek-R1 paper,
  section 2.4): sample the teacher, keep the completions a verifier accepts, and fine-tune the
  student on them with ordinary next-token cross-entropy on the completion tokens only
  (:func:`build_distillation_set`, :func:`sft_tensors`, :func:`train_sft`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arithmetic import ArithmeticTask, generate_completions
from .data import ArithmeticProblem, check_completion, uses_worked_steps
from .generation import CausalLM, generate
from .rl import completion_mask
from .runtime import device_of, make_generator
from .train import (
    TrainResult,
    language_model_loss,
    make_optimizer,
    train_language_model,
)

__all__ = [
    "DIRECTIONS",
    "distillation_kl",
    "DistillationSet",
    "build_distillation_set",
    "sft_tensors",
    "sft_batches",
    "train_sft",
    "train_logit_distillation",
    "train_on_policy_distillation",
]

#: "forward" is KL(teacher || student): the student must cover every token the teacher
#: gives mass to (mean-seeking). "reverse" is KL(student || teacher): the student is punished
#: for mass where the teacher has little, so it may drop some of the teacher's modes
#: (mode-seeking), the usual choice when the student samples its own text.
DIRECTIONS = ("forward", "reverse")


def distillation_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    direction: str = "forward",
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """KL divergence between temperature-softened teacher and student distributions, times T².

    student_logits, teacher_logits: (..., vocab); mask: (...) bool, True where a position
    counts. With p = softmax(teacher / T) and q = softmax(student / T), ``"forward"`` is
    ``sum_v p (log p - log q)`` and ``"reverse"`` is ``sum_v q (log q - log p)``. The T² factor
    (Hinton et al. 2015, section 2) keeps the gradient's size independent of T: the soft
    targets' gradients shrink as 1/T². The teacher gets no gradient. ``reduction="mean"``
    averages over the masked-in positions; ``"none"`` returns the (...) per-position values.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have one shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "forward":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    kl = kl * temperature**2
    if mask is not None:
        if mask.shape != kl.shape:
            raise ValueError(
                f"mask must have shape {tuple(kl.shape)} (the logits without the "
                f"vocabulary axis), got {tuple(mask.shape)}"
            )
        kl = kl.masked_fill(~mask.bool(), 0.0)
    if reduction == "none":
        return kl
    count = kl.numel() if mask is None else mask.sum().clamp(min=1)
    return kl.sum() / count


# --------------------------------------------------------------------------------------------
# Sequence-level distillation: sample, filter, fine-tune
# --------------------------------------------------------------------------------------------


@dataclass
class DistillationSet:
    """Teacher completions a verifier accepted, with the problems they answer."""

    problems: list[ArithmeticProblem]
    completions: list[str]
    n_sampled: int
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def keep_rate(self) -> float:
        """Fraction of the teacher's samples the verifier kept."""
        return len(self) / self.n_sampled if self.n_sampled else 0.0

    @property
    def worked_fraction(self) -> float:
        return sum(map(uses_worked_steps, self.completions)) / max(len(self), 1)

    @property
    def lines(self) -> list[str]:
        """Training text: ``prompt + completion`` per kept sample."""
        return [p.prompt + c for p, c in zip(self.problems, self.completions, strict=True)]


@torch.no_grad()
def build_distillation_set(
    teacher: CausalLM,
    problems: Sequence[ArithmeticProblem],
    samples_per_problem: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    verifier: Callable[[ArithmeticProblem, str], bool] = check_completion,
    task: ArithmeticTask | None = None,
    dedupe: bool = False,
) -> DistillationSet:
    """Sample ``samples_per_problem`` teacher completions per problem at ``temperature`` and
    keep those ``verifier(problem, completion)`` accepts (rejection sampling). ``dedupe``
    keeps one copy of identical (problem, completion) pairs."""
    start = time.perf_counter()
    completions = generate_completions(
        teacher,
        problems,
        greedy=False,
        temperature=temperature,
        samples=samples_per_problem,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        generator=generator,
        task=task,
    )
    expanded = [p for p in problems for _ in range(samples_per_problem)]
    kept_p, kept_c, seen = [], [], set()
    for p, c in zip(expanded, completions, strict=True):
        if not verifier(p, c):
            continue
        if dedupe:
            if (p, c) in seen:
                continue
            seen.add((p, c))
        kept_p.append(p)
        kept_c.append(c)
    return DistillationSet(kept_p, kept_c, len(completions), time.perf_counter() - start)


def sft_tensors(
    problems: Sequence[ArithmeticProblem],
    completions: Sequence[str],
    task: ArithmeticTask | None = None,
) -> tuple[Tensor, Tensor]:
    """Inputs and targets for supervised fine-tuning on completions only.

    Each row is one line ``prompt + completion``, padded with end tokens to the longest line
    L. Returns inputs (n, L - 1) = line[:-1] and targets (n, L - 1) = line[1:], with targets
    set to -100 (ignored by the loss) where they are prompt tokens or padding: only the
    completion, end token included, is learned.
    """
    if len(problems) != len(completions) or not problems:
        raise ValueError(
            f"need as many completions as problems, at least one; got "
            f"{len(problems)} and {len(completions)}"
        )
    task = task or ArithmeticTask.for_problems(problems)
    prompt_len = task.prompt_length
    rows = [task.tokenizer.encode(p.prompt + c) for p, c in zip(problems, completions, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), task.eos_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) <= prompt_len:
            raise ValueError(f"completion {i} is empty ({completions[i]!r}); drop it")
        ids[i, : len(row)] = torch.tensor(row)
        # target j is token j + 1: completion tokens sit at prompt_len .. len(row) - 1
        targets[i, prompt_len - 1 : len(row) - 1] = ids[i, prompt_len : len(row)]
    return ids[:, :-1], targets


def sft_batches(
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Callable[[], tuple[Tensor, Tensor]]:
    """A ``get_batch()`` drawing ``batch_size`` random rows of (inputs, targets)."""
    if inputs.shape != targets.shape or inputs.dim() != 2:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must both be (n, L)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > inputs.shape[0]:
        raise ValueError(
            f"batch_size={batch_size} is larger than the data ({inputs.shape[0]} "
            "rows); use a smaller batch or more examples"
        )
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)

    def get_batch() -> tuple[Tensor, Tensor]:
        rows = torch.randint(0, inputs.shape[0], (batch_size,), generator=generator)
        rows = rows.to(inputs.device)
        return inputs[rows], targets[rows]

    return get_batch


def train_sft(
    model: nn.Module,
    data: DistillationSet | tuple[Sequence[ArithmeticProblem], Sequence[str]],
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "SFT",
    **train_kwargs,
) -> TrainResult:
    """Fine-tune ``model`` on completions (teacher samples, or ground-truth answers) with
    next-token cross-entropy on completion tokens only, through
    :func:`course_utils.train.train_language_model` (AdamW, warm-up + cosine, clipping; extra
    keyword arguments go to it). Only parameters with ``requires_grad`` are trained."""
    problems, completions = (
        (data.problems, data.completions) if isinstance(data, DistillationSet) else data
    )
    if not problems:
        raise ValueError(
            "no training examples: the distillation set is empty (did the "
            "verifier reject every teacher sample?)"
        )
    inputs, targets = sft_tensors(problems, completions)
    generator = torch.Generator().manual_seed(seed)
    get_batch = sft_batches(inputs, targets, batch_size, generator, device_of(model))
    return train_language_model(
        model, get_batch, steps, lr=lr, progress=progress, desc=desc, **train_kwargs
    )


# --------------------------------------------------------------------------------------------
# Logit distillation loops
# --------------------------------------------------------------------------------------------


def train_logit_distillation(
    student: nn.Module,
    teacher: nn.Module,
    get_batch: Callable[[], tuple[Tensor, Tensor]],
    steps: int,
    temperature: float = 2.0,
    alpha: float = 0.5,
    direction: str = "forward",
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup_frac: float = 0.05,
    grad_clip: float | None = 1.0,
    progress: bool = True,
    desc: str = "logit distillation",
) -> TrainResult:
    """Train ``student`` on batches from ``get_batch`` (inputs, targets (b, t); -100 ignored)
    with ``alpha * distillation_kl(student, teacher, T) + (1 - alpha) * cross_entropy``.
    ``teacher`` runs under no_grad in eval mode. The KL covers the positions whose target is
    not -100. Returns the per-step total losses."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    teacher.eval()

    def compute_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = model(x)
        kl = distillation_kl(logits, teacher_logits, temperature, direction, mask=y != -100)
        loss = alpha * kl + (1 - alpha) * language_model_loss(logits, y)
        return loss, loss

    return train_language_model(
        student,
        get_batch,
        steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup_frac=warmup_frac,
        grad_clip=grad_clip,
        progress=progress,
        desc=desc,
        compute_loss=compute_loss,
    )


def train_on_policy_distillation(
    student: nn.Module,
    teacher: nn.Module,
    problems: Sequence[ArithmeticProblem],
    steps: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    lr: float = 1e-3,
    max_new_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "on-policy distillation",
) -> TrainResult:
    """On-policy distillation: each step the student samples completions for ``batch_size``
    random problems, and is trained to lower the per-token reverse KL(student || teacher) of
    the next-token distributions along its own samples (every position up to its end token).
    No verifier: the teacher's distribution is the signal. Returns per-step mean KL."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    task = ArithmeticTask.for_problems(problems)
    device = device_of(student)
    max_new = max_new_tokens or task.default_max_new_tokens
    generator = make_generator(seed, device)
    pick = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(student, lr, weight_decay=0.0, betas=(0.9, 0.99))
    teacher.eval()
    result = TrainResult()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    for _ in bar:
        rows = torch.randint(0, len(problems), (batch_size,), generator=pick).tolist()
        prompts = task.encode_prompts([problems[i] for i in rows], device)
        ids = generate(
            cast(CausalLM, student),  # a causal language model: an nn.Module with new_caches
            prompts,
            max_new,
            temperature=temperature,
            eos_token_id=task.eos_token_id,
            generator=generator,
        )
        completions = ids[:, prompts.shape[1] :]
        mask = completion_mask(completions, task.eos_token_id)
        inputs = ids[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(inputs)[:, prompts.shape[1] - 1 :]
        student.train()
        logits = student(inputs)[:, prompts.shape[1] - 1 :]
        loss = distillation_kl(logits, teacher_logits, 1.0, "reverse", mask=mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        student.eval()
        result.losses.append(loss.item())
        result.lrs.append(lr)
        bar.set_postfix(kl=f"{loss.item():.3f}")
    result.seconds = time.perf_counter() - start
    return result
