from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils.data import make_story_corpus
from course_utils.tokenizer import ARITHMETIC_ALPHABET, ByteBPETokenizer, CharTokenizer


@pytest.fixture(scope="module")
def tok() -> ByteBPETokenizer:
    return ByteBPETokenizer.train(make_story_corpus(300, seed=0), vocab_size=400)


def test_training_learns_merges_that_compress(tok):
    text = make_story_corpus(50, seed=9)
    ids = tok.encode(text)
    assert tok.vocab_size == 400 and len(tok.merges) == 400 - 256 - 1
    assert len(ids) < len(text.encode()) / 2  # 143 merges already halve the length
    assert tok.decode(ids) == text


def test_first_merge_is_the_most_frequent_pair():
    tok = ByteBPETokenizer.train("abab abab ab", vocab_size=257, special_tokens=())
    assert tok.merges == [(ord("a"), ord("b"))]
    assert tok.encode("ab") == [256]


def test_ties_go_to_the_smaller_pair():
    # ("c","d") and ("a","b") both occur twice; the documented tie-break picks the smaller pair,
    # the rule notebook 01's from-scratch BPE follows too
    tok = ByteBPETokenizer.train("cdcd abab", vocab_size=258, special_tokens=())
    assert tok.merges == [(ord("a"), ord("b")), (ord("c"), ord("d"))]


def test_training_is_deterministic():
    text = make_story_corpus(100, seed=3)
    assert ByteBPETokenizer.train(text, 300).merges == ByteBPETokenizer.train(text, 300).merges


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_special_tokens(tok):
    eot = tok.special_tokens["<|endoftext|>"]
    ids = tok.encode("the cat<|endoftext|>the dog")
    assert ids.count(eot) == 1
    assert tok.decode(ids) == "the cat<|endoftext|>the dog"
    assert eot not in tok.encode("<|endoftext|>", allow_special=False)


def test_save_load_keeps_everything(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    again = ByteBPETokenizer.load(path)
    text = "Ada gave the key to Ben.<|endoftext|> ünïcödé 🙂"
    assert again.encode(text) == tok.encode(text)
    assert again.special_tokens == tok.special_tokens and again.merges == tok.merges


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"merges": []}')
    with pytest.raises(ValueError, match="not a ByteBPETokenizer file"):
        ByteBPETokenizer.load(path)


def test_unknown_id_is_a_value_error(tok):
    with pytest.raises(ValueError, match="token id 400"):
        tok.decode([1, 2, 400])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=100"):
        ByteBPETokenizer.train("abc", vocab_size=100)


def test_char_tokenizer():
    ct = CharTokenizer()
    line = "07+45+13=<7+5+3=15;0+4+1+1=06>065\n"
    assert ct.decode(ct.encode(line)) == line and ct.vocab_size == len(ARITHMETIC_ALPHABET)
    with pytest.raises(ValueError, match="'x' is not in the alphabet"):
        ct.encode("1x")
    with pytest.raises(ValueError, match="token id 99"):
        ct.decode([99])
    with pytest.raises(ValueError, match="no repeats"):
        CharTokenizer("aa")
