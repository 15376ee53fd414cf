"""The arithmetic task every training notebook measures itself on (notebooks 19, 21, 22, 23).

Problems, prompts and the verifier live in :mod:`course_utils.data`; this module turns them into
tensors and measures a model on them:

- :class:`ArithmeticTask` fixes the problem size (``n_operands`` x ``n_digits``) and the
  character tokenizer, builds the pretraining token stream **once** (:meth:`~ArithmeticTask.
  training_tokens`), samples language-modelling batches from it (:meth:`~ArithmeticTask.
  lm_batches`), encodes prompts into one (batch, prompt_len) tensor and decodes completions.
- :func:`evaluate_accuracy` generates completions for held-out problems with the model's cached
  :func:`~course_utils.generation.generate`, in batches, and reports accuracy, how often the
  model wrote worked steps, completion length and pass@k.

Every prompt of one size has the same length (operands are zero-padded), so a batch of prompts
needs no padding, and the newline character is the end-of-answer token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from .data import (
    ArithmeticProblem,
    check_completion,
    make_arithmetic_corpus,
    sample_arithmetic_problems,
    uses_worked_steps,
    windows_at,
)
from .generation import CausalLM, generate
from .runtime import device_of, seed_everything
from .tokenizer import ARITHMETIC_ALPHABET, CharTokenizer
from .train import train_language_model

__all__ = [
    "ArithmeticTask",
    "TokenCorpus",
    "EvalResult",
    "evaluate_accuracy",
    "generate_completions",
    "pass_at_k",
    "TaskRun",
    "train_on_task",
]

#: Room past the longest well-formed completion before generation stops (the model may write
#: longer, malformed worked steps; those are cut and count as unterminated, hence wrong).
COMPLETION_SLACK = 8


@dataclass(frozen=True)
class TokenCorpus:
    """A pretraining token stream and where each line starts.

    ids: (n_tokens,) int64, the lines ``prompt + completion`` back to back (each ends with the
    end token). line_starts: (n_lines,) int64, the index in ``ids`` of each line's first token.
    worked_fraction: the measured fraction of lines that show worked steps.
    """

    ids: Tensor
    line_starts: Tensor
    n_lines: int
    worked_fraction: float

    def to(self, device: torch.device | str) -> TokenCorpus:
        return TokenCorpus(
            self.ids.to(device), self.line_starts.to(device), self.n_lines, self.worked_fraction
        )


@dataclass(frozen=True)
class ArithmeticTask:
    """Sums of ``n_operands`` numbers of ``n_digits`` digits, written one character a token.

    >>> task = ArithmeticTask()
    >>> task.prompt_length, task.max_completion_length, task.eos_token_id
    (9, 25, 0)
    """

    n_operands: int = 3
    n_digits: int = 2
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer, compare=False)

    def __post_init__(self) -> None:
        # validates the sizes with the same messages as the data module
        sample_arithmetic_problems(1, 0, self.n_operands, self.n_digits, "all")
        if "\n" not in self.tokenizer.alphabet:
            raise ValueError(
                "tokenizer's alphabet has no newline, the end-of-answer token; "
                f"use CharTokenizer({ARITHMETIC_ALPHABET!r})"
            )

    @classmethod
    def for_problems(
        cls, problems: Sequence[ArithmeticProblem], tokenizer: CharTokenizer | None = None
    ) -> ArithmeticTask:
        """The task the ``problems`` belong to (they must all have one size)."""
        if len(problems) == 0:
            raise ValueError("problems is empty; pass at least one ArithmeticProblem")
        sizes = {(len(p.operands), p.n_digits) for p in problems}
        if len(sizes) != 1:
            raise ValueError(
                f"problems mix sizes (n_operands, n_digits) {sorted(sizes)}; "
                "evaluate each size separately so prompts share one length"
            )
        n_operands, n_digits = sizes.pop()
        return cls(n_operands, n_digits, tokenizer or CharTokenizer())

    # -- sizes ----------------------------------------------------------------------------

    @property
    def _example(self) -> ArithmeticProblem:
        return ArithmeticProblem((0,) * self.n_operands, self.n_digits)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_token_id(self) -> int:
        """The newline's id: the token that ends every answer."""
        return self.tokenizer.stoi["\n"]

    @property
    def prompt_length(self) -> int:
        """Tokens in every prompt, ``07+45+13=`` is 9."""
        return len(self._example.prompt)

    @property
    def max_completion_length(self) -> int:
        """Tokens in a worked-steps completion (the longer format), end token included."""
        return len(self._example.worked_answer)

    @property
    def max_line_length(self) -> int:
        """Prompt plus the longest completion."""
        return self.prompt_length + self.max_completion_length

    @property
    def default_max_new_tokens(self) -> int:
        """How far generation runs by default: the worked format plus a little slack."""
        return self.max_completion_length + COMPLETION_SLACK

    # -- problems and text ----------------------------------------------------------------

    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[ArithmeticProblem]:
        """``n`` random problems of this size from ``split`` (``"train"``, ``"test"``,
        ``"all"``); see :func:`course_utils.data.sample_arithmetic_problems`."""
        return sample_arithmetic_problems(n, seed, self.n_operands, self.n_digits, split)

    def _encode_text(self, text: str) -> Tensor:
        # a 256-entry lookup table: much faster than a Python loop over characters
        lut = np.full(256, -1, dtype=np.int64)
        for ch, i in self.tokenizer.stoi.items():
            if ord(ch) < 256:
                lut[ord(ch)] = i
        raw = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
        ids = lut[raw]
        if (ids < 0).any():
            bad = text[int(np.argmax(ids < 0))]
            raise ValueError(
                f"character {bad!r} is not in the tokenizer's alphabet {self.tokenizer.alphabet!r}"
            )
        return torch.from_numpy(ids)

    def training_tokens(
        self, n_lines: int = 20000, seed: int = 0, worked_fraction: float = 0.3
    ) -> TokenCorpus:
        """The pretraining stream: ``n_lines`` lines of the ``"train"`` split, a
        ``worked_fraction`` of them with worked steps. Build it once and sample batches from it
        (generating text every step costs as much as the model's own step at this size).
        Held-out problems never appear."""
        text = make_arithmetic_corpus(
            n_lines, seed, self.n_operands, self.n_digits, worked_fraction, "train"
        )
        return self.corpus_from_text(text)

    def corpus_from_text(self, text: str) -> TokenCorpus:
        """A :class:`TokenCorpus` from your own lines (each ending with a newline): a corpus
        with a different mix, or with flaws on purpose (truncated answers, say).
        ``worked_fraction`` is measured on the lines."""
        if not text or not text.endswith("\n"):
            raise ValueError("text must be non-empty lines, each ending with a newline")
        ids = self._encode_text(text)
        ends = (ids == self.eos_token_id).nonzero().flatten()  # one end token per line
        line_starts = torch.cat([ids.new_zeros(1), ends[:-1] + 1])
        lines = text.splitlines()
        worked = sum(uses_worked_steps(line.partition("=")[2] + "\n") for line in lines)
        return TokenCorpus(ids, line_starts, len(lines), worked / len(lines))

    def lm_batches(
        self,
        corpus: TokenCorpus,
        batch_size: int,
        block_size: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        layout: str = "lines",
        prompt_loss: bool = True,
    ) -> Callable[[], tuple[Tensor, Tensor]]:
        """A ``get_batch()`` for :func:`course_utils.train.train_language_model`: each call
        returns inputs and next-token targets, (batch_size, width) each, on ``device``, from
        one gather into tensors built once here.

        ``layout="lines"`` (default): row i is one random line, padded with end tokens to
        :attr:`max_line_length` (width ``max_line_length - 1``); targets past its end token
        are -100 (ignored). Every answer is learned at the positions it has at evaluation,
        where the prompt starts at position 0 with no context. The price is padding (a direct
        line is 13 of :attr:`max_line_length` = 34 tokens at the default size); a model with
        learned absolute positions needs it, since with windows an answer appears at positions
        it never has at evaluation. ``prompt_loss=False`` also sets the prompt's targets to
        -100, so only
        completions are learned (the prompt's random digits cannot be predicted anyway).

        ``layout="windows"``: row i is ``ids[s_i : s_i + block_size]`` where ``s_i`` is a
        random line start: no padding and no masked target, but every line after the first
        in a row sits at a shifted position with earlier lines as context, unlike any prompt
        at evaluation. ``block_size`` (windows only) defaults to :attr:`max_line_length`.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > corpus.n_lines:
            raise ValueError(
                f"batch_size={batch_size} is larger than the data ({corpus.n_lines} "
                "lines); build the corpus with more lines or use a smaller batch"
            )
        if layout not in ("windows", "lines"):
            raise ValueError(f"layout must be 'windows' or 'lines', got {layout!r}")
        if layout == "windows" and not prompt_loss:
            raise ValueError("prompt_loss=False needs layout='lines' (windows mask nothing)")
        if layout == "lines" and block_size is not None:
            raise ValueError(
                "block_size applies to layout='windows'; lines are padded to "
                "max_line_length (pass layout='windows' to set it)"
            )
        ids = corpus.ids.to(device) if device is not None else corpus.ids
        if layout == "lines":
            rows, targets = self._padded_lines(ids, corpus.line_starts.to(ids.device), prompt_loss)

            def get_lines() -> tuple[Tensor, Tensor]:
                pick = torch.randint(0, rows.shape[0], (batch_size,), generator=generator)
                pick = pick.to(rows.device)
                return rows[pick], targets[pick]

            return get_lines
        block = self.max_line_length if block_size is None else block_size
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        starts = corpus.line_starts[corpus.line_starts + block + 1 <= ids.numel()]
        if starts.numel() == 0:
            raise ValueError(
                f"block_size={block} is longer than the corpus "
                f"({ids.numel()} tokens); build it with more lines"
            )
        starts = starts.to(ids.device)

        def get_windows() -> tuple[Tensor, Tensor]:
            pick = torch.randint(0, starts.numel(), (batch_size,), generator=generator)
            return windows_at(ids, starts[pick.to(ids.device)], block)

        return get_windows

    def line_tensors(
        self,
        corpus: TokenCorpus,
        prompt_loss: bool = False,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Every line of ``corpus`` as one row, padded with end tokens, as ``layout="lines"``
        batches show them: inputs and targets, (n_lines, max_line_length - 1) each, targets
        -100 after the end token (and on the prompt unless ``prompt_loss``). For a held-out
        loss over a whole corpus, in order."""
        ids = corpus.ids.to(device) if device is not None else corpus.ids
        return self._padded_lines(ids, corpus.line_starts.to(ids.device), prompt_loss)

    def _padded_lines(
        self, ids: Tensor, starts: Tensor, prompt_loss: bool
    ) -> tuple[Tensor, Tensor]:
        """Every line as a row padded with end tokens: inputs and targets (n_lines, L - 1)."""
        width = self.max_line_length
        ends = torch.cat([starts[1:], starts.new_tensor([ids.numel()])])
        lengths = ends - starts
        cols = torch.arange(width, device=ids.device)
        inside = cols[None, :] < lengths[:, None]
        gathered = ids[(starts[:, None] + cols).clamp(max=ids.numel() - 1)]
        rows = torch.where(inside, gathered, torch.full_like(gathered, self.eos_token_id))
        targets = rows[:, 1:].masked_fill(~inside[:, 1:], -100)
        if not prompt_loss:
            targets[:, : self.prompt_length - 1] = -100
        return rows[:, :-1].contiguous(), targets.contiguous()

    def encode_prompts(
        self, problems: Sequence[ArithmeticProblem], device: torch.device | str | None = None
    ) -> Tensor:
        """The prompts of ``problems`` as one (len(problems), prompt_length) int64 tensor."""
        if len(problems) == 0:
            raise ValueError("problems is empty; pass at least one ArithmeticProblem")
        wrong = [
            p for p in problems if (len(p.operands), p.n_digits) != (self.n_operands, self.n_digits)
        ]
        if wrong:
            raise ValueError(
                f"problem {wrong[0]} is not of this task's size "
                f"({self.n_operands} operands of {self.n_digits} digits)"
            )
        ids = self._encode_text("".join(p.prompt for p in problems))
        return ids.view(len(problems), self.prompt_length).to(device)

    def decode_completion(self, ids: Sequence[int] | Tensor) -> str:
        """Text of one generated completion up to and including its first end token (the
        whole text when the model never ended it, which the verifier then rejects)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        try:
            cut = list(ids).index(self.eos_token_id) + 1
        except ValueError:
            cut = len(ids)
        return self.tokenizer.decode(ids[:cut])

    def decode_completions(self, ids: Tensor) -> list[str]:
        """:meth:`decode_completion` for each row of (batch, new_tokens) generated ids."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, new_tokens), got shape {tuple(ids.shape)}")
        return [self.decode_completion(row) for row in ids.tolist()]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: the chance that at least
    one of ``k`` samples drawn without replacement is correct, ``1 - C(n-c, k) / C(n, k)``
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalResult:
    """What :func:`evaluate_accuracy` measured.

    accuracy: fraction of all completions that are right (with ``samples > 1`` this is pass@1).
    worked_fraction: fraction that wrote a closed worked-steps block.
    accuracy_worked / accuracy_direct: accuracy among completions with / without worked steps
    (nan when there are none). mean_length: tokens per completion, end token included.
    pass_at: {k: pass@k} for k = 1, 2, 4, ... up to ``samples``. examples: a few
    (prompt, completion, correct) triples. correct: (n_problems, samples) bool.
    """

    accuracy: float
    worked_fraction: float
    accuracy_worked: float
    accuracy_direct: float
    mean_length: float
    n_problems: int
    samples: int
    pass_at: dict[int, float]
    examples: list[tuple[str, str, bool]]
    correct: Tensor
    seconds: float = 0.0

    def __str__(self) -> str:
        passes = ", ".join(f"pass@{k} {v:.3f}" for k, v in self.pass_at.items() if k > 1)
        return (
            f"accuracy {self.accuracy:.3f} on {self.n_problems} problems x {self.samples}"
            f" (worked steps {self.worked_fraction:.0%}, right when worked "
            f"{self.accuracy_worked:.2f}, when direct {self.accuracy_direct:.2f}; mean "
            f"length {self.mean_length:.1f})" + (f"; {passes}" if passes else "")
        )


