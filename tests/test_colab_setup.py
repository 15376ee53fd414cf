"""The Colab set-up cell, run for real: a stub ``google.colab`` module makes the cell believe it
is on Colab; it clones a local repository (``file://``) and installs ``course_utils`` into a
throwaway virtual environment, or stops with a clear message when the address is wrong.

The throwaway environment sees this environment's packages (torch included) through a ``.pth``
file, as a Colab runtime has its own; pip runs with no index and no build isolation, so any
attempt to download or reinstall something (torch above all) fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from nbtool import SETUP_CELL, SETUP_CELL_REFERENCE

ROOT = Path(__file__).resolve().parents[1]
STUB = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')\n"


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=course", "-c", "user.email=course@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory) -> Path:
    """A git repository on branch ``main`` holding what ``pip install -e`` needs."""
    src = tmp_path_factory.mktemp("upstream") / "course"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "course_utils", src / "course_utils", ignore=shutil.ignore_patterns("__pycache__")
    )
    _git("init", "-q", "-b", "main", cwd=src)
    _git("add", ".", cwd=src)
    _git("commit", "-q", "-m", "course", cwd=src)
    return src


@pytest.fixture(scope="module")
def colab_python(tmp_path_factory) -> Path:
    """A fresh virtual environment (with pip) that also sees this one's packages."""
    env_dir = tmp_path_factory.mktemp("colab") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the build uses this environment's setuptools (pyproject asks for a recent one), not the
    # old one ensurepip may have put in the fresh environment
    for old in Path(site).glob("setuptools*"):
        shutil.rmtree(old)
    (Path(site) / "course_runtime.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run_cell(
    python: Path | str, cell: str, env: dict[str, str], cwd: Path, after: str = ""
) -> subprocess.CompletedProcess:
    script = cwd / "cell.py"
    script.write_text(STUB + cell + "\n" + after)
    full_env = {
        **os.environ,
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        **env,
    }
    return subprocess.run(
        [str(python), str(script)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize("cell", [SETUP_CELL, SETUP_CELL_REFERENCE], ids=["plain", "reference"])
def test_setup_cell_installs_the_course_from_a_clone(cell, source_repo, colab_python, tmp_path):
    where = tmp_path / "content" / "course"
    ask = "from importlib.metadata import version; print(version('torch'))"
    torch_before = subprocess.run(
        [str(colab_python), "-c", ask], capture_output=True, text=True, check=True
    ).stdout.strip()
    after = (
        "import course_utils, torch\n"
        "from importlib.metadata import version\n"
        "print('COURSE', course_utils.__file__)\n"
        "print('TORCH', version('torch'), torch.__file__)\n"
    )
    done = _run_cell(
        colab_python,
        cell,
        {"COURSE_REPO": source_repo.as_uri(), "COURSE_REF": "main", "COURSE_DIR": str(where)},
        tmp_path,
        after,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert Path(lines["COURSE"]).resolve() == (where / "course_utils" / "__init__.py").resolve()
    version, torch_file = lines["TORCH"].split(" ", 1)
    assert version == torch_before  # Colab's torch is the one in use, unchanged
    assert not Path(torch_file).is_relative_to(colab_python.parents[1])  # and not reinstalled
    # a second run (Run all again) reuses the clone
    again = _run_cell(
        colab_python,
        cell,
        {"COURSE_REPO": source_repo.as_uri(), "COURSE_DIR": str(where)},
        tmp_path,
        after,
    )
    assert again.returncode == 0, again.stderr


def test_setup_cell_names_a_bad_url_and_the_fix(tmp_path):
    bad = (tmp_path / "no-such-course").as_uri()
    done = _run_cell(
        sys.executable,
        SETUP_CELL,
        {"COURSE_REPO": bad, "COURSE_DIR": str(tmp_path / "course")},
        tmp_path,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()
    message = done.stderr[done.stderr.rindex("RuntimeError") :]
    assert bad in message and "COURSE_REPO" in message, last[-5:]
    assert "CalledProcessError" not in done.stderr
    assert not (tmp_path / "course").exists()


def test_setup_cell_names_a_bad_ref(source_repo, tmp_path):
    done = _run_cell(
        sys.executable,
        SETUP_CELL,
        {
            "COURSE_REPO": source_repo.as_uri(),
            "COURSE_REF": "no-such-branch",
            "COURSE_DIR": str(tmp_path / "course"),
        },
        tmp_path,
    )
    assert done.returncode != 0
    message = done.stderr[done.stderr.rindex("RuntimeError") :]
    assert "no-such-branch" in message and "COURSE_REF" in message


def test_setup_cell_does_nothing_outside_colab(tmp_path):
    script = tmp_path / "cell.py"
    script.write_text(SETUP_CELL + "\nprint('done', 'google.colab' in sys.modules)\n")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "COURSE_REPO": "file:///nowhere"},
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "done False", done.stderr
