"""Execute course notebooks and check their hygiene; used by the tests and by ``make execute``.

Run from the command line to refresh committed outputs in place (``make execute`` does this)::

    python tools/notebook_checks.py execute notebooks/01_journey_of_a_token.ipynb ...
"""

from __future__ import annotations

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
# Papermill and nbclient write these into cell metadata; they change on every run.
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
        problems.append(f"{name}: first code cell must be the Colab set-up cell exactly as "
                        "tools/nbtool.py writes it (python tools/nbtool.py setup-cells)")
    elif (any(_TRANSFORMERS_IMPORT.search(c.source) for c in code)
          and code[0].source.strip() != SETUP_CELL_REFERENCE):
        problems.append(f"{name}: imports transformers, so its Colab set-up cell must install "
                        "course_utils[reference] (tools/nbtool.py header ... --reference)")
    if not any("parameters" in c.metadata.get("tags", []) for c in code):
        problems.append(f"{name}: no code cell is tagged 'parameters'")
    for i, c in enumerate(cells):
        if c.cell_type == "code" and _NOTEBOOK_IMPORT.search(c.source):
            problems.append(f"{name}: cell {i} imports from another notebook; "
                            "import from course_utils instead")
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != KERNEL_NAME:
        problems.append(f"{name}: kernelspec name is {kernel!r}, expected {KERNEL_NAME!r}")
    if require_outputs:
        for i, c in enumerate(code):
            for out in c.get("outputs", []):
                if out.get("output_type") == "error":
                    problems.append(f"{name}: code cell {i} has an error output "
                                    f"({out.get('ename')}: {out.get('evalue')})")
        counts = [c.get("execution_count") for c in code if c.source.strip()]
        if counts != list(range(1, len(counts) + 1)):
            problems.append(f"{name}: code cells were not executed once, in order, from a "
                            f"fresh kernel (execution counts {counts}); run `make execute`")
    return problems


def _describe_failure(path: Path, err: Exception) -> str:
    cell = getattr(err, "exec_count", None)
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    source = ""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    if isinstance(cell, int) and 1 <= cell <= len(code):
        first = code[cell - 1].source.strip().split("\n")[:3]
        source = "\n    " + "\n    ".join(first)
    where = f"code cell {cell}" if cell is not None else "an unknown cell"
    return f"{path.name}: {where} failed with {ename}: {evalue}{source}"


def execute_notebook(path: Path, output: Path, timeout_s: int = 600,
                     cwd: Path | None = None) -> float:
    """Run ``path`` top to bottom in a fresh ``python3`` kernel (this interpreter's), working
    directory ``cwd`` (default: the notebook's folder, ``notebooks/``); write the executed copy
    to ``output``. Returns seconds taken.

    A failing cell raises :class:`NotebookFailed` naming the notebook and the cell; a cell that
    runs longer than ``timeout_s`` fails the same way.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path, output = Path(path), Path(output)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path), str(output), kernel_name=KERNEL_NAME, cwd=str(cwd or path.parent),
            progress_bar=False, execution_timeout=timeout_s, log_output=False,
        )
    except PapermillExecutionError as err:
        raise NotebookFailed(_describe_failure(path, err)) from None
    except Exception as err:  # a timeout or a dead kernel
        raise NotebookFailed(f"{path.name}: {type(err).__name__}: {err}") from None
    return time.perf_counter() - start


def strip_volatile_metadata(path: Path) -> None:
    """Remove papermill's per-run metadata so a re-execution changes only outputs."""
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
        (runtime.get_device().type, runtime.scale()))
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
    for path in paths:
        seconds = execute_notebook(path, path, timeout_s=1800)
        strip_volatile_metadata(path)
        record_timing(path.stem, seconds)
        problems = hygiene_problems(path)
        print(f"{path.name}: executed in {seconds:.1f} s" + ("" if not problems else
              "\n  " + "\n  ".join(problems)), flush=True)
    import course_table  # tools/, beside this file: README's table shows the new timings

    course_table.main()


if __name__ == "__main__":
    main(sys.argv[1:])
