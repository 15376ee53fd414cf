"""Run every benchmark module side by side in one process and print its table.

Each ``benchmarks/bench_*.py`` defines ``run(quick: bool) -> list[dict]``; one row is a measured
figure with keys ``what``, ``value``, ``unit`` (and optional ``note``). Ratios come from
measurements taken in this same run, never from numbers measured elsewhere.
Usage: ``python -m benchmarks [--threads N] [--quick] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import time

import torch

import benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("names", nargs="*", help="only these benchmark modules")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# make bench: torch {torch.__version__}, {platform.machine()}, "
        f"threads={torch.get_num_threads()}, device=cpu"
    )
    modules = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )
    if args.names:
        modules = [m for m in modules if m.removeprefix("bench_") in args.names or m in args.names]
    if not modules:
        print("no benchmarks yet")
        return
    for name in modules:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        rows = module.run(quick=args.quick)
        print(f"\n## {name.removeprefix('bench_')}  ({time.perf_counter() - start:.1f} s)")
        width = max(len(r["what"]) for r in rows)
        for r in rows:
            note = f"  {r['note']}" if r.get("note") else ""
            print(f"{r['what']:<{width}}  {r['value']:>12.4g} {r['unit']}{note}")


if __name__ == "__main__":
    main()
