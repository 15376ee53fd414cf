"""Every course notebook: hygiene of the committed file, then a full run in a fresh kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
from notebook_checks import execute_notebook, hygiene_problems

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Seconds a notebook may take before the test fails (defaults to DEFAULT_LIMIT_S).
DEFAULT_LIMIT_S = 300
# 09 trains 18 small models (6 attention variants x 3 seeds), 19 six (3 seeds x with and
# without MTP). 21 pretrains the mini-DeepSeek
# (its budget is ten minutes); 22 and 23 load 21's and 22's checkpoints from artifacts/ when the
# run has made them, and retrain them (minutes) when they are missing.
TIME_LIMITS_S: dict[str, int] = {
    "09_grouped_query_attention": 450,
    "19_multi_token_prediction": 450,
    "21_mini_deepseek": 600,
    "22_grpo": 900,
    "23_distillation": 600,
}


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_hygiene(path: Path):
    problems = hygiene_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path):
    limit = TIME_LIMITS_S.get(path.stem, DEFAULT_LIMIT_S)
    seconds = execute_notebook(path, tmp_path / path.name, timeout_s=limit)
    assert seconds < limit, f"{path.name} took {seconds:.0f} s, over its {limit} s limit"
