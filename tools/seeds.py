"""Run the training notebooks for several seeds and tabulate what they assert (``make seeds``).

Float results differ between CPUs, so a seeded run follows another trajectory on another
machine: a claim about a training outcome must hold over seeds, not for one. This tool executes
each training notebook top to bottom with ``seed`` set in its parameters cell, for every seed
asked (default 0-4), two notebooks at a time with one thread each. Every notebook's asserts run,
so a seed that breaks a claim fails here, and the tool exits non-zero after writing the table.

Each training notebook ends its measurements with a cell tagged ``figures`` that prints one
line ``FIGURES {json}``: the numbers its asserts and its prose rely on. This tool collects them
into ``notebooks/SEEDS.md`` (committed, linked from README): per figure, the value of each seed
and the mean, min and max. The raw figures go to ``notebooks/SEEDS.json``; a run for some seeds
or notebooks replaces those and keeps the rest.

    python tools/seeds.py                      # notebooks 08, 09, 18, 19, 21, 22, 23, seeds 0-4
    python tools/seeds.py --seeds 0 1 --notebooks 21_mini_deepseek
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_checks import NotebookFailed, execute_notebook  # noqa: E402

from course_utils.artifacts import SEEDS_FILE, load_seed_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TABLE = NOTEBOOKS / "SEEDS.md"
#: The raw figures behind the table; a later run updates the (seed, notebook) pairs it ran.
RAW = SEEDS_FILE
#: Notebooks whose claims rest on training, in the order a seed runs them (22 loads 21's model).
DEFAULT_NOTEBOOKS = (
    "08_multi_query_attention",
    "09_grouped_query_attention",
    "18_balancing_the_experts",
    "19_multi_token_prediction",
    "21_mini_deepseek",
    "22_grpo",
    "23_distillation",
)
FIGURES_PREFIX = "FIGURES "
#: Parameters set besides ``seed``: the comparisons a notebook skips by default to stay fast.
EXTRA_PARAMETERS: dict[str, str] = {"21_mini_deepseek": "compare_dense = True"}


def figures_of(executed: Path) -> dict[str, float]:
    """The ``FIGURES {json}`` line printed by the cell tagged ``figures`` of an executed
    notebook."""
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if "figures" not in cell.metadata.get("tags", []):
            continue
        for out in cell.get("outputs", []):
            for line in out.get("text", "").splitlines():
                if line.startswith(FIGURES_PREFIX):
                    return json.loads(line[len(FIGURES_PREFIX) :])
    raise ValueError(f"{executed.name} has no cell tagged 'figures' printing {FIGURES_PREFIX!r}")


def _with_seed(source: Path, seed: int, folder: Path) -> Path:
    """A copy of the notebook whose parameters cell ends with ``seed = <seed>`` (and the
    notebook's :data:`EXTRA_PARAMETERS`)."""
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += f"\nseed = {seed}  # set by tools/seeds.py"
    if source.stem in EXTRA_PARAMETERS:
        cell.source += f"\n{EXTRA_PARAMETERS[source.stem]}  # set by tools/seeds.py"
    path = folder / f"{source.stem}-seed{seed}.ipynb"
    nbformat.write(nb, path)
    return path


def run_seed(seed: int, notebooks: list[str], keep: Path) -> dict[str, dict]:
    """Execute ``notebooks`` in order for one seed (working directory ``notebooks/``, the copies
    outside it); {notebook: {figure: value} or error}. Executed copies are kept in ``keep``."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in notebooks:
            copy = _with_seed(NOTEBOOKS / f"{name}.ipynb", seed, Path(tmp))
            executed = keep / copy.name
            start = time.perf_counter()
            try:
                execute_notebook(copy, executed, timeout_s=1800, cwd=NOTEBOOKS)
                results[name] = figures_of(executed)
                results[name]["seconds"] = round(time.perf_counter() - start, 1)
                status = "ok"
            except NotebookFailed as err:
                results[name] = {"error": str(err)}
                status = f"FAILED: {err}"
            print(f"seed {seed} {name}: {status}", flush=True)
    return results


def write_table(runs: dict[int, dict[str, dict]], path: Path = TABLE) -> str:
    seeds = sorted(runs)
    lines = [
        "# Training claims over seeds",
        "",
        "Written by `make seeds` (`tools/seeds.py`): each training notebook executed top to "
        "bottom at the default scale with `seed` set in its parameters cell, one CPU thread "
        "per notebook. Every assert of the notebook ran; the figures are what its cell "
        "tagged `figures` printed. A notebook's asserts hold for every seed listed here "
        "unless a row says FAILED.",
        "",
    ]
    names = sorted({n for r in runs.values() for n in r})
    for name in names:
        lines += [f"## {name}", ""]
        header = "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min | max |"
        lines += [header, "|---" * (len(seeds) + 4) + "|"]
        keys: list[str] = []
        for s in seeds:
            for k in runs[s].get(name, {}):
                if k not in keys and k != "error":
                    keys.append(k)
        for k in keys:
            values = [runs[s].get(name, {}).get(k) for s in seeds]
            shown = [v for v in values if isinstance(v, (int, float))]
            cells = [
                f"{v:.3f}" if isinstance(v, float) else str(v) if v is not None else "-"
                for v in values
            ]
            stats = (
                [f"{statistics.mean(shown):.3f}", f"{min(shown):.3f}", f"{max(shown):.3f}"]
                if shown
                else ["-", "-", "-"]
            )
            lines.append(f"| {k} | " + " | ".join(cells + stats) + " |")
        errors = [(s, runs[s][name]["error"]) for s in seeds if "error" in runs[s].get(name, {})]
        for s, err in errors:
            lines.append(f"\nseed {s} FAILED: {err}")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--notebooks", nargs="+", default=list(DEFAULT_NOTEBOOKS))
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once (one thread each)")
    args = parser.parse_args(argv)
    for name in args.notebooks:
        if not (NOTEBOOKS / f"{name}.ipynb").exists():
            parser.error(f"no notebook notebooks/{name}.ipynb")
    os.environ["COURSE_THREADS"] = "1"  # the kernels inherit it: no contention between jobs
    os.environ.setdefault("COURSE_SCALE", "default")
    artifacts = Path(os.environ.setdefault("COURSE_ARTIFACTS", str(ROOT / "artifacts" / "seeds")))
    keep = artifacts / "executed"  # the executed copies, to read what a failing seed printed
    keep.mkdir(parents=True, exist_ok=True)
    runs = load_runs()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_seed, s, args.notebooks, keep): s for s in args.seeds}
        for future in as_completed(futures):
            runs.setdefault(futures[future], {}).update(future.result())
            save_runs(runs)
            write_table(runs)  # after every seed: a stopped run keeps what it measured
    print(write_table(runs))
    failed = [(s, n) for s, r in runs.items() for n, v in r.items() if "error" in v]
    return 1 if failed else 0


def load_runs(path: Path = RAW) -> dict[int, dict[str, dict]]:
    """{seed: {notebook: figures}} from an earlier run, or {} when there is none."""
    return load_seed_runs(path)


def save_runs(runs: dict[int, dict[str, dict]], path: Path = RAW) -> None:
    path.write_text(
        json.dumps({str(s): runs[s] for s in sorted(runs)}, indent=1, sort_keys=True) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
