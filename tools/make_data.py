"""Write ``data/``: the data the course generates, as files a learner can open and read.

The notebooks never read these files: every notebook generates its data itself, from the same
functions with the same seeds. The files show what that data looks like, and
``tests/test_data_folder.py`` regenerates them and checks they equal the committed ones, so they
cannot drift from the code. ``python tools/make_data.py`` rewrites them; ``--check`` only
compares.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_utils.data import make_arithmetic_corpus, make_story_corpus  # noqa: E402
from course_utils.tokenizer import ByteBPETokenizer  # noqa: E402

DATA = ROOT / "data"
STORIES_SHOWN = 100  # stories in the sample (of the 2000 notebooks 00 and 01 train on)
ARITHMETIC_SHOWN = 300  # lines in the sample (of the 20,000 of the arithmetic notebooks)


def stories_sample() -> str:
    """The first stories of ``make_story_corpus(2000, seed=0)``."""
    stories = make_story_corpus(2000, seed=0).split("\n\n")
    return "\n\n".join(stories[:STORIES_SHOWN]) + "\n"


def arithmetic_sample() -> str:
    """The first lines of ``make_arithmetic_corpus(20000, seed=0)``."""
    lines = make_arithmetic_corpus(20000, seed=0).splitlines(keepends=True)
    return "".join(lines[:ARITHMETIC_SHOWN])


def _tokenizer_01() -> ByteBPETokenizer:
    return ByteBPETokenizer.train(make_story_corpus(2000, seed=0), vocab_size=512)


def tokenizer_01_json() -> str:
    """Notebook 01's tokenizer, as ``ByteBPETokenizer.save`` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        _tokenizer_01().save(path)
        return path.read_text(encoding="utf-8")


def tokenizer_01_merges() -> str:
    """Notebook 01's merges in order, each as the two pieces it joins and the new token."""
    tok = _tokenizer_01()
    lines = ["# rank  left + right -> new token (bytes shown as text; a space is shown as ' ')"]
    for rank, (left, right) in enumerate(tok.merges):
        pieces = [tok.token_bytes(t).decode("utf-8", "backslashreplace") for t in (left, right)]
        lines.append(f"{rank:4d}  {pieces[0]!r} + {pieces[1]!r} -> {pieces[0] + pieces[1]!r}")
    return "\n".join(lines) + "\n"


FILES: dict[str, Callable[[], str]] = {
    "stories_sample.txt": stories_sample,
    "arithmetic_sample.txt": arithmetic_sample,
    "tokenizer_01.json": tokenizer_01_json,
    "tokenizer_01_merges.txt": tokenizer_01_merges,
}


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print(__doc__)
        return 2
    stale = []
    for name, make in FILES.items():
        text, path = make(), DATA / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote data/{name} ({len(text.encode()):,} bytes)")
    if stale:
        print("out of date (run python tools/make_data.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
