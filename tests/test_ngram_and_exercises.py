from __future__ import annotations

import pytest
import torch

from course_utils import exercises as ex
from course_utils import sampling
from course_utils.ngram import CountLanguageModel


def test_bigram_counts_by_hand():
    lm = CountLanguageModel(vocab_size=3, order=2).fit([0, 1, 0, 2, 0, 1])
    assert torch.allclose(lm.next_token_probs([0]), torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert torch.allclose(lm.next_token_probs([2, 1]), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="add_k"):
        CountLanguageModel(3, 2).fit([0, 1]).next_token_probs([2])  # 2 never seen as context
    smooth = CountLanguageModel(3, 2, add_k=1.0).fit([0, 1])
    assert torch.allclose(smooth.next_token_probs([2]), torch.full((3,), 1 / 3))


def test_unigram_and_bad_arguments():
    lm = CountLanguageModel(4, order=1).fit([3, 3, 1, 0])
    assert torch.allclose(lm.next_token_probs([]), torch.tensor([0.25, 0.25, 0.0, 0.5]))
    with pytest.raises(ValueError, match="order"):
        CountLanguageModel(4, order=0)


# Each checker: right for the right answer, wrong (with a reason) for a typical mistake,
# "not attempted" for None, and never raises on a crashing answer.


def _top_p_without_the_crossing_token(logits, p):
    # the usual mistake: stop before the token whose probability takes the mass past p
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    remove = torch.softmax(sorted_logits, -1).cumsum(-1) > p
    remove[..., 0] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))


def _crash(*args):
    raise RuntimeError("oops")


@pytest.mark.parametrize(
    "checker, right, wrong, reason",
    [
        (
            ex.check_next_token_distribution,
            lambda c: c / c.sum(),
            lambda c: torch.softmax(c, -1),
            "softmax",
        ),
        (
            ex.check_softmax_with_temperature,
            lambda z, t: torch.softmax(z / t, -1),
            lambda z, t: torch.softmax(z * t, -1),
            "multiplied",
        ),
        (
            ex.check_top_k_filter,
            sampling.top_k_filter,
            lambda z, k: sampling.top_k_filter(z, max(1, k - 1)),
            "different set",
        ),
        (
            ex.check_top_p_filter,
            sampling.top_p_filter,
            lambda z, p: _top_p_without_the_crossing_token(z, p),
            "keep the token that crosses",
        ),
    ],
)
def test_function_checkers(checker, right, wrong, reason):
    assert checker(right)
    verdict = checker(wrong)
    assert not verdict and reason in verdict.message, verdict
    assert not checker(None) and not checker(None).attempted
    crashed = checker(_crash)
    assert not crashed and "RuntimeError" in crashed.message


def test_number_checker():
    assert ex.check_mla_cache_ratio(32768 / 576)
    assert "only K" in ex.check_mla_cache_ratio(16384 / 576).message
    assert "k_pe" in ex.check_mla_cache_ratio(32768 / 512).message
    assert str(ex.check_mla_cache_ratio(None)).startswith("… not attempted")
    assert "56.9" not in ex.check_mla_cache_ratio(None).message  # the hint is not the answer
    assert "number" in ex.check_mla_cache_ratio("56.9x").message  # never raises
    assert "finite" in ex.check_mla_cache_ratio(float("nan")).message
