"""The course's own data: deterministic corpora that need no download.

Two corpora, both pure functions of their arguments (same seed, same bytes, on every machine):

- :func:`make_story_corpus`: short English stories from a small grammar about a small world.
  Pronouns refer back to earlier nouns, so attention has something to look at; it is the text
  the byte-level BPE of notebook 01 is trained on.
- :func:`make_arithmetic_corpus`: additions such as ``07+45+13=065`` with a checkable answer.
  A fraction of the lines show worked steps, the column method of paper and pencil:
  ``07+45+13=<7+5+3=15;0+4+1+1=06>065`` adds the units digits (15), then the tens digits plus
  the carry (06), and the answer is read off the columns. The training notebooks report
  accuracy on it and GRPO uses :func:`check_completion` as its rule-based reward. A hash of the
  operands holds out about 5 % of problems as a test set.

Both use Python's ``random.Random``, whose sequence for a given seed is fixed across platforms.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ArithmeticProblem",
    "make_story_corpus",
    "make_arithmetic_corpus",
    "sample_arithmetic_problems",
    "is_held_out",
    "parse_final_answer",
    "check_completion",
    "uses_worked_steps",
    "is_well_formed",
    "steps_correct",
    "random_windows",
    "windows_at",
]

# --------------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------------

_PEOPLE = [
    ("Ada", "she"),
    ("Ben", "he"),
    ("Cleo", "she"),
    ("Dev", "he"),
    ("Esme", "she"),
    ("Finn", "he"),
    ("Hana", "she"),
    ("Ivo", "he"),
    ("Juno", "she"),
    ("Omar", "he"),
]
_ANIMALS = ["cat", "dog", "fox", "owl", "bear", "rabbit", "horse", "duck", "goat", "robin"]
_ADJECTIVES = [
    "small",
    "old",
    "happy",
    "brave",
    "quiet",
    "curious",
    "tired",
    "clever",
    "red",
    "bright",
    "heavy",
    "gentle",
]
_OBJECTS = [
    "ball",
    "book",
    "key",
    "lamp",
    "boat",
    "kite",
    "map",
    "cake",
    "hat",
    "box",
    "letter",
    "shell",
]
_PLACES = [
    "garden",
    "river",
    "forest",
    "kitchen",
    "market",
    "library",
    "hill",
    "harbor",
    "bridge",
    "meadow",
]
_TIMES = [
    "In the morning",
    "At noon",
    "Late that night",
    "One rainy day",
    "After lunch",
    "The next day",
    "When the sun rose",
    "Before dinner",
]
_FEELINGS = ["happy", "surprised", "worried", "proud", "sleepy", "hungry", "curious"]
_VERBS_PAST = ["carried", "painted", "hid", "found", "dropped", "cleaned", "opened", "lost"]


def _story(rng: random.Random) -> str:
    (name, pron), (friend, friend_pron) = rng.sample(_PEOPLE, 2)
    animal = rng.choice(_ANIMALS)
    obj, obj2 = rng.sample(_OBJECTS, 2)
    place, place2 = rng.sample(_PLACES, 2)
    adj, adj2 = rng.sample(_ADJECTIVES, 2)
    count = rng.randint(2, 12)
    sentences = [
        f"{rng.choice(_TIMES)}, {name} {rng.choice(_VERBS_PAST)} a {adj} {obj} near the {place}.",
        f"The {animal} saw the {obj} and followed {name} to the {place2}.",
        f"{name} gave the {obj} to {friend} because {pron} was {rng.choice(_FEELINGS)}.",
        f'{friend} said, "Thank you, {name}. I will keep it in my {obj2}."',
        f"The {animal} was {adj2}, so it slept under the {obj2} until {friend_pron} woke it.",
        f"{friend} counted {count} {animal}s by the {place}, and {friend_pron} laughed.",
        f"Where is the {obj}? It is in the {obj2}, and the {obj2} is by the {place2}.",
        f"{name} and {friend} walked home from the {place2} together.",
    ]
    chosen = [sentences[0]] + rng.sample(sentences[1:], rng.randint(2, 5))
    return " ".join(chosen)


def make_story_corpus(n_stories: int = 2000, seed: int = 0) -> str:
    """``n_stories`` short stories separated by blank lines, as one string.

    A story is 3 to 6 sentences from a fixed grammar (people, animals, objects, places), with
    pronouns that refer back to earlier nouns. 2000 stories are about 0.5 MB of text.
    """
    if not isinstance(n_stories, int) or n_stories <= 0:
        raise ValueError(f"n_stories must be a positive int, got {n_stories!r}")
    rng = random.Random(seed)
    return "\n\n".join(_story(rng) for _ in range(n_stories)) + "\n"


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


def is_held_out(operands: Sequence[int], percent: int = 5) -> bool:
    """True for the ~``percent`` % of problems reserved for testing (a hash of the operands)."""
    key = "+".join(str(int(x)) for x in operands).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 100 < percent


@dataclass(frozen=True)
class ArithmeticProblem:
    """A sum of non-negative operands, zero-padded so every prompt of a size has one length.

    >>> p = ArithmeticProblem((7, 45, 13), n_digits=2)
    >>> p.prompt, p.direct_answer, p.worked_answer
    ('07+45+13=', '065\\n', '<7+5+3=15;0+4+1+1=06>065\\n')
    """

    operands: tuple[int, ...]
    n_digits: int = 2

    @property
    def answer(self) -> int:
        return sum(self.operands)

    @property
    def answer_width(self) -> int:
        """Digits of the largest possible sum, so every answer of this size has one width."""
        return len(str(len(self.operands) * (10**self.n_digits - 1)))

    def _pad(self, value: int) -> str:
        return str(value).zfill(self.answer_width)

    @property
    def prompt(self) -> str:
        return "+".join(str(x).zfill(self.n_digits) for x in self.operands) + "="

    @property
    def direct_answer(self) -> str:
        """The completion that answers at once: the padded sum and a newline."""
        return self._pad(self.answer) + "\n"

    @property
    def worked_steps(self) -> list[str]:
        """The column method, one step a column from the units up: the column's digits plus
        the carry from the column before (none for the units), ``=`` their sum in two digits.
        ``07+45+13`` gives ``["7+5+3=15", "0+4+1+1=06"]``: each step is a sum of a few single
        digits, which a tiny model can learn as a table, where a running sum of two-digit
        numbers (``07+45=052``) needs the carry computed inside one token."""
        digits = [str(x).zfill(self.n_digits) for x in self.operands]
        steps, carry = [], None
        for column in range(self.n_digits - 1, -1, -1):
            terms = [d[column] for d in digits] + ([] if carry is None else [str(carry)])
            total = sum(map(int, terms))
            steps.append("+".join(terms) + f"={total:02d}")
            carry = total // 10
        return steps

    @property
    def worked_answer(self) -> str:
        """The completion with worked steps: ``<`` the column steps ``;``-separated ``>``, then
        the padded answer and a newline. The answer is the last column's sum followed by the
        units digit of each earlier column's sum, read from the steps."""
        return "<" + ";".join(self.worked_steps) + ">" + self._pad(self.answer) + "\n"


