"""Device-correct randomness: generators are made for the device the tensors live on.

On CUDA, sampling from a model with a CPU generator fails ("generator is on cpu but the logits
are on cuda:0"), and ``torch.Generator(device="cuda")`` reports ``cuda`` while the logits report
``cuda:0``. A CPU machine sees neither, so these tests make it see them: unit tests of the
helpers in ``runtime``, and every notebook run at the smoke scale under ``device_probe``, which
makes a generator made without naming its device report a device no tensor is on (the way a
CPU generator looks next to a model on a GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import device_probe
import nbformat
import pytest
import torch
from notebook_checks import NotebookFailed, execute_notebook

from course_utils import runtime
from course_utils.attention import scaled_dot_product_attention
from course_utils.sampling import sample_next_token

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture
def probe():
    device_probe.install()
    yield
    device_probe.uninstall()


@pytest.fixture
def one_gpu(monkeypatch):
    """torch says a CUDA GPU is present, with GPU 0 current (no CUDA call is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_canonical_device_gives_the_index_tensors_report(one_gpu):
    assert runtime.canonical_device("cuda") == torch.device("cuda:0")
    assert runtime.canonical_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    assert runtime.canonical_device("cpu") == torch.device("cpu")
    assert runtime.canonical_device("mps") == torch.device("mps:0")


def test_same_device_compares_what_matters(one_gpu):
    assert torch.device("cuda") != torch.device("cuda:0")  # why the helper exists
    assert runtime.same_device("cuda", "cuda:0")
    assert runtime.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not runtime.same_device("cuda", "cuda:1")
    assert not runtime.same_device("cpu", "cuda:0")


def test_make_generator_names_the_indexed_device(one_gpu, monkeypatch):
    made = []

    class Recorder:
        def __init__(self, device):
            made.append(torch.device(device))

        def manual_seed(self, seed):
            return self

    monkeypatch.setattr(torch, "Generator", Recorder)
    runtime.make_generator(3, torch.device("cuda"))
    assert made == [torch.device("cuda:0")]


def test_make_generator_streams_equal_a_seeded_torch_generator():
    a = runtime.make_generator(7, "cpu")
    b = torch.Generator().manual_seed(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    c = runtime.seed_everything(7, "cpu")
    assert torch.equal(
        torch.rand(5, generator=c), torch.rand(5, generator=torch.Generator().manual_seed(7))
    )


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_make_generator_refuses_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        runtime.make_generator(seed, "cpu")


def test_check_generator_names_the_fix():
    runtime.check_generator(None, "cpu")
    runtime.check_generator(torch.Generator(), "cpu")
    with pytest.raises(ValueError, match=r"make_generator\(seed, device\)"):
        runtime.check_generator(torch.Generator(), "meta", "the logits")


def test_the_probe_makes_an_unnamed_generator_look_foreign(probe):
    assert runtime.seed_everything(0).device == device_probe.FOREIGN
    assert runtime.seed_everything(0, "cpu").device == torch.device("cpu")
    assert runtime.make_generator(0, "cpu").device == torch.device("cpu")
    g = torch.Generator().manual_seed(0)  # drawing on the CPU and moving is fine everywhere
    assert torch.equal(
        torch.randn(3, generator=g),
        torch.randn(3, generator=torch.Generator(device="cpu").manual_seed(0)),
    )


def test_sampling_refuses_a_generator_from_another_device(probe):
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="the logits"):
        sample_next_token(logits, generator=runtime.seed_everything(0))
    ids = sample_next_token(logits, generator=runtime.make_generator(0, logits.device))
    again = sample_next_token(logits, generator=torch.Generator(device="cpu").manual_seed(0))
    assert torch.equal(ids, again)


def test_attention_dropout_refuses_a_generator_from_another_device(probe):
    q = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="attention weights"):
        scaled_dot_product_attention(q, q, q, dropout_p=0.5, generator=runtime.seed_everything(0))
    scaled_dot_product_attention(q, q, q, dropout_p=0.5, generator=runtime.make_generator(0, "cpu"))


def _with_probe(path: Path, out: Path) -> Path:
    """A copy of notebook ``path`` that installs the probe right after its set-up cell."""
    nb = nbformat.read(path, as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    probe_cell = nbformat.v4.new_code_cell(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import device_probe\ndevice_probe.install()"
    )
    nb.cells.insert(first_code + 1, probe_cell)
    nbformat.write(nb, out)
    return out


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_makes_generators_for_its_device(path: Path, tmp_path: Path, monkeypatch):
    """The notebook, at the smoke scale, with a generator made without naming its device
    looking as foreign as a CPU generator looks next to a model on a GPU."""
    monkeypatch.setenv("COURSE_SMOKE", "1")
    monkeypatch.delenv("COURSE_SCALE", raising=False)
    probed = _with_probe(path, tmp_path / path.name)
    try:
        execute_notebook(probed, tmp_path / f"out_{path.name}", timeout_s=300, cwd=path.parent)
    except NotebookFailed as err:
        pytest.fail(
            f"{err}\n(run under tests/device_probe.py: a generator handed to code "
            "that draws on the model's device must come from "
            "runtime.make_generator(seed, device))"
        )
    assert os.environ["COURSE_SMOKE"] == "1"


def test_deterministic_changes_nothing_on_a_cpu_and_restores_the_flags():
    assert not torch.are_deterministic_algorithms_enabled()
    with runtime.deterministic("cpu"):
        assert not torch.are_deterministic_algorithms_enabled()
    with runtime.deterministic(torch.device("cuda", 0)):  # a GPU: fixed-order kernels, warn only
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_get_device_prepares_cublas_determinism(one_gpu, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    assert runtime.get_device() == torch.device("cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice is kept
    runtime.get_device()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
