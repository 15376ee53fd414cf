from __future__ import annotations

import math

import pytest
import torch

from course_utils.data import random_windows
from course_utils.decoder import DecoderConfig, TinyDecoder
from course_utils.train import (
    Trainer,
    evaluate_language_model,
    lr_schedule,
    make_optimizer,
    param_groups,
    train_language_model,
)


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
    model = TinyDecoder(
        DecoderConfig(
            vocab_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    )
    calls = []
    result = train_language_model(
        model,
        lambda: random_windows(ids, 16, 12, g),
        steps=60,
        lr=1e-2,
        after_step=lambda m, s: calls.append(s),
        extra_loss=lambda m: torch.zeros(()),
        progress=False,
    )
    assert calls == list(range(60))
    assert result.losses[-1] < 0.2 < math.log(8) - 0.5 < result.losses[0]
    loss, acc = evaluate_language_model(model, lambda: random_windows(ids, 16, 12, g), 3)
    assert acc > 0.95 and loss < 0.2


def _tiny(seed=0):
    torch.manual_seed(seed)
    return TinyDecoder(
        DecoderConfig(
            vocab_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    )


def test_one_parameter_group_rule():
    model = _tiny()
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name  # norms' gains never decay
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        make_optimizer(model, 1e-3)


def test_trainer_resumes_bit_identically(tmp_path):
    ids = torch.arange(8).repeat(40)

    def batches():
        return random_windows(ids, 4, 8)  # the global RNG: saved and restored with the state

    torch.manual_seed(1)
    straight = Trainer(_tiny(), batches, steps=8)
    straight.train(progress=False)
    torch.manual_seed(1)
    first = Trainer(_tiny(), batches, steps=8)
    first.train(5, progress=False)
    first.save(tmp_path / "state", extra={"note": "mine"})
    torch.manual_seed(99)
    second = Trainer(_tiny(seed=3), batches, steps=8)
    assert second.resume(tmp_path / "state") == {"note": "mine"}
    assert second.step == 5
    second.train(progress=False)
    assert second.result.losses == straight.result.losses
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps=9"):
        Trainer(_tiny(), batches, steps=9).resume(tmp_path / "state")


def test_hooks_run_in_order_and_the_schedule_spans_the_budget():
    ids = torch.arange(8).repeat(40)
    seen = []
    trainer = Trainer(
        _tiny(),
        lambda: random_windows(ids, 4, 8),
        steps=6,
        lr=1e-2,
        hooks={"after_step": lambda m, step, loss: seen.append((step, loss))},
    )
    trainer.train(2, progress=False)
    trainer.train(progress=False)
    assert [s for s, _ in seen] == list(range(6))
    assert [loss for _, loss in seen] == trainer.result.losses
    assert trainer.result.lrs == [lr_schedule(s, 6, 1e-2) for s in range(6)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"steps": -3}, "steps must be a positive int"),
        ({"steps": 5, "hooks": {"after_stpe": print}}, r"unknown hook name\(s\) \['after_stpe'\]"),
        ({"steps": 5, "hooks": {"extra_loss": 3}}, "must be callable"),
        ({"steps": 5, "lr": 0.0}, "lr must be > 0"),
        ({"steps": 5, "grad_clip": 0.0}, "grad_clip"),
        ({"steps": 5, "warmup_frac": 1.0}, "warmup_frac"),
    ],
)
def test_trainer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_tiny(), lambda: None, **kwargs)


def test_trainer_rejects_more_steps_than_the_budget():
    ids = torch.arange(8).repeat(40)
    trainer = Trainer(_tiny(), lambda: random_windows(ids, 4, 8), steps=3)
    with pytest.raises(ValueError, match=r"n_steps must be an int in \[0, 3\]"):
        trainer.train(4, progress=False)
