"""README's course table is generated (tools/course_table.py); it must match the notebooks and
timings that are committed."""

from __future__ import annotations

from pathlib import Path

from course_table import render

ROOT = Path(__file__).resolve().parents[1]


def test_readme_course_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert render() in readme, (
        "README's course table is stale: run `python tools/course_table.py` (make execute does it)"
    )
