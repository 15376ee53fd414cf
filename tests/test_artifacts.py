"""The checkpoint chain's keys and checks: an artifact is reused only when the spec and the code
that built it are this run's, and it is intact."""

from __future__ import annotations

import json

import pytest

from course_utils import artifacts
from course_utils.artifacts import MANIFEST, artifact_path, code_fingerprint, load_or_build


def _writer(calls, text="weights"):
    def build(path):
        calls.append(path)
        (path / "model.bin").write_text(text)

    return build


def _read(path):
    return (path / "model.bin").read_text()


def test_builds_once_then_loads(tmp_path):
    calls = []
    spec = {"steps": 10, "seed": 0}
    assert load_or_build("toy", spec, _writer(calls), _read, tmp_path) == "weights"
    assert load_or_build("toy", spec, _writer(calls), _read, tmp_path) == "weights"
    assert len(calls) == 1
    (path,) = tmp_path.iterdir()  # no temporary directory left behind
    assert path == artifact_path("toy", spec, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["spec"] == spec and manifest["code"] == code_fingerprint()
    assert set(manifest["files"]) == {"model.bin"}


def test_key_covers_the_spec_and_the_code(tmp_path, monkeypatch):
    spec = {"steps": 10}
    base = artifact_path("toy", spec, tmp_path)
    assert artifact_path("toy", {"steps": 11}, tmp_path) != base
    assert artifact_path("other", spec, tmp_path) != base
    monkeypatch.setattr(artifacts, "code_fingerprint", lambda: "edited-code")
    assert artifact_path("toy", spec, tmp_path) != base  # changed training code, new key


def test_the_fingerprint_sees_every_module(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "exercises").mkdir(parents=True)
    (pkg / "train.py").write_text("lr = 1e-3\n")
    (pkg / "exercises" / "check.py").write_text("x = 1\n")
    before = code_fingerprint(pkg)
    (pkg / "exercises" / "check.py").write_text("x = 2\n")  # checkers train nothing
    assert code_fingerprint(pkg) == before
    (pkg / "train.py").write_text("lr = 3e-3\n")
    assert code_fingerprint(pkg) != before


def test_a_corrupt_artifact_is_rebuilt_not_used(tmp_path):
    calls = []
    load_or_build("toy", {"a": 1}, _writer(calls), _read, tmp_path)
    path = artifact_path("toy", {"a": 1}, tmp_path)
    (path / "model.bin").write_text("truncat")
    with pytest.warns(UserWarning, match="corrupt"):
        assert load_or_build("toy", {"a": 1}, _writer(calls, "fresh"), _read, tmp_path) == "fresh"
    assert len(calls) == 2


def test_another_runs_directory_is_refused(tmp_path):
    path = artifact_path("toy", {"a": 1}, tmp_path)
    path.mkdir(parents=True)
    (path / "model.bin").write_text("someone else's")
    with pytest.raises(ValueError, match="no artifact.json"):
        load_or_build("toy", {"a": 1}, _writer([]), _read, tmp_path)
    (path / MANIFEST).write_text(
        json.dumps({"kind": "toy", "spec": {"a": 2}, "code": code_fingerprint(), "files": {}})
    )
    with pytest.raises(ValueError, match="another run's artifact .*spec"):
        load_or_build("toy", {"a": 1}, _writer([]), _read, tmp_path)


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(path):
        (path / "half.bin").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        load_or_build("toy", {"a": 1}, broken, _read, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        artifact_path("bad/kind", {}, tmp_path)
    with pytest.raises(ValueError, match="JSON-able"):
        artifact_path("toy", {"f": object()}, tmp_path)


def test_seed_figures_reads_what_make_seeds_wrote(tmp_path):
    path = tmp_path / "SEEDS.json"
    assert artifacts.load_seed_runs(path) == {}
    path.write_text(
        json.dumps(
            {
                "1": {"nb": {"acc": 0.9}},
                "0": {"nb": {"acc": 0.8}},
                "2": {"nb": {"error": "AssertionError"}, "other": {"x": 1.0}},
            }
        )
    )
    assert artifacts.seed_figures("nb", path) == {0: {"acc": 0.8}, 1: {"acc": 0.9}}
    assert artifacts.load_seed_runs(path)[2]["other"] == {"x": 1.0}
    with pytest.raises(ValueError, match="notebook='missing'.*make seeds"):
        artifacts.seed_figures("missing", path)
