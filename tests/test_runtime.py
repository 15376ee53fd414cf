from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from course_utils import runtime


def test_cpu_and_auto_device(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.delenv("COURSE_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert runtime.get_device().type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", "cpu:0:1"])
def test_unknown_device_name_is_a_value_error(monkeypatch, name):
    monkeypatch.setenv("COURSE_DEVICE", name)
    with pytest.raises(ValueError, match="COURSE_DEVICE"):
        runtime.get_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_cuda_fails_loudly(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.get_device()


def test_seed_everything_repeats_all_generators():
    def draw():
        g = runtime.seed_everything(123)
        return (
            random.random(),
            np.random.rand(),
            torch.rand(1).item(),
            torch.rand(1, generator=g).item(),
        )

    assert draw() == draw()
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(-1)


def test_smoke_switch(monkeypatch):
    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    assert runtime.scaled(300, smoke=30) == 300
    monkeypatch.setenv("COURSE_SMOKE", "1")
    assert runtime.scaled(300, smoke=30) == 30
    monkeypatch.setenv("COURSE_SMOKE", "maybe")
    with pytest.raises(ValueError, match="COURSE_SMOKE"):
        runtime.is_smoke()


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1
        monkeypatch.setenv("COURSE_THREADS", "zero")
        with pytest.raises(ValueError, match="COURSE_THREADS"):
            runtime.set_threads()
    finally:
        torch.set_num_threads(before)


def test_badge_url_points_at_the_notebook():
    url = runtime.colab_badge_url("notebooks/00_course_overview.ipynb")
    assert url.endswith(f"{runtime.REPO}/blob/main/notebooks/00_course_overview.ipynb")


def test_scale_picks_gpu_values_on_cuda_or_when_asked(monkeypatch):
    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    monkeypatch.setenv("COURSE_SCALE", "gpu")
    assert runtime.scale() == "gpu"
    assert runtime.scaled(300, smoke=30, gpu=3000) == 3000
    assert runtime.scaled(300, smoke=30) == 300  # no GPU value: the default
    monkeypatch.setenv("COURSE_SMOKE", "1")  # smoke wins over everything
    assert runtime.scaled(300, smoke=30, gpu=3000) == 30
    monkeypatch.delenv("COURSE_SMOKE")
    monkeypatch.setenv("COURSE_SCALE", "default")
    assert runtime.scaled(300, smoke=30, gpu=3000) == 300
    monkeypatch.delenv("COURSE_SCALE")
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.scale() == "default" and runtime.scaled(300, smoke=30, gpu=3000) == 300


def test_scale_follows_the_device(monkeypatch):
    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    monkeypatch.delenv("COURSE_SCALE", raising=False)
    monkeypatch.setattr(runtime, "get_device", lambda name=None: torch.device("cuda"))
    assert runtime.scale() == "gpu"
    monkeypatch.setattr(runtime, "get_device", lambda name=None: torch.device("mps"))
    assert runtime.scale() == "default"


def test_bad_scale_names_the_variable(monkeypatch):
    monkeypatch.delenv("COURSE_SMOKE", raising=False)
    monkeypatch.setenv("COURSE_SCALE", "huge")
    with pytest.raises(ValueError, match="COURSE_SCALE"):
        runtime.scale()
