"""The notebooks' shared first cells, and how to edit a notebook as text.

The committed ``.ipynb`` is the source of truth. To edit one as text, use jupytext's percent
format (``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell written as ``# text``,
``# %% tags=["parameters"]`` tags a cell)::

    jupytext --to py:percent notebooks/01_journey_of_a_token.ipynb -o scratch/01.py
    ... edit scratch/01.py ...
    jupytext --update --to ipynb scratch/01.py -o notebooks/01_journey_of_a_token.ipynb
    make execute NB=notebooks/01_journey_of_a_token.ipynb

``--update`` keeps the notebook's outputs and cell ids, so the diff shows only what changed.
A new notebook: ``python tools/nbtool.py header NN_name "Title" [--reference]`` prints the
title, badge and set-up cells every notebook starts with (``--reference``: a notebook that imports
transformers) as a percent script; write the rest below it, then
``jupytext --to ipynb --set-kernel python3 scratch/NN.py -o notebooks/NN_name.ipynb``.
``python tools/nbtool.py setup-cells [notebooks...]`` rewrites existing notebooks' set-up cells
to the current one (after a change here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from course_utils.runtime import BRANCH, REPO, colab_badge_url  # noqa: E402

SETUP_CELL = f'''# Set-up on Colab: fetch the course, install course_utils (Colab's torch is kept).
# COURSE_REPO (a git URL), COURSE_REF (a branch or tag) and COURSE_DIR override the defaults.
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess
    import tempfile
    from importlib.metadata import version

    repo = os.environ.get("COURSE_REPO", "https://github.com/{REPO}")
    ref = os.environ.get("COURSE_REF", "{BRANCH}")
    where = os.environ.get("COURSE_DIR", "/content/course")

    def step(command, what, fix):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{{what}} failed:\\n{{done.stderr.strip()[-2000:]}}\\n{{fix}}")

    if not os.path.isdir(where):
        step(["git", "clone", "-q", "--depth", "1", "--branch", ref, repo, where],
             f"git clone of {{repo}} (ref {{ref}})",
             "Check the address and the ref, or point COURSE_REPO / COURSE_REF at a copy you "
             "can reach (os.environ['COURSE_REPO'] = 'https://github.com/<you>/<fork>'), then "
             "run this cell again.")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={{version('torch')}}\\n")  # a constraint: pip never replaces torch
    step([sys.executable, "-m", "pip", "install", "-q", "-c", pin.name, "-e", where],
         f"pip install -e {{where}}",
         f"Delete {{where}} (or set COURSE_DIR) and run this cell again; if it fails again, "
         "Runtime > Disconnect and delete runtime, then start over.")
    sys.path.insert(0, where)'''
# The same, for a notebook that compares with Hugging Face transformers (the reference extra).
SETUP_CELL_REFERENCE = SETUP_CELL.replace('"-e", where]', '"-e", where + "[reference]"]').replace(
    "install course_utils (", "install course_utils and transformers ("
)
assert SETUP_CELL_REFERENCE != SETUP_CELL


def header(name: str, title: str, reference: bool = False) -> str:
    """The first cells of notebook ``name`` (e.g. ``01_journey_of_a_token``) as a script.
    ``reference=True``: its Colab set-up also installs transformers
    (``course_utils[reference]``)."""
    url = colab_badge_url(f"notebooks/{name}.ipynb")
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
    setup = SETUP_CELL_REFERENCE if reference else SETUP_CELL
    return f"# %% [markdown]\n# # {title}\n#\n# {badge}\n\n# %%\n{setup}\n"


def refresh_setup_cells(paths: list[Path]) -> list[str]:
    """Make the first code cell of each notebook the current set-up cell (the reference variant
    where the old one installed the reference extra); outputs and cell ids are kept. Returns the
    names of the notebooks that changed."""
    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code")
        wanted = SETUP_CELL_REFERENCE if "[reference]" in cell.source else SETUP_CELL
        if cell.source != wanted:
            cell.source = wanted
            nbformat.write(nb, path)
            changed.append(path.name)
    return changed


def main(argv: list[str]) -> None:
    if len(argv) in (3, 4) and argv[0] == "header" and argv[3:] in ([], ["--reference"]):
        print(header(argv[1], argv[2], reference=argv[3:] == ["--reference"]))
    elif argv and argv[0] == "setup-cells":
        root = Path(__file__).resolve().parents[1]
        paths = [Path(p) for p in argv[1:]] or sorted(root.glob("notebooks/[0-9][0-9]_*.ipynb"))
        for name in refresh_setup_cells(paths):
            print("set-up cell refreshed:", name)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