def _check_sizes(n_operands: int, n_digits: int) -> None:
    if not isinstance(n_operands, int) or n_operands < 2:
        raise ValueError(f"n_operands must be an int >= 2, got {n_operands!r}")
    if not isinstance(n_digits, int) or not 1 <= n_digits <= 4:
        raise ValueError(f"n_digits must be an int from 1 to 4, got {n_digits!r}")


def sample_arithmetic_problems(
    n: int, seed: int = 0, n_operands: int = 3, n_digits: int = 2, split: str = "train"
) -> list[ArithmeticProblem]:
    """``n`` random problems from one split: ``"train"``, ``"test"`` (the held-out ~5 %) or
    ``"all"``. Difficulty grows with ``n_operands`` and ``n_digits``."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_sizes(n_operands, n_digits)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    rng = random.Random(seed)
    top = 10**n_digits - 1
    problems: list[ArithmeticProblem] = []
    while len(problems) < n:
        ops = tuple(rng.randint(0, top) for _ in range(n_operands))
        held = is_held_out(ops)
        if split == "all" or (split == "test") == held:
            problems.append(ArithmeticProblem(ops, n_digits))
    return problems


def make_arithmetic_corpus(
    n_lines: int = 20000,
    seed: int = 0,
    n_operands: int = 3,
    n_digits: int = 2,
    worked_fraction: float = 0.3,
    split: str = "train",
) -> str:
    """``n_lines`` lines ``prompt + completion``; a ``worked_fraction`` of them show worked steps.

    Every line ends with a newline, the end-of-answer token. Held-out problems never appear in
    the ``"train"`` split.
    """
    if not 0.0 <= worked_fraction <= 1.0:
        raise ValueError(f"worked_fraction must be in [0, 1], got {worked_fraction!r}")
    problems = sample_arithmetic_problems(n_lines, seed, n_operands, n_digits, split)
    rng = random.Random(seed + 1)
    return "".join(
        p.prompt + (p.worked_answer if rng.random() < worked_fraction else p.direct_answer)
        for p in problems
    )


_WORKED = re.compile(r"^<([0-9+=;]*)>")
# [0-9], not \d: Python's \d also matches other scripts' digits
_STEP = r"[0-9]+(?:\+[0-9]+)+=[0-9]+"
_WELL_FORMED = re.compile(rf"<({_STEP}(?:;{_STEP})*)>[0-9]+\n")


def parse_final_answer(completion: str) -> int | None:
    """The final answer of a completion (the text after ``=``), or None when it has none.

    Accepts ``"065\\n"`` and ``"<...>065\\n"``; text after the first newline is ignored. A
    worked block that never closes, a missing or non-digit answer, or an answer that runs to the
    end without a newline (the model never said it had finished) gives None.
    """
    line, newline, _ = completion.partition("\n")
    if not newline:
        return None
    if line.startswith("<"):
        match = _WORKED.match(line)
        if match is None:
            return None
        line = line[match.end() :]
    if not line or not line.isdigit() or not line.isascii():
        return None
    return int(line)


def check_completion(problem: ArithmeticProblem, completion: str) -> bool:
    """True when ``completion`` ends in the right final answer (the rule-based reward)."""
    answer = parse_final_answer(completion)
    return answer is not None and answer == problem.answer


def uses_worked_steps(completion: str) -> bool:
    """True when the completion opens a worked-steps block and closes it."""
    return _WORKED.match(completion.partition("\n")[0]) is not None


def is_well_formed(problem: ArithmeticProblem, completion: str) -> bool:
    """True when the completion is ``<step;step;...>answer`` plus the end token, with one step
    ``d+d+...=s`` per column (``n_digits`` of them), whatever the numbers say."""
    line, newline, _ = completion.partition("\n")
    match = _WELL_FORMED.fullmatch(line + newline)
    return match is not None and len(match.group(1).split(";")) == problem.n_digits


def steps_correct(problem: ArithmeticProblem, completion: str) -> bool:
    """True when the completion shows worked steps and every one of them is the right column
    step (:attr:`ArithmeticProblem.worked_steps`), whatever its final answer says."""
    match = _WORKED.match(completion.partition("\n")[0])
    return match is not None and match.group(1).split(";") == problem.worked_steps


def random_windows(
    ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A language-modelling batch from one long token tensor.

    ids: (n,) int64. Returns inputs and next-token targets, each (batch_size, block_size), from
    ``batch_size`` random windows.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if block_size < 1 or ids.numel() <= block_size:
        raise ValueError(
            f"block_size={block_size} needs more than block_size tokens; ids has {ids.numel()}"
        )
    starts = torch.randint(0, ids.numel() - block_size, (batch_size,), generator=generator)
    return windows_at(ids, starts, block_size)


def windows_at(
    ids: torch.Tensor, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``ids[s : s + block_size]`` and next-token targets ``ids[s + 1 : s + block_size
    + 1]`` for each start ``s``: two (len(starts), block_size) tensors on ``ids``' device. The
    one owner of "windows of a token stream": :func:`random_windows` draws the starts anywhere,
    ``ArithmeticTask.lm_batches`` at line starts."""
    offsets = torch.arange(block_size + 1, device=ids.device)
    windows = ids[starts.to(ids.device)[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]
