"""Where and how a notebook runs: device choice, seeding, Colab detection, threads, smoke scale.

Every notebook starts with the same three lines::

    from course_utils import runtime
    device = runtime.get_device()      # COURSE_DEVICE overrides; else cuda, then mps, then cpu
    runtime.seed_everything(0)

Environment variables (all optional):

- ``COURSE_DEVICE``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Asking for a device that is not
  there is an error, never a silent fallback: the CUDA CI job relies on that.
- ``COURSE_SMOKE``: ``1`` runs every cell at a smaller scale (fewer steps, smaller models) so the
  full test suite fits CI's budget. Notebooks choose their sizes with :func:`scaled`.
- ``COURSE_SCALE``: ``default`` or ``gpu`` forces the scale :func:`scaled` picks; unset, it is
  ``gpu`` on a CUDA device and ``default`` elsewhere (``COURSE_SMOKE=1`` wins over both).
- ``COURSE_THREADS``: torch's intra-op thread count (see :func:`set_threads`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

#: GitHub ``owner/name`` of the course; badges and the Colab set-up cell are built from it.
REPO = "deepseek-from-scratch/deepseek-from-scratch"
#: The branch the Colab badges open.
BRANCH = "main"

_DEVICE_KINDS = ("cpu", "cuda", "mps")
T = TypeVar("T")


def colab_badge_url(notebook_path: str) -> str:
    """The "Open in Colab" URL of a notebook, e.g. ``notebooks/00_course_overview.ipynb``."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{notebook_path}"


def in_colab() -> bool:
    """True when running inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def _parse_device(name: str) -> torch.device:
    name = name.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in _DEVICE_KINDS or (index and not index.isdigit()):
        raise ValueError(
            f"COURSE_DEVICE={name!r} is not a device name; use one of "
            "'cpu', 'cuda', 'cuda:N' or 'mps', or unset it to pick automatically"
        )
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def get_device(name: str | None = None) -> torch.device:
    """The device the course runs on.

    ``name`` (or else the ``COURSE_DEVICE`` environment variable) picks it explicitly; without
    either, CUDA is used when present, then Apple's MPS, then the CPU. An explicit device that
    this machine lacks raises ``RuntimeError``; a name that is no device raises ``ValueError``.
    """
    requested = name if name is not None else os.environ.get("COURSE_DEVICE", "")
    if requested.strip():
        device = _parse_device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"COURSE_DEVICE asks for {device} but torch sees no CUDA device; "
                "unset COURSE_DEVICE to run on the CPU"
            )
        if device.type == "cuda" and device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"COURSE_DEVICE asks for {device} but only {torch.cuda.device_count()} "
                    "CUDA device(s) exist"
                )
        if device.type == "mps" and not _mps_available():
            raise RuntimeError("COURSE_DEVICE asks for mps but torch sees no MPS device")
        if device.type == "cuda":
            _prepare_cuda_determinism()
        return device
    if torch.cuda.is_available():
        _prepare_cuda_determinism()
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _prepare_cuda_determinism() -> None:
    """cuBLAS is deterministic only with a fixed workspace, chosen by an environment variable
    read when its first handle is made, so it must be set before any CUDA matmul (see
    :func:`deterministic`). A value already set by the user is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextlib.contextmanager
