from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils import sampling


def test_softmax_matches_torch_and_survives_large_logits():
    x = torch.randn(4, 10) * 30
    assert torch.allclose(sampling.softmax(x), torch.softmax(x, -1), atol=1e-6)
    big = torch.tensor([1000.0, 1000.0])
    assert torch.allclose(sampling.softmax(big), torch.tensor([0.5, 0.5]))


def test_top_k_by_hand():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0])
    out = sampling.top_k_filter(logits, 2)
    assert torch.equal(torch.isinf(out), torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match="top_k"):
        sampling.top_k_filter(logits, 5)


def test_top_p_by_hand():
    # probabilities 0.5, 0.25, 0.125, 0.125
    logits = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25]))
    keep = lambda p: (~torch.isinf(sampling.top_p_filter(logits, p))).tolist()  # noqa: E731
    assert keep(0.5) == [False, True, False, False]
    assert keep(0.6) == [False, True, False, True]
    assert keep(0.75) == [False, True, False, True]
    assert sum(keep(0.8)) == 3  # 0.5 + 0.25 + one of the tied 0.125s reaches 0.8
    assert keep(0.9) == [True, True, True, True]
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_filter(logits, 0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=30), st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(values, p):
    logits = torch.tensor(values)
    kept = ~torch.isinf(sampling.top_p_filter(logits, p))
    probs = torch.softmax(logits, -1)
    assert probs[kept].max() == probs.max()  # a most likely token always stays
    assert probs[kept].sum() >= p - 1e-5  # enough mass
    # dropping the least likely kept token would fall below p (smallest set)
    if kept.sum() > 1:
        assert probs[kept].sum() - probs[kept].min() < p + 1e-5


def test_greedy_and_reproducible_sampling():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert sampling.sample_next_token(logits, temperature=0).tolist() == [1, 0]
    draw = lambda: sampling.sample_next_token(  # noqa: E731
        logits, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(draw(), draw())
    # top_k=1 makes sampling greedy whatever the temperature
    for _ in range(5):
        assert sampling.sample_next_token(logits, temperature=5.0, top_k=1).tolist() == [1, 0]
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample_next_token(logits, temperature=-1.0)


def test_sampling_frequencies_follow_the_probabilities():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(20000, 3)
    ids = sampling.sample_next_token(logits, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)