@torch.no_grad()
def generate_completions(
    model: CausalLM,
    problems: Sequence[ArithmeticProblem],
    greedy: bool = True,
    temperature: float = 1.0,
    samples: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    task: ArithmeticTask | None = None,
    use_cache: bool = True,
) -> list[str]:
    """Completions (text up to and including the end token) for each problem, ``samples`` per
    problem in order (problem 0's samples first). Prompts go ``batch_size`` rows at a time
    through the KV-cached :func:`~course_utils.generation.generate`, which stops once every row
    has written the end token or after ``max_new_tokens`` (default
    :attr:`ArithmeticTask.default_max_new_tokens`). ``greedy=True`` takes the argmax (then
    ``samples`` must be 1); otherwise tokens are sampled at ``temperature`` with ``generator``,
    which must live on the model's device. ``use_cache=False`` re-runs the prefix each token,
    for models without ``new_caches``."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if greedy and samples != 1:
        raise ValueError(
            f"greedy decoding gives the same completion every time; use "
            f"samples=1 or greedy=False (got samples={samples})"
        )
    if not greedy and temperature <= 0:
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature}; "
            "use greedy=True for argmax decoding"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task = task or ArithmeticTask.for_problems(problems)
    max_new = task.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    prompts = task.encode_prompts(problems, device_of(model)).repeat_interleave(samples, dim=0)
    completions: list[str] = []
    for i in range(0, prompts.shape[0], batch_size):
        chunk = prompts[i : i + batch_size]
        out = generate(
            model,
            chunk,
            max_new,
            temperature=0.0 if greedy else temperature,
            eos_token_id=task.eos_token_id,
            generator=generator,
            use_cache=use_cache,
        )
        completions.extend(task.decode_completions(out[:, chunk.shape[1] :]))
    return completions


@torch.no_grad()
def evaluate_accuracy(
    model: CausalLM,
    problems: Sequence[ArithmeticProblem],
    greedy: bool = True,
    temperature: float = 1.0,
    samples: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    n_examples: int = 4,
    task: ArithmeticTask | None = None,
    use_cache: bool = True,
) -> EvalResult:
    """Generate completions for ``problems`` and score them with the rule-based verifier.

    ``greedy=True`` decodes with argmax (one completion per problem); ``greedy=False`` samples
    ``samples`` completions per problem at ``temperature`` (see :func:`generate_completions`
    for batching and stopping).
    """
    start = time.perf_counter()
    completions = generate_completions(
        model,
        problems,
        greedy,
        temperature,
        samples,
        max_new_tokens,
        batch_size,
        generator,
        task,
        use_cache,
    )
    expanded = [p for p in problems for _ in range(samples)]
    right = [check_completion(p, c) for p, c in zip(expanded, completions, strict=True)]
    worked = [uses_worked_steps(c) for c in completions]
    correct = torch.tensor(right, dtype=torch.bool).view(len(problems), samples)

    def rate(flags: list[bool], where: list[bool]) -> float:
        chosen = [f for f, w in zip(flags, where, strict=True) if w]
        return sum(chosen) / len(chosen) if chosen else float("nan")

    counts = correct.sum(1).tolist()
    ks = [k for k in (2**j for j in range(16)) if k <= samples]
    pass_at = {k: sum(pass_at_k(samples, c, k) for c in counts) / len(counts) for k in ks}
    examples = [
        (expanded[i].prompt, completions[i], right[i])
        for i in range(0, len(completions), samples)[:n_examples]
    ]
    return EvalResult(
        accuracy=sum(right) / len(right),
        worked_fraction=sum(worked) / len(worked),
        accuracy_worked=rate(right, worked),
        accuracy_direct=rate(right, [not w for w in worked]),
        mean_length=sum(len(c) for c in completions) / len(completions),
        n_problems=len(problems),
        samples=samples,
        pass_at=pass_at,
        examples=examples,
        correct=correct,
        seconds=time.perf_counter() - start,
    )


@dataclass
class TaskRun:
    """One :func:`train_on_task` run: the trained ``model`` (in eval mode), its per-step
    ``losses``, held-out greedy ``accuracy`` measured after each step in ``steps``, and the
    training ``seconds`` (evaluations excluded)."""

    model: nn.Module
    losses: list[float]
    steps: list[int]
    accuracy: list[float]
    seconds: float

    @property
    def final_accuracy(self) -> float:
        """Greedy accuracy of the trained model on the held-out problems."""
        return self.accuracy[-1]


def train_on_task(
    build_model: Callable[[], nn.Module],
    task: ArithmeticTask,
    corpus: TokenCorpus,
    held_out: Sequence[ArithmeticProblem],
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    eval_every: int | None = None,
    lr: float = 3e-3,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "training",
) -> TaskRun:
    """Train a fresh model on the task's answers and score it on held-out sums.

    ``seed`` seeds everything (:func:`course_utils.runtime.seed_everything`) before
    ``build_model()`` makes the model, and seeds the batch sampler, so two arms built by
    different ``build_model`` with one seed see identical batches. Batches are padded lines
    with the completion's loss only (``lm_batches(prompt_loss=False)``): the prompt's operand
    digits are random and nothing can predict them. Greedy accuracy on ``held_out`` is
    measured every ``eval_every`` steps (None: once, at the end) without touching the
    training's random streams. The loop is :func:`course_utils.train.train_language_model`.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    every = steps if eval_every is None else eval_every
    if not isinstance(every, int) or not 1 <= every <= steps:
        raise ValueError(
            f"eval_every must be an int in 1..steps={steps} (or None for once at "
            f"the end), got {eval_every!r}"
        )
    seed_everything(seed)
    model = build_model()
    if device is not None:
        model = model.to(device)
    else:
        device = device_of(model)
    batches = task.lm_batches(
        corpus,
        batch_size,
        prompt_loss=False,
        device=device,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    at: list[int] = []
    accuracy: list[float] = []
    eval_seconds = 0.0

    def after_step(m: nn.Module, step: int) -> None:
        nonlocal eval_seconds
        if (step + 1) % every == 0 or step + 1 == steps:
            start = time.perf_counter()
            at.append(step + 1)
            lm = cast(CausalLM, m.eval())  # build_model() makes a causal language model
            accuracy.append(evaluate_accuracy(lm, held_out, task=task).accuracy)
            m.train()
            eval_seconds += time.perf_counter() - start

    result = train_language_model(
        model, batches, steps, lr=lr, after_step=after_step, progress=progress, desc=desc
    )
    model.eval()
    return TaskRun(model, result.losses, at, accuracy, result.seconds - eval_seconds)
