"""Execute course notebooks and check their hygiene; used by the tests and by ``make execute``.

Run from the command line to refresh committed outputs in place (``make execute`` does this)::

    python tools/notebook_checks.py execute notebooks/01_journey_of_a_token.ipynb ...
"""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nbtool import SETUP_CELL, SETUP_CELL_REFERENCE  # noqa: E402 (tools/, beside this file)

from course_utils.runtime import colab_badge_url  # noqa: E402

NAME_PATTERN = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
# A notebook that compares with transformers must install it on Colab (course_utils[reference]).
_TRANSFORMERS_IMPORT = re.compile(r"^\s*(?:from|import)\s+transformers\b", re.MULTILINE)
KERNEL_NAME = "python3"
# Importing another notebook (or running it) couples episodes; shared code lives in course_utils.
_NOTEBOOK_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+(?:notebooks\b|_?\d\d_\w+)|%run\b|import_ipynb|ipynb\.fs",
    re.MULTILINE,
)
# Papermill (which earlier runs used) and nbclient write these into cell metadata; they change
# on every run.
_VOLATILE_CELL_METADATA = ("papermill", "execution")


class NotebookFailed(AssertionError):
    """A notebook cell raised; the message names the notebook, the cell and the error."""


def hygiene_problems(path: Path, require_outputs: bool = True) -> list[str]:
    """Everything wrong with a committed notebook, as readable lines (empty list: all good).

    Checks: file name ``NN_snake_case.ipynb``; first cell a markdown title with the Colab badge
    of this very path; a set-up cell that handles Colab; a code cell tagged ``parameters``; no
    import from another notebook; kernel ``python3``; and, with ``require_outputs``, that it was
    executed once, top to bottom, from a fresh kernel, with no error output.
    """
    path = Path(path)
    name = path.name
    problems: list[str] = []
    if not NAME_PATTERN.match(name):
        problems.append(f"{name}: file name is not NN_snake_case.ipynb")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:
        return problems + [f"{name}: not a readable notebook ({err})"]
    cells = nb.cells
    if not cells or cells[0].cell_type != "markdown" or not cells[0].source.startswith("# "):
        problems.append(f"{name}: first cell must be a markdown title starting with '# '")
    else:
        badge = colab_badge_url(f"notebooks/{name}")
        if badge not in cells[0].source:
            problems.append(f"{name}: first cell lacks the Colab badge pointing at {badge}")
    code = [c for c in cells if c.cell_type == "code"]
    if not code or code[0].source.strip() not in (SETUP_CELL, SETUP_CELL_REFERENCE):
        problems.append(
            f"{name}: first code cell must be the Colab set-up cell exactly as "
            "tools/nbtool.py writes it (python tools/nbtool.py setup-cells)"
        )
    elif (
        any(_TRANSFORMERS_IMPORT.search(c.source) for c in code)
        and code[0].source.strip() != SETUP_CELL_REFERENCE
    ):
        problems.append(
            f"{name}: imports transformers, so its Colab set-up cell must install "
            "course_utils[reference] (tools/nbtool.py header ... --reference)"
        )
    if not any("parameters" in c.metadata.get("tags", []) for c in code):
        problems.append(f"{name}: no code cell is tagged 'parameters'")
    for i, c in enumerate(cells):
        if c.cell_type == "code" and _NOTEBOOK_IMPORT.search(c.source):
            problems.append(
                f"{name}: cell {i} imports from another notebook; import from course_utils instead"
            )
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != KERNEL_NAME:
        problems.append(f"{name}: kernelspec name is {kernel!r}, expected {KERNEL_NAME!r}")
    if require_outputs:
        for i, c in enumerate(code):
            for out in c.get("outputs", []):
                if out.get("output_type") == "error":
                    problems.append(
                        f"{name}: code cell {i} has an error output "
                        f"({out.get('ename')}: {out.get('evalue')})"
                    )
        counts = [c.get("execution_count") for c in code if c.source.strip()]
        if counts != list(range(1, len(counts) + 1)):
            problems.append(
                f"{name}: code cells were not executed once, in order, from a "
                f"fresh kernel (execution counts {counts}); run `make execute`"
            )
    return problems


class NotebookTimedOut(NotebookFailed):
    """A notebook ran past its budget and was stopped there."""


class HarnessError(RuntimeError):
    """The machinery around a notebook failed (kernel start, I/O), not the notebook's code."""


def _first_lines(source: str | None) -> str:
    if not source:
        return ""
    return "\n    " + "\n    ".join(source.strip().split("\n")[:3])


