"""Trained models that a later notebook loads: where they live, what names them, how they are
checked before use.

Notebook 21 pretrains the mini-DeepSeek, notebook 22 tunes it with GRPO, notebook 23 distils
from that. Each later notebook loads the earlier one's model when it was saved, or trains it.
A saved model may only be reused when it is exactly what the code would train now, so an
artifact's directory name is a hash of

- its **spec**: every setting of the run (a JSON-able dict, e.g. ``PretrainConfig`` as a dict);
- the **code fingerprint** (:func:`code_fingerprint`): a hash of the source of every module of
  ``course_utils``, so editing the data generator, the model or the training loop makes a new
  key, and the stale model is never picked up.

Each directory holds ``artifact.json``: kind, spec, fingerprint and a SHA-256 of every file.
:func:`load_or_build` verifies it before loading: a file that changed (a corrupt or truncated
write) makes it rebuild; a directory that belongs to another run, or that holds files without a
manifest, is refused with a ``ValueError``. A build writes into a temporary directory that is
renamed into place only when complete, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "MANIFEST",
    "SEEDS_FILE",
    "artifact_path",
    "artifacts_dir",
    "code_fingerprint",
    "load_or_build",
    "load_seed_runs",
    "seed_figures",
    "verify_artifact",
]

T = TypeVar("T")

#: The file that describes a finished artifact.
MANIFEST = "artifact.json"

_PACKAGE = Path(__file__).resolve().parent

#: What ``make seeds`` (``tools/seeds.py``) measured: ``{seed: {notebook: {figure: value}}}``,
#: committed next to the notebooks with its table ``SEEDS.md``.
SEEDS_FILE = _PACKAGE.parent / "notebooks" / "SEEDS.json"


def artifacts_dir() -> Path:
    """Where trained models are kept: ``$COURSE_ARTIFACTS`` if set, else ``artifacts/`` in the
    course checkout (git-ignored), else ``./artifacts``."""
    env = os.environ.get("COURSE_ARTIFACTS", "").strip()
    if env:
        return Path(env)
    repo = _PACKAGE.parent
    return repo / "artifacts" if (repo / "notebooks").is_dir() else Path.cwd() / "artifacts"


def code_fingerprint(package_dir: str | Path | None = None) -> str:
    """A 12-hex-digit hash of the source of every ``.py`` module of ``course_utils`` (path and
    bytes, in sorted order), the exercise checkers excepted (they train nothing). Any edit to
    the code that generates data, builds or trains a model changes it."""
    root = Path(package_dir) if package_dir is not None else _PACKAGE
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("exercises/"):
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _canonical(spec: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(spec), sort_keys=True))
    except TypeError as err:
        raise ValueError(
            f"spec must be JSON-able (numbers, strings, lists, dicts): {err}"
        ) from None


def _check_kind(kind: str) -> None:
    if not kind or not kind.replace("_", "").isalnum():
        raise ValueError(f"kind must be a non-empty name of letters, digits and '_', got {kind!r}")


def artifact_path(kind: str, spec: Mapping[str, Any], root: str | Path | None = None) -> Path:
    """``root/<kind>-<key>``, the key a hash of ``spec`` and :func:`code_fingerprint` (``root``
    defaults to :func:`artifacts_dir`)."""
    _check_kind(kind)
    text = json.dumps({"spec": _canonical(spec), "code": code_fingerprint()}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Path(root if root is not None else artifacts_dir()) / f"{kind}-{key}"


def _file_hashes(path: Path) -> dict[str, str]:
    return {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def verify_artifact(path: str | Path, kind: str, spec: Mapping[str, Any]) -> bool:
    """True when ``path`` is a finished artifact of this ``kind``, ``spec`` and code, with every
    file intact; False when it is absent or corrupt (a file changed, went missing or was
    added). Raises ``ValueError`` when the directory belongs to something else: files without
    a manifest, or a manifest for another kind, spec or code."""
    path = Path(path)
    if not path.exists():
        return False
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ValueError(
            f"{path} holds files but no {MANIFEST}: it was not written by "
            "load_or_build; delete it (or choose another root) to train here"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        return False
    want = {"kind": kind, "spec": _canonical(spec), "code": code_fingerprint()}
    have = {k: manifest.get(k) for k in want}
    if have != want:
        diff = sorted(k for k in want if have[k] != want[k])
        raise ValueError(
            f"{path} holds another run's artifact (its {', '.join(diff)} differ "
            "from this run's); delete it, or pass another root"
        )
    return manifest.get("files") == _file_hashes(path)


def load_or_build(
    kind: str,
    spec: Mapping[str, Any],
    build: Callable[[Path], object],
    load: Callable[[Path], T],
    root: str | Path | None = None,
) -> T:
    """``load(path)`` of the artifact ``kind`` made from ``spec`` by the current code, building
    it first with ``build(path)`` when it is absent or corrupt.

    ``build`` writes its files into the directory it is given (which exists and is empty;
    what it returns is ignored); the manifest is added after it returns and the directory is
    then renamed into place.
    """
    path = artifact_path(kind, spec, root)
    if path.exists() and not verify_artifact(path, kind, spec):
        warnings.warn(
            f"{path} is corrupt (a file changed since it was saved); rebuilding it", stacklevel=2
        )
        shutil.rmtree(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            manifest = {
                "kind": kind,
                "spec": _canonical(spec),
                "code": code_fingerprint(),
                "files": _file_hashes(tmp),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load(path)


def load_seed_runs(path: str | Path = SEEDS_FILE) -> dict[int, dict[str, dict[str, Any]]]:
    """``{seed: {notebook: {figure: value}}}`` as ``make seeds`` wrote it, or ``{}`` when the
    file does not exist yet. A notebook that failed for a seed holds ``{"error": message}``."""
    path = Path(path)
    if not path.exists():
        return {}
    return {int(seed): runs for seed, runs in json.loads(path.read_text()).items()}


def seed_figures(notebook: str, path: str | Path = SEEDS_FILE) -> dict[int, dict[str, float]]:
    """The figures one notebook printed for each seed ``make seeds`` ran, ``{seed: {figure:
    value}}`` (seeds that failed left out). Raises ``ValueError`` when the file has none for
    ``notebook`` (e.g. ``"21_mini_deepseek"``): run ``make seeds`` first."""
    runs = load_seed_runs(path)
    found = {
        seed: dict(by_notebook[notebook])
        for seed, by_notebook in sorted(runs.items())
        if notebook in by_notebook and "error" not in by_notebook[notebook]
    }
    if not found:
        raise ValueError(
            f"{path} has no figures for notebook={notebook!r}; run `make seeds` "
            "(tools/seeds.py) to measure them"
        )
    return found
