"""``data/`` holds what the generators write: regenerated here, equal to the committed files."""

from __future__ import annotations

from pathlib import Path

import make_data  # tools/, on the path through conftest
import pytest

from course_utils.tokenizer import ByteBPETokenizer

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("name", sorted(make_data.FILES))
def test_data_file_equals_what_its_generator_writes(name: str):
    path = DATA / name
    assert path.exists(), f"data/{name} is missing; run python tools/make_data.py"
    assert path.read_text(encoding="utf-8") == make_data.FILES[name](), (
        f"data/{name} differs from what its generator writes now; run python tools/make_data.py"
    )


def test_every_data_file_is_generated_or_documented():
    documented = {"README.md"}
    assert {p.name for p in DATA.iterdir()} == set(make_data.FILES) | documented
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in make_data.FILES)


def test_the_tokenizer_file_loads_and_round_trips():
    tok = ByteBPETokenizer.load(DATA / "tokenizer_01.json")
    assert tok.vocab_size == 512
    text = (DATA / "stories_sample.txt").read_text(encoding="utf-8")[:2000]
    assert tok.decode(tok.encode(text)) == text