def execute_notebook(
    path: Path, output: Path, timeout_s: int = 600, cwd: Path | None = None
) -> float:
    """Run ``path`` top to bottom in a fresh ``python3`` kernel (this interpreter's), working
    directory ``cwd`` (default: the notebook's folder, ``notebooks/``); write the executed copy
    to ``output`` (also when it fails, with the outputs so far). Returns seconds taken.

    ``timeout_s`` is the budget of the *whole notebook*, enforced while it runs: each cell may
    use only what the cells before it left, and the kernel is stopped when the budget is spent
    (:class:`NotebookTimedOut`). A cell that raises, or a kernel that dies, raises
    :class:`NotebookFailed` naming the notebook and the cell ("code cell N" counts the
    non-empty code cells from 1, as their execution counts do). Anything else that goes wrong
    is the harness's fault, not the notebook's: :class:`HarnessError`, with the cause chained.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path, output = Path(path), Path(output)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")

    class BudgetClient(NotebookClient):
        """nbclient's runner, with one deadline for all cells instead of one per cell."""

        deadline = 0.0
        number = 0
        cell = None

        async def async_execute_cell(
            self, cell, cell_index, execution_count=None, store_history=True
        ):
            if cell.cell_type == "code" and cell.source.strip():
                self.number, self.cell = self.number + 1, cell
                left = self.deadline - time.perf_counter()
                if left <= 0:
                    raise CellTimeoutError(f"no time left before code cell {self.number}")
                self.timeout = max(1, math.ceil(left))
            return await super().async_execute_cell(
                cell, cell_index, execution_count, store_history
            )

    nb = nbformat.read(path, as_version=4)
    client = BudgetClient(
        nb,
        timeout=timeout_s,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(cwd or path.parent)}},
    )
    start = time.perf_counter()
    client.deadline = start + timeout_s

    def shown() -> str:  # the first lines of the cell that was running
        return _first_lines(getattr(client.cell, "source", None))

    try:
        client.execute()
    except CellTimeoutError:
        spent = time.perf_counter() - start
        raise NotebookTimedOut(
            f"{path.name}: stopped at its {timeout_s} s budget ({spent:.0f} s spent), in code "
            f"cell {client.number}{shown()}"
        ) from None
    except CellExecutionError as err:
        ename, evalue = getattr(err, "ename", "Error"), getattr(err, "evalue", str(err))
        raise NotebookFailed(
            f"{path.name}: code cell {client.number} failed with {ename}: {evalue}{shown()}"
        ) from None
    except DeadKernelError as err:
        raise NotebookFailed(
            f"{path.name}: the kernel died in code cell {client.number} ({err}){shown()}"
        ) from None
    except Exception as err:
        raise HarnessError(
            f"{path.name}: the notebook harness failed ({type(err).__name__}: "
            f"{err}); this is not an error in the notebook"
        ) from err
    finally:
        nbformat.write(nb, output)
    return time.perf_counter() - start


def strip_volatile_metadata(path: Path) -> None:
    """Remove per-run metadata so a re-execution changes only outputs."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in _VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            tags = [t for t in cell.metadata.get("tags", []) if t != "injected-parameters"]
            if tags:
                cell.metadata["tags"] = tags
            else:
                cell.metadata.pop("tags", None)
    nbformat.write(nb, path)


TIMINGS = ROOT / "notebooks" / "timings.json"


def record_timing(name: str, seconds: float) -> None:
    """Store an execution time in notebooks/timings.json (README's table reads it): under "cpu"
    for a CPU run at the default scale, under "cuda" for a CUDA run at the GPU scale. Other runs
    (smoke scale, MPS, a forced scale) are not recorded."""
    import json
    import os
    import platform

    import torch

    from course_utils import runtime

    key = {("cpu", "default"): "cpu", ("cuda", "gpu"): "cuda"}.get(
        (runtime.get_device().type, runtime.scale())
    )
    if key is None:
        return
    data = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    entry = data.setdefault(key, {})
    entry[name] = round(seconds, 1)
    data.setdefault("machines", {})[key] = (
        f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if key == "cuda" else "")
    )
    TIMINGS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "execute":
        sys.exit(__doc__)
    paths = [Path(p) for p in argv[1:]] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file() or p.suffix != ".ipynb"]
    if missing:
        sys.exit(
            f"no such notebook: {' '.join(missing)}; nothing was executed (NB= takes paths "
            "or a pattern such as notebooks/07_*.ipynb)"
        )
    for path in paths:
        seconds = execute_notebook(path, path, timeout_s=1800)
        strip_volatile_metadata(path)
        record_timing(path.stem, seconds)
        problems = hygiene_problems(path)
        print(
            f"{path.name}: executed in {seconds:.1f} s"
            + ("" if not problems else "\n  " + "\n  ".join(problems)),
            flush=True,
        )
    import course_table  # tools/, beside this file: README's table shows the new timings

    course_table.main()


if __name__ == "__main__":
    main(sys.argv[1:])
