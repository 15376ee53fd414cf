"""Tokenizers built from scratch: a byte-level BPE and a character tokenizer.

:class:`ByteBPETokenizer` is the scheme GPT-2 and DeepSeek use, at course size: text is split
into pieces (words with their leading space, numbers, punctuation, whitespace), each piece
becomes its UTF-8 bytes (ids 0-255), and training learns merges, each one replacing the most
frequent adjacent pair of ids by a new id. Because every string is bytes, any unicode text
round-trips exactly: ``decode(encode(s)) == s``.

:class:`CharTokenizer` maps each character of a fixed alphabet to one id. The arithmetic task
uses it: BPE would merge digits into multi-digit tokens, which makes addition much harder for a
tiny model.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["ByteBPETokenizer", "CharTokenizer", "ARITHMETIC_ALPHABET"]

#: Pieces BPE never merges across: contractions, words with one leading space, single digits,
#: runs of punctuation, whitespace; the last alternative catches anything else (``_`` say).
PRETOKENIZE_PATTERN = r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+|[\s\S]"

#: The characters of the arithmetic corpus (see ``course_utils.data``).
ARITHMETIC_ALPHABET = "\n0123456789+=<>;"


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids`` by ``new_id``."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class ByteBPETokenizer:
    """Byte-level byte-pair encoding with optional special tokens.

    Ids 0-255 are raw bytes, 256 .. 256 + len(merges) - 1 are learned merges, and special tokens
    (for example ``<|endoftext|>``) come last. Train with :meth:`train`; save and load as JSON.
    """

    def __init__(
        self,
        merges: Sequence[tuple[int, int]] = (),
        special_tokens: Sequence[str] = (),
        pattern: str = PRETOKENIZE_PATTERN,
    ) -> None:
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(self.merges):
            new_id = 256 + i
            if a >= new_id or b >= new_id:
                raise ValueError(f"merge {i} ({a}, {b}) uses an id not yet defined")
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {list(special_tokens)}")
        first = 256 + len(self.merges)
        self.special_tokens = {tok: first + i for i, tok in enumerate(special_tokens)}
        self._special_by_id = {i: tok for tok, i in self.special_tokens.items()}
        self._special_regex = (
            re.compile("(" + "|".join(map(re.escape, sorted(special_tokens, key=len)[::-1])) + ")")
            if special_tokens
            else None
        )
        self._cache: dict[str, list[int]] = {}

    # -- training -------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        pattern: str = PRETOKENIZE_PATTERN,
    ) -> ByteBPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Each step merges the most frequent adjacent pair (ties: the smaller pair), counting only
        inside pre-tokenized pieces. Stops early when no pair occurs twice.
        """
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must be at least 256 bytes + "
                f"{len(special_tokens)} special tokens = {256 + len(special_tokens)}"
            )
        regex = re.compile(pattern)
        if special_tokens:
            splitter = "|".join(map(re.escape, special_tokens))
            chunks = re.split(splitter, text)
        else:
            chunks = [text]
        piece_counts = Counter(p for chunk in chunks for p in regex.findall(chunk))
        words = [list(p.encode("utf-8")) for p in piece_counts]
        counts = list(piece_counts.values())

        pair_counts: Counter[tuple[int, int]] = Counter()
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (ids, c) in enumerate(zip(words, counts, strict=True)):
            for pair in zip(ids, ids[1:], strict=False):
                pair_counts[pair] += c
                where[pair].add(w)

        merges: list[tuple[int, int]] = []
        for step in range(n_merges):
            if not pair_counts:
                break
            best = max(pair_counts.items(), key=lambda kv: (kv[1], (-kv[0][0], -kv[0][1])))
            pair, count = best
            if count < 2:
                break
            new_id = 256 + step
            merges.append(pair)
            for w in list(where[pair]):
                ids, c = words[w], counts[w]
                for old in zip(ids, ids[1:], strict=False):
                    pair_counts[old] -= c
                    if pair_counts[old] <= 0:
                        del pair_counts[old]
                    where[old].discard(w)
                ids = _merge(ids, pair, new_id)
                words[w] = ids
                for new in zip(ids, ids[1:], strict=False):
                    pair_counts[new] += c
                    where[new].add(w)
        return cls(merges, special_tokens, pattern)

    # -- encode / decode ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges) + len(self.special_tokens)

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        ids = list(piece.encode("utf-8"))
        while len(ids) > 1:
            pairs = set(zip(ids, ids[1:], strict=False))
            pair = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, self.ranks[pair])
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``. With ``allow_special`` a special token's text becomes its id;
        without, it is encoded as ordinary bytes."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        chunks = (
            self._special_regex.split(text)
            if allow_special and self._special_regex is not None
            else [text]
        )
        ids: list[int] = []
        for chunk in chunks:
            if chunk in self.special_tokens and allow_special:
                ids.append(self.special_tokens[chunk])
                continue
            for piece in self._regex.findall(chunk):
                ids.extend(self._encode_piece(piece))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's UTF-8 text for special ids)."""
        if token_id in self.vocab:
            return self.vocab[token_id]
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode("utf-8")
        raise ValueError(
            f"token id {token_id} is not in this tokenizer's vocabulary "
            f"(valid ids are 0 .. {self.vocab_size - 1})"
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids. Invalid UTF-8 (a sequence cut inside a character) is shown
        as U+FFFD; an id outside the vocabulary raises ``ValueError``."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """A readable label for one token (for plots): its text, with bytes that are not whole
        characters shown as ``<0xNN>``."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in raw)

    # -- persistence ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "type": "byte_bpe",
            "version": 1,
            "pattern": self.pattern,
            "merges": [list(p) for p in self.merges],
            "special_tokens": list(self.special_tokens),
        }

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON (merges, special tokens, pre-tokenization pattern)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ByteBPETokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        missing = {"type", "merges", "special_tokens", "pattern"} - set(data)
        if missing or data.get("type") != "byte_bpe":
            raise ValueError(
                f"{path} is not a ByteBPETokenizer file (missing keys: {sorted(missing)}, "
                f"type={data.get('type')!r}); write one with ByteBPETokenizer.save"
            )
        return cls([tuple(p) for p in data["merges"]], data["special_tokens"], data["pattern"])

    def __repr__(self) -> str:
        return (
            f"ByteBPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )


class CharTokenizer:
    """One id per character of a fixed alphabet (id = position in ``alphabet``)."""

    def __init__(self, alphabet: str = ARITHMETIC_ALPHABET) -> None:
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must be non-empty with no repeats, got {alphabet!r}")
        self.alphabet = alphabet
        self.stoi = {ch: i for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the alphabet {self.alphabet!r}; "
                "build the CharTokenizer with an alphabet that contains it"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.alphabet):
                raise ValueError(
                    f"token id {i} is not in this tokenizer's vocabulary "
                    f"(valid ids are 0 .. {len(self.alphabet) - 1})"
                )
            out.append(self.alphabet[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r})"
