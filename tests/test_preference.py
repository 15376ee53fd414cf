from __future__ import annotations

import math

import pytest
import torch

from course_utils import preference
from course_utils.arithmetic import ArithmeticTask
from course_utils.data import ArithmeticProblem
from course_utils.decoder import DecoderConfig, TinyDecoder

torch.set_num_threads(1)


def _tiny(seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(
        DecoderConfig(
            16,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    ).eval()


def _hand_pairs() -> preference.PreferencePairs:
    p, q = ArithmeticProblem((7, 45, 13)), ArithmeticProblem((1, 2, 3))
    return preference.PreferencePairs(
        [p, q, p],
        [p.worked_answer, q.direct_answer, p.direct_answer],
        ["064\n", "<1+2+3=07;0+0+0+0=00>007\n", "066\n"],
        n_sampled=24,
        n_prompts=3,
    )


def test_pairs_are_right_against_wrong_for_the_same_problem():
    task = ArithmeticTask()
    problems = task.problems(24, seed=0)
    pairs = preference.build_preference_pairs(
        _tiny(),
        problems,
        samples_per_problem=6,
        pairs_per_problem=2,
        verifier=lambda p, c: c.startswith("<"),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(pairs) > 0 and pairs.n_sampled == 24 * 6 and pairs.n_prompts == 24
    for c, r in zip(pairs.chosen, pairs.rejected, strict=True):
        assert c.startswith("<") and not r.startswith("<") and c != r
    per_problem = {}
    for p in pairs.problems:
        per_problem[p] = per_problem.get(p, 0) + 1
    assert max(per_problem.values()) <= 2
    with pytest.raises(ValueError, match="samples_per_problem"):
        preference.build_preference_pairs(_tiny(), problems, samples_per_problem=1)


def test_dpo_tensors_put_chosen_rows_first_and_learn_completions_only():
    pairs = _hand_pairs()
    inputs, targets = preference.dpo_tensors(pairs)
    assert inputs.shape[0] == 6
    task = ArithmeticTask()
    for row, text in zip(range(6), pairs.chosen + pairs.rejected, strict=True):
        learned = [t for t in targets[row].tolist() if t != -100]
        assert task.tokenizer.decode(learned) == text
    with pytest.raises(ValueError, match="no preference pairs"):
        preference.dpo_tensors(preference.PreferencePairs([], [], [], 8, 1))


def test_train_dpo_starts_at_log2_and_prefers_the_chosen_answers():
    pairs = _hand_pairs()
    model = _tiny(seed=3)
    run = preference.train_dpo(
        model, pairs, steps=40, beta=0.5, batch_size=3, lr=3e-3, progress=False, warmup_frac=0.0
    )
    result, stats = run.result, run.stats
    assert len(stats) == 40 and run.optimizer.state  # the optimizer that trained it
    assert math.isclose(result.losses[0], math.log(2), abs_tol=1e-5)  # policy == reference
    assert stats[-1]["accuracy"] == 1.0 and stats[-1]["margin"] > 0
    assert result.losses[-1] < 0.3


def test_train_dpo_refuses_nonsense():
    with pytest.raises(ValueError, match="beta"):
        preference.train_dpo(_tiny(), _hand_pairs(), steps=1, beta=0.0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        preference.train_dpo(_tiny(), _hand_pairs(), steps=1, batch_size=0, progress=False)
