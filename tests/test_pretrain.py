"""The pretraining run of notebook 21: bit-identical resume, the cached checkpoint of
load_or_pretrain, and argument checks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from course_utils.pretrain import (
    PretrainConfig,
    Pretrainer,
    checkpoint_path,
    load_or_pretrain,
    save_pretrained,
)

SMALL = PretrainConfig(
    overrides=(("num_hidden_layers", 2),),
    steps=6,
    batch_size=8,
    n_train_lines=300,
    eval_every=3,
    n_eval_problems=8,
)


def test_resumed_run_equals_the_straight_run(tmp_path):
    straight = Pretrainer(SMALL)
    straight.train(progress=False)
    first = Pretrainer(SMALL)
    first.train(3, progress=False)
    first.save(tmp_path / "half")
    torch.manual_seed(123)  # the resume must restore the RNG, whatever happened since
    second = Pretrainer.resume(tmp_path / "half")
    assert second.step == 3
    second.train(progress=False)
    for (name, a), b in zip(
        straight.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert second.history.loss == straight.history.loss
    assert second.history.eval_steps == [3, 6]


def test_history_records_loads_and_evaluations():
    run = Pretrainer(SMALL)
    run.train(progress=False)
    loads = run.loads_tensor()
    assert loads.shape == (6, 1, run.model.config.n_routed_experts)  # 1 dense + 1 MoE layer
    torch.testing.assert_close(loads.sum(-1), torch.ones(6, 1))
    assert len(run.history.accuracy) == 2 and all(0 <= a <= 1 for a in run.history.accuracy)
    with pytest.raises(ValueError, match="n_steps"):
        run.train(1)


def test_load_or_pretrain_trains_once_then_loads(tmp_path):
    model = load_or_pretrain(SMALL, root=tmp_path, progress=False)
    (saved,) = tmp_path.iterdir()
    assert saved == checkpoint_path(SMALL, tmp_path) and saved.name.startswith("mini_deepseek-")
    again = load_or_pretrain(SMALL, root=tmp_path, progress=False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_save_pretrained_is_what_load_or_pretrain_loads(tmp_path):
    run = Pretrainer(SMALL)
    run.train(2, progress=False)
    path = save_pretrained(run.model, SMALL, root=tmp_path)
    assert path == checkpoint_path(SMALL, tmp_path)
    assert json.loads((path / "artifact.json").read_text())["spec"] == SMALL.spec()
    loaded = load_or_pretrain(SMALL, root=tmp_path, progress=False)  # loads, trains nothing
    for (name, a), b in zip(
        run.model.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_configs_differ_by_key_and_validate():
    assert checkpoint_path(SMALL) != checkpoint_path(dataclasses.replace(SMALL, steps=7))
    dense = Pretrainer(dataclasses.replace(SMALL, dense=True))
    assert not dense.model.moe_layers() and dense.balancer is None
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="worked_fraction"):
        PretrainConfig(worked_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size=128 is larger than the data"):
        PretrainConfig(n_train_lines=10)
    with pytest.raises(ValueError, match="mtp_depth"):
        PretrainConfig(mtp_depth=-1)


def test_the_run_trains_mtp_with_its_lambda():
    run = Pretrainer(SMALL)
    assert len(run.model.mtp) == SMALL.mtp_depth == 1
    run.train(progress=False)
    assert len(run.history.mtp_loss) == SMALL.steps and all(
        len(d) == 1 for d in run.history.mtp_loss
    )
    # the loss the trainer minimises is the main loss plus lambda times the recorded depth loss
    heavy = Pretrainer(dataclasses.replace(SMALL, mtp_lambda=0.9))
    x, y = heavy.trainer.get_batch()
    main, total = heavy.trainer.hooks["compute_loss"](heavy.model, x, y)
    depth = heavy.history.mtp_loss[-1][0]
    assert depth > 0 and total.item() == pytest.approx(main.item() + 0.9 * depth, rel=1e-5)
    no_mtp = Pretrainer(dataclasses.replace(SMALL, mtp_depth=0))
    assert len(no_mtp.model.mtp) == 0 and "compute_loss" not in no_mtp.trainer.hooks


def test_course_config_follows_the_scale(monkeypatch):
    from course_utils.pretrain import course_config

    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    monkeypatch.setenv("COURSE_SCALE", "default")
    assert course_config() == PretrainConfig()
    monkeypatch.setenv("COURSE_SMOKE", "1")
    assert course_config().steps < PretrainConfig().steps
    assert course_config(seed=3).seed == 3


def test_the_gpu_scale_run_trains(monkeypatch):
    """The GPU-scale config (a bigger preset, more steps) is a different, working run; two of
    its steps on the CPU show that it builds and learns with the same code."""
    from course_utils.pretrain import course_config

    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    monkeypatch.setenv("COURSE_SCALE", "gpu")
    config = course_config()
    assert config.preset == "gpu" and config.steps > PretrainConfig().steps
    assert checkpoint_path(config) != checkpoint_path(PretrainConfig())
    run = Pretrainer(dataclasses.replace(config, steps=2, eval_every=2, n_eval_problems=2), "cpu")
    trunk = run.model.num_parameters()  # the MTP module is not counted
    assert 13_000_000 < trunk < 15_000_000  # 'gpu': about 14M (README), plus the MTP module
    run.train(progress=False)
    assert len(run.history.loss) == 2 and all(math.isfinite(v) for v in run.history.loss)
