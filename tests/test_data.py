from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from course_utils import data
from course_utils.data import ArithmeticProblem


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_same_seed_same_bytes_and_seeds_differ():
    assert data.make_story_corpus(50, seed=1) == data.make_story_corpus(50, seed=1)
    assert data.make_story_corpus(50, seed=1) != data.make_story_corpus(50, seed=2)
    assert data.make_arithmetic_corpus(100, seed=3) == data.make_arithmetic_corpus(100, seed=3)


def test_corpora_are_stable_across_machines():
    # Golden hashes: a change here means every learner's data changed. Update only on purpose.
    assert _sha(data.make_story_corpus(200, seed=0)) == GOLDEN["story"]
    assert _sha(data.make_arithmetic_corpus(500, seed=0)) == GOLDEN["arithmetic"]


GOLDEN = {"story": "d2b8ae088db908fb", "arithmetic": "32be68c737ecc8fd"}


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_sizes_must_be_positive(bad):
    with pytest.raises(ValueError, match="n_stories"):
        data.make_story_corpus(bad)
    with pytest.raises(ValueError, match="n must be"):
        data.make_arithmetic_corpus(bad)


def test_bad_difficulty_and_split():
    with pytest.raises(ValueError, match="n_operands"):
        data.make_arithmetic_corpus(10, n_operands=1)
    with pytest.raises(ValueError, match="n_digits"):
        data.make_arithmetic_corpus(10, n_digits=0)
    with pytest.raises(ValueError, match="split"):
        data.sample_arithmetic_problems(10, split="valid")
    with pytest.raises(ValueError, match="worked_fraction"):
        data.make_arithmetic_corpus(10, worked_fraction=1.5)


def test_problem_formats():
    p = ArithmeticProblem((7, 45, 13))
    assert p.prompt == "07+45+13="
    assert p.direct_answer == "065\n"
    assert p.worked_steps == ["7+5+3=15", "0+4+1+1=06"]  # units, then tens plus the carry
    assert p.worked_answer == "<7+5+3=15;0+4+1+1=06>065\n"
    assert ArithmeticProblem((3, 4), n_digits=1).worked_answer == "<3+4=07>07\n"
    assert ArithmeticProblem((99, 99, 99)).worked_answer == "<9+9+9=27;9+9+9+2=29>297\n"
    assert ArithmeticProblem((1234, 5678), 4).worked_answer == (
        "<4+8=12;3+7+1=11;2+6+1=09;1+5+0=06>06912\n"
    )


@given(st.lists(st.integers(0, 9999), min_size=2, max_size=9), st.integers(1, 4))
def test_column_steps_add_up_to_the_answer(ops, n_digits):
    p = ArithmeticProblem(tuple(x % 10**n_digits for x in ops), n_digits)
    sums = [int(step.partition("=")[2]) for step in p.worked_steps]
    # the answer is the last column's sum, then each earlier column's units digit
    read_off = int(str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1])))
    assert read_off == p.answer
    assert data.is_well_formed(p, p.worked_answer) and data.steps_correct(p, p.worked_answer)
    assert not data.steps_correct(p, p.direct_answer)


def test_step_correctness_is_judged_apart_from_the_answer():
    p = ArithmeticProblem((7, 45, 13))
    assert data.steps_correct(p, "<7+5+3=15;0+4+1+1=06>064\n")  # right steps, wrong answer
    assert not data.steps_correct(p, "<7+5+3=19;0+4+1+1=06>065\n")  # a wrong step
    assert not data.steps_correct(p, "<7+5+3=15>065\n")  # a missing step


def test_worked_fraction_and_lengths():
    lines = data.make_arithmetic_corpus(4000, seed=0, worked_fraction=0.3).splitlines()
    worked = sum("<" in line for line in lines) / len(lines)
    assert 0.27 < worked < 0.33
    direct = [ln for ln in lines if "<" not in ln]
    assert len({len(ln) for ln in direct}) == 1  # zero padding: one length


def test_held_out_split_is_disjoint_and_about_five_percent():
    test = data.sample_arithmetic_problems(300, seed=0, split="test")
    train = data.sample_arithmetic_problems(3000, seed=0, split="train")
    assert all(data.is_held_out(p.operands) for p in test)
    assert not any(data.is_held_out(p.operands) for p in train)
    every = data.sample_arithmetic_problems(20000, seed=5, split="all")
    share = sum(data.is_held_out(p.operands) for p in every) / len(every)
    assert 0.04 < share < 0.06


@given(st.lists(st.integers(0, 99), min_size=2, max_size=4))
def test_verifier_accepts_both_formats_of_the_right_answer(ops):
    p = ArithmeticProblem(tuple(ops))
    assert data.check_completion(p, p.direct_answer)
    assert data.check_completion(p, p.worked_answer)
    assert data.uses_worked_steps(p.worked_answer) and not data.uses_worked_steps(p.direct_answer)
    wrong = str(p.answer + 1).zfill(p.answer_width) + "\n"
    assert not data.check_completion(p, wrong)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("065\n", 65),
        ("065\n12+", 65),  # text after the end token is ignored
        ("<7+5+3=15;0+4+1+1=06>065\n", 65),
        ("065", None),  # never finished
        ("<7+5+3=15;0+4+1+1=06065\n", None),  # worked block never closed
        ("<07+45=05x>065\n", None),  # junk inside the block
        ("<>065\n", 65),
        ("\n", None),  # empty answer
        ("6 5\n", None),
        ("-65\n", None),
        ("٦٥\n", None),  # non-ASCII digits
        ("", None),
    ],
)
def test_parse_final_answer_edge_cases(completion, expected):
    assert data.parse_final_answer(completion) == expected


def test_random_windows():
    ids = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    x, y = data.random_windows(ids, 4, 8, g)
    assert x.shape == (4, 8) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="block_size"):
        data.random_windows(ids[:5], 2, 8)


def test_windows_at_gives_inputs_and_shifted_targets():
    from course_utils.data import random_windows, windows_at

    ids = torch.arange(100)
    x, y = windows_at(ids, torch.tensor([0, 10, 90]), 8)
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(x[1], torch.arange(10, 18)) and torch.equal(y[1], torch.arange(11, 19))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_windows(ids, 4, 8, g1)
    starts = torch.randint(0, 100 - 8, (4,), generator=g2)
    assert torch.equal(a, ids[starts[:, None] + torch.arange(8)])
    assert torch.equal(b, a + 1)
