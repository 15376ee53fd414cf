"""Make a CPU machine show the device bugs a GPU machine would hit.

On a CPU-only machine every tensor and every generator lives on the CPU, so a generator made
for the wrong device goes unnoticed: the bug only appears on CUDA, as "generator is on cpu but
the logits are on cuda:0". :func:`install` replaces ``torch.Generator`` with a subclass that
behaves exactly like it but, when made *without naming a device* (``torch.Generator()``, which
is what ``runtime.seed_everything(seed)`` returns), reports its device as ``meta``: a device no
tensor here lives on, standing for "not where the model is". The course's device checks
(``runtime.check_generator``, used by sampling and attention dropout) then fail on the CPU the
way they would on a GPU. Generators made for a named device (``runtime.make_generator(seed,
device)``) report that device, as usual.

Drawing from an unnamed (CPU) generator with ``torch.randn(..., generator=g)`` and moving the
result with ``.to(device)`` is correct on every device, and torch never asks the generator's
Python-side ``device``: the probe leaves it alone.

The notebook tests inject ``import device_probe; device_probe.install()`` after a notebook's
set-up cell.
"""

from __future__ import annotations

import torch

#: What an unnamed generator reports under the probe.
FOREIGN = torch.device("meta")
_REAL = torch.Generator


class ProbeGenerator(_REAL):
    """``torch.Generator`` that reports :data:`FOREIGN` when made without a device."""

    def __new__(cls, device: torch.device | str | None = None) -> ProbeGenerator:
        if device is None:
            obj = super().__new__(cls)
            obj._probe_unnamed = True
        else:
            obj = super().__new__(cls, device)
            obj._probe_unnamed = False
        return obj

    def __init__(self, device: torch.device | str | None = None) -> None:
        pass  # torch.Generator is set up by __new__

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return FOREIGN if self._probe_unnamed else _REAL.device.__get__(self)


def install() -> None:
    """Replace ``torch.Generator`` by :class:`ProbeGenerator` for the rest of the process."""
    torch.Generator = ProbeGenerator  # type: ignore[misc]


def uninstall() -> None:
    torch.Generator = _REAL  # type: ignore[misc]
