"""The notebook checks themselves must catch a bad notebook: show it on deliberately bad ones."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbtool import SETUP_CELL, header
from notebook_checks import (
    HarnessError,
    NotebookFailed,
    NotebookTimedOut,
    execute_notebook,
    hygiene_problems,
)

ROOT = Path(__file__).resolve().parents[1]

GOOD_BODY = """
# %% tags=["parameters"]
steps = 3

# %%
total = sum(range(steps))
print(total)
"""


def _from_script(script: str) -> nbformat.NotebookNode:
    """A notebook from a percent script, as ``jupytext --set-kernel python3`` makes it."""
    nb = jupytext.reads(script, fmt="py:percent")
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def _write(tmp_path: Path, name: str, script: str) -> Path:
    path = tmp_path / name
    nbformat.write(_from_script(script), path)
    return path


def _executed(tmp_path: Path, name: str, script: str) -> Path:
    path = _write(tmp_path, name, script)
    execute_notebook(path, path, timeout_s=120)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("good")
    return _executed(tmp, "99_good_example.ipynb", header("99_good_example", "Good") + GOOD_BODY)


def test_a_good_notebook_passes(good: Path):
    assert hygiene_problems(good) == []


def test_missing_parameters_cell_is_caught(tmp_path: Path):
    body = GOOD_BODY.replace(' tags=["parameters"]', "")
    path = _write(tmp_path, "99_no_params.ipynb", header("99_no_params", "No params") + body)
    assert any("parameters" in p for p in hygiene_problems(path, require_outputs=False))


def test_wrong_badge_is_caught(tmp_path: Path):
    # the badge of another notebook, copied over without fixing the path
    path = _write(tmp_path, "99_copied.ipynb", header("99_original", "Copied") + GOOD_BODY)
    assert any("Colab badge" in p for p in hygiene_problems(path, require_outputs=False))


def test_bad_name_and_missing_setup_are_caught(tmp_path: Path):
    script = header("Bad-Name", "Bad").replace(SETUP_CELL, "x = 1") + GOOD_BODY
    path = _write(tmp_path, "Bad-Name.ipynb", script)
    problems = hygiene_problems(path, require_outputs=False)
    assert any("NN_snake_case" in p for p in problems)
    assert any("set-up cell" in p for p in problems)


def test_transformers_without_the_reference_install_is_caught(tmp_path: Path):
    body = GOOD_BODY + "\n# %%\nimport transformers\n"
    path = _write(tmp_path, "99_ref.ipynb", header("99_ref", "Ref") + body)
    assert any("[reference]" in p for p in hygiene_problems(path, require_outputs=False))
    fixed = _write(tmp_path, "99_ref.ipynb", header("99_ref", "Ref", reference=True) + body)
    assert hygiene_problems(fixed, require_outputs=False) == []


def test_import_from_another_notebook_is_caught(tmp_path: Path):
    body = GOOD_BODY + "\n# %%\nfrom notebooks import helper\n"
    path = _write(tmp_path, "99_imports.ipynb", header("99_imports", "Imports") + body)
    assert any("another notebook" in p for p in hygiene_problems(path, require_outputs=False))


def test_unexecuted_and_error_outputs_are_caught(good: Path, tmp_path: Path):
    nb = nbformat.read(good, as_version=4)
    last = nb.cells[-1]
    last.outputs = [
        nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])
    ]
    nb.cells[-2].execution_count = 7  # run out of order
    bad = tmp_path / good.name
    nbformat.write(nb, bad)
    problems = hygiene_problems(bad)
    assert any("error output" in p and "boom" in p for p in problems)
    assert any("not executed once, in order" in p for p in problems)


def test_a_failing_cell_fails_execution_and_names_notebook_and_cell(tmp_path: Path):
    body = GOOD_BODY + '\n# %%\nraise ValueError("deliberate failure")\n'
    path = _write(tmp_path, "99_fails.ipynb", header("99_fails", "Fails") + body)
    with pytest.raises(NotebookFailed) as info:
        execute_notebook(path, tmp_path / "out.ipynb", timeout_s=120)
    message = str(info.value)
    assert "99_fails.ipynb" in message
    assert "code cell 4" in message
    assert "deliberate failure" in message


def test_text_editing_round_trip_keeps_ids_outputs_and_tags(good: Path):
    """What README's editing recipe does: notebook -> percent script -> edit -> ``jupytext
    --update`` back into the notebook, which keeps cell ids, outputs and the parameters tag."""
    from jupytext.combine import combine_inputs_with_outputs

    nb = nbformat.read(good, as_version=4)
    text = jupytext.writes(nb, fmt="py:percent")
    assert '# %% tags=["parameters"]' in text
    edited = jupytext.reads(
        text.replace("print(total)", "print(total, 'edited')"), fmt="py:percent"
    )
    merged = combine_inputs_with_outputs(edited, nb)
    assert [c.id for c in merged.cells] == [c.id for c in nb.cells]
    assert [c.source for c in merged.cells if "edited" not in c.source] == [
        c.source for c in nb.cells if "print(total)" not in c.source
    ]
    params = next(c for c in merged.cells if "parameters" in c.metadata.get("tags", []))
    assert params.source.strip() == "steps = 3"
    unchanged = [c for c in merged.cells if c.cell_type == "code" and "edited" not in c.source]
    assert [c.outputs for c in unchanged] == [
        c.outputs for c in nb.cells if c.cell_type == "code" and "print(total)" not in c.source
    ]


def test_a_stuck_notebook_is_stopped_at_its_budget(tmp_path: Path):
    body = GOOD_BODY + "\n# %%\nimport time\ntime.sleep(600)\n"
    path = _write(tmp_path, "99_stuck.ipynb", header("99_stuck", "Stuck") + body)
    start = time.perf_counter()
    with pytest.raises(NotebookTimedOut, match=r"stopped at its 8 s budget.*code cell 4"):
        execute_notebook(path, tmp_path / "out.ipynb", timeout_s=8)
    assert time.perf_counter() - start < 8 + 20  # the budget, plus starting and stopping a kernel


def test_the_budget_covers_the_whole_notebook_not_each_cell(tmp_path: Path):
    # no cell is slow, but together they run past the budget: a per-cell timeout would pass this
    body = GOOD_BODY + "".join("\n# %%\nimport time\ntime.sleep(2)\n" for _ in range(10))
    path = _write(tmp_path, "99_slow.ipynb", header("99_slow", "Slow") + body)
    with pytest.raises(NotebookTimedOut, match="budget"):
        execute_notebook(path, tmp_path / "out.ipynb", timeout_s=8)


def test_a_harness_fault_is_not_reported_as_a_notebook_failure(good: Path, tmp_path: Path):
    with pytest.raises(HarnessError, match="not an error in the notebook") as info:
        execute_notebook(good, tmp_path / "out.ipynb", timeout_s=60, cwd=tmp_path / "missing")
    assert not isinstance(info.value, NotebookFailed)


def test_make_execute_refuses_a_pattern_that_matches_nothing(tmp_path: Path):
    timings = ROOT / "notebooks" / "timings.json"
    before = timings.read_bytes() if timings.exists() else None
    done = subprocess.run(
        ["make", "-s", "execute", "NB=notebooks/07_kv_cahce*.ipynb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert "no such notebook: notebooks/07_kv_cahce*.ipynb" in done.stderr
    assert "nothing was executed" in done.stderr
    assert (timings.read_bytes() if timings.exists() else None) == before
