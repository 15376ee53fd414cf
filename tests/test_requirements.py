"""The ``[test]`` extra is enough for ``make test``: every third-party module that the package,
the tests, the tools, the benchmarks and the notebooks import comes from a distribution that
``pyproject.toml`` declares (as a dependency, in the ``test`` extra, or as what one of those
requires), and the notebooks' kernel (ipykernel) is declared too."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import nbformat
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the 3.11 CI job runs this

ROOT = Path(__file__).resolve().parents[1]
LOCAL_DIRS = ("tests", "tools", "benchmarks")
# Imported only where present, and their absence is handled: not required by `make test`.
OPTIONAL = {"triton": "GPU kernels; tests skip without it (CPU torch wheels ship none)"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return {_norm(_NAME.match(s).group(0)) for s in specs}


def _with_requirements(names: set[str]) -> set[str]:
    """``names`` and, transitively, what they require (markers and extras ignored)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_norm(_NAME.match(r).group(0)) for r in requires if "extra ==" not in r]
    return seen


def _sources() -> list[tuple[str, str]]:
    files = [p for d in ("course_utils", *LOCAL_DIRS) for p in (ROOT / d).rglob("*.py")]
    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in files]
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                code = "\n".join(
                    "pass" if ln.lstrip().startswith(("%", "!")) else ln
                    for ln in cell.source.split("\n")
                )
                out.append((f"{nb_path.name} cell {i}", code))
    return out


def _imported_modules() -> dict[str, str]:
    local = {p.stem for d in LOCAL_DIRS for p in (ROOT / d).rglob("*.py")} | {
        p.name for d in LOCAL_DIRS for p in (ROOT / d).iterdir() if p.is_dir()
    }
    found: dict[str, str] = {}
    for where, code in _sources():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if (
                    top in sys.stdlib_module_names
                    or top in local
                    or top in OPTIONAL
                    or top in ("course_utils", *LOCAL_DIRS)
                ):
                    continue
                found.setdefault(top, where)
    return found


def test_every_imported_module_comes_from_a_declared_distribution():
    allowed = _with_requirements(_declared())
    owners = md.packages_distributions()
    missing = []
    for module, where in sorted(_imported_modules().items()):
        dists = {_norm(d) for d in owners.get(module, [])}
        if not dists & allowed:
            missing.append(f"{module} (imported in {where}; from {sorted(dists) or 'nowhere'})")
    assert not missing, "not in pyproject's dependencies or [test] extra:\n" + "\n".join(missing)


def test_the_notebook_kernel_is_declared():
    assert "ipykernel" in _declared()
