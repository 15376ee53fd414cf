"""Shared test set-up: one torch thread, the tools/ folder importable, notebook timings."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# Tiny models on a shared 2-core machine run fastest, and most repeatably, on one thread.
torch.set_num_threads(1)

_NOTEBOOK_SECONDS: dict[str, tuple[float, str]] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" and "test_notebook_executes[" in report.nodeid:
        name = report.nodeid.split("[", 1)[1].rstrip("]")
        _NOTEBOOK_SECONDS[name] = (report.duration, report.outcome)


def pytest_terminal_summary(terminalreporter):
    if not _NOTEBOOK_SECONDS:
        return
    tr = terminalreporter
    tr.section("notebook timings")
    width = max(len(n) for n in _NOTEBOOK_SECONDS)
    for name, (seconds, outcome) in sorted(_NOTEBOOK_SECONDS.items()):
        tr.write_line(f"{name:<{width}}  {seconds:7.1f} s  {outcome}")
    total = sum(s for s, _ in _NOTEBOOK_SECONDS.values())
    tr.write_line(f"{'total':<{width}}  {total:7.1f} s")