def deterministic(device: torch.device | str) -> Iterator[None]:
    """Inside the block, ask torch for deterministic kernels on ``device`` when it is a GPU.

    On a CPU the course's ops are deterministic already, and nothing changes (results stay
    bit-identical to a run without the block). On CUDA some ops add in whatever order threads
    finish, ``index_add_`` in the MoE combine among them, so two identical runs can differ in the
    last bits; ``torch.use_deterministic_algorithms`` switches them to fixed-order kernels. An op
    with no deterministic kernel only warns (``warn_only``): code that compares two runs must
    still allow a tolerance off the CPU (notebook 21's resume check does).
    """
    if torch.device(device).type == "cpu":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _check_seed(seed: object) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def device_of(model: object) -> torch.device:
    """The device of ``model``'s first parameter; the CPU for a model without parameters (or
    an object that is no module, such as the n-gram models)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return torch.device("cpu")
    try:
        return next(iter(parameters())).device
    except StopIteration:
        return torch.device("cpu")


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` as tensors on it report theirs: an accelerator named without an index gets
    the index torch would use (``"cuda"`` -> ``cuda:0`` on a one-GPU machine, ``"mps"`` ->
    ``mps:0``); the CPU stays ``cpu``.

    ``torch.device("cuda") != torch.device("cuda:0")`` although both name the same GPU, which
    is why device checks in the course compare canonical devices (:func:`same_device`).
    """
    device = torch.device(device)
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    if device.type == "cuda":
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    return torch.device(device.type, 0)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """True when ``a`` and ``b`` name the same device (``"cuda"`` and ``"cuda:0"`` do, on a
    machine whose current GPU is 0)."""
    return canonical_device(a) == canonical_device(b)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (index made explicit, :func:`canonical_device`),
    seeded with ``seed``: the generator to hand to code that draws random numbers *on* that
    device, such as sampling from a model's logits.

    The course's rule: draw on the device the tensors live on, so a model on ``cuda:0`` samples
    with ``make_generator(seed, device)``, never with a CPU generator. (Drawing on the CPU and
    moving the result, as ``torch.randn(..., generator=cpu_gen).to(device)`` does, is fine too:
    it gives the same numbers on every device.)
    """
    _check_seed(seed)
    return torch.Generator(device=canonical_device(device)).manual_seed(seed)


def check_generator(
    generator: torch.Generator | None, device: torch.device | str, what: str = "the tensors"
) -> None:
    """Raise ``ValueError`` when ``generator`` (if given) is not on ``device``, the device of
    ``what``. Torch's own message for this mismatch is obscure; this one names the fix."""
    if generator is not None and not same_device(generator.device, device):
        raise ValueError(
            f"generator is on {generator.device} but {what} are on {canonical_device(device)}; "
            f"make it with course_utils.runtime.make_generator(seed, device) for the device "
            "the tensors live on"
        )


def seed_everything(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """Seed Python's, NumPy's and torch's generators (CPU and all GPUs) with ``seed``.

    Returns a fresh ``torch.Generator`` seeded the same way, for code that wants its own stream
    of random numbers: on ``device`` when given (:func:`make_generator`; what sampling from a
    model on that device needs), else on the CPU (for ``torch.randn(..., generator=g)``, whose
    numbers are then the same on every device once moved with ``.to(device)``).
    """
    _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if device is not None:
        return make_generator(seed, device)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    ``n`` defaults to ``COURSE_THREADS`` when set, else to torch's own choice. Tiny models on a
    shared 2-core machine run fastest with one thread (less contention); benchmarks state theirs.
    """
    if n is None:
        env = os.environ.get("COURSE_THREADS", "").strip()
        if not env:
            return torch.get_num_threads()
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"COURSE_THREADS={env!r} must be a positive integer")
        n = int(env)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def is_smoke() -> bool:
    """True when ``COURSE_SMOKE`` asks for the small CI scale."""
    value = os.environ.get("COURSE_SMOKE", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"COURSE_SMOKE={value!r} must be 1 or 0")


SCALES = ("smoke", "default", "gpu")
_NOT_GIVEN: object = object()


def scale() -> str:
    """The scale notebooks run at, one of :data:`SCALES`: ``"smoke"`` under ``COURSE_SMOKE=1``;
    else ``COURSE_SCALE`` when set (``"default"`` or ``"gpu"``); else ``"gpu"`` when
    :func:`get_device` is a CUDA device and ``"default"`` elsewhere (a laptop CPU, MPS)."""
    if is_smoke():
        return "smoke"
    value = os.environ.get("COURSE_SCALE", "").strip().lower()
    if value:
        if value not in ("default", "gpu"):
            raise ValueError(
                f"COURSE_SCALE={value!r} must be 'default' or 'gpu' (use "
                "COURSE_SMOKE=1 for the smoke scale)"
            )
        return value
    return "gpu" if get_device().type == "cuda" else "default"


def scaled(default: T, smoke: T, gpu: T = _NOT_GIVEN) -> T:  # type: ignore[assignment]
    """The notebook-sized knob: ``default`` on a CPU, ``smoke`` under ``COURSE_SMOKE=1``, and
    ``gpu`` (when given; else ``default``) at the GPU scale (see :func:`scale`).

    Use it in a parameters cell: ``steps = scaled(300, smoke=30, gpu=3000)``. Smoke runs every
    cell at a smaller size; they never skip a cell. The GPU scale is sized for a Colab T4.
    """
    current = scale()
    if current == "smoke":
        return smoke
    if current == "gpu" and gpu is not _NOT_GIVEN:
        return gpu
    return default


def describe() -> dict[str, str]:
    """What this environment is, as a dict of short strings (the notebooks' environment check)."""
    device = get_device()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "threads": str(torch.get_num_threads()),
        "colab": str(in_colab()),
        "smoke scale": str(is_smoke()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} (compute capability {props.major}.{props.minor})"
        info["bf16 native"] = str(supports_bf16(device))
    return info


def supports_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls are native: CUDA compute capability 8.0+ (not a T4), or CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu"
