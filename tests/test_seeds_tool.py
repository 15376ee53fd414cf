"""tools/seeds.py: the figures a notebook prints are collected, and the table shows the spread
over seeds, with failures named."""

from __future__ import annotations

import nbformat
import pytest
from seeds import figures_of, write_table


def _notebook(tmp_path, text, tags=("figures",)):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(...)")
    cell.metadata["tags"] = list(tags)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    nb.cells = [cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    return path


def test_figures_are_read_from_the_tagged_cell(tmp_path):
    path = _notebook(tmp_path, 'noise\nFIGURES {"acc": 0.93, "gain": 0.5}\n')
    assert figures_of(path) == {"acc": 0.93, "gain": 0.5}
    with pytest.raises(ValueError, match="no cell tagged 'figures'"):
        figures_of(_notebook(tmp_path, 'FIGURES {"acc": 1}\n', tags=("other",)))


def test_the_table_shows_each_seed_and_the_spread(tmp_path):
    runs = {
        0: {"21_x": {"acc": 0.9, "n": 3}},
        1: {"21_x": {"acc": 0.96, "n": 5}},
        2: {"21_x": {"error": "21_x.ipynb: code cell 9 failed with AssertionError"}},
    }
    text = write_table(runs, tmp_path / "SEEDS.md")
    assert "| acc | 0.900 | 0.960 | - | 0.930 | 0.900 | 0.960 |" in text
    assert "| n | 3 | 5 | - | 4.000 | 3.000 | 5.000 |" in text
    assert "seed 2 FAILED: 21_x.ipynb: code cell 9" in text
    assert (tmp_path / "SEEDS.md").read_text().startswith("# Training claims over seeds")


def test_raw_figures_round_trip_and_merge(tmp_path):
    from seeds import load_runs, save_runs

    path = tmp_path / "SEEDS.json"
    assert load_runs(path) == {}
    save_runs({0: {"21_x": {"acc": 0.9}}, 1: {"21_x": {"acc": 0.8}}}, path)
    runs = load_runs(path)
    runs.setdefault(1, {}).update({"21_x": {"acc": 0.95}})  # a rerun of seed 1 replaces it
    save_runs(runs, path)
    assert load_runs(path) == {0: {"21_x": {"acc": 0.9}}, 1: {"21_x": {"acc": 0.95}}}


def test_the_copy_sets_the_seed_and_the_notebooks_extra_parameters(tmp_path, monkeypatch):
    import seeds

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("seed = 0\ncompare_dense = False")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    source = tmp_path / "21_x.ipynb"
    nbformat.write(nb, source)
    (tmp_path / "out").mkdir()
    monkeypatch.setitem(seeds.EXTRA_PARAMETERS, "21_x", "compare_dense = True")
    copy = seeds._with_seed(source, 3, tmp_path / "out")
    namespace: dict = {}
    exec(nbformat.read(copy, as_version=4).cells[0].source, namespace)
    assert (namespace["seed"], namespace["compare_dense"]) == (3, True)
