from __future__ import annotations

import math

import pytest
import torch

from course_utils.data import random_windows
from course_utils.decoder import DecoderConfig, TinyDecoder
from course_utils.train import evaluate_language_model, lr_schedule, train_language_model


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_schedule(s, 100, 1.0, warmup_frac=0.1, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)  # the last step reaches the floor
    assert lrs[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_training_learns_a_repeating_sequence_and_hooks_run():
    torch.manual_seed(0)
    ids = torch.arange(8).repeat(50)  # 0 1 2 ... 7 0 1 2 ...: perfectly predictable
    g = torch.Generator().manual_seed(0)
    model = TinyDecoder(DecoderConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16))
    calls = []
    result = train_language_model(model, lambda: random_windows(ids, 16, 12, g), steps=60,
                                  lr=1e-2, after_step=lambda m, s: calls.append(s),
                                  extra_loss=lambda m: torch.zeros(()), progress=False)
    assert calls == list(range(60))
    assert result.losses[-1] < 0.2 < math.log(8) - 0.5 < result.losses[0]
    loss, acc = evaluate_language_model(model, lambda: random_windows(ids, 16, 12, g), 3)
    assert acc > 0.95 and loss < 0.2
