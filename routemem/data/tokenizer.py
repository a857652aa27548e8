"""Byte- and character-level tokenizers.

Both encode to ``np.uint16`` arrays (one dtype everywhere, so cached token files and
samplers never need to know which tokenizer made them) and describe themselves with a
small JSON-able dict, which checkpoints store so a model can be decoded later.
"""

from __future__ import annotations

import numpy as np

from routemem.errors import DataError

TOKEN_DTYPE = np.uint16


def _codepoints(text: str) -> np.ndarray:
    """The text's Unicode code points as uint32, without a Python loop.

    ``surrogatepass`` keeps lone surrogates (e.g. from ``surrogateescape`` reads) encodable.
    """
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _ids_array(ids, vocab_size: int, kind: str) -> np.ndarray:
    """Any sequence of ids (list, numpy, CPU tensor) as int64, checked against the vocab."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise DataError(f"token id {bad} is outside the {kind} tokenizer's vocab of {vocab_size}")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as tokens: any text encodes, nothing to fit."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(TOKEN_DTYPE)

    def decode(self, ids) -> str:
        arr = _ids_array(ids, self.vocab_size, self.kind)
        # A model may emit a cut-off multi-byte sequence; show it as U+FFFD, don't fail.
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def unknown_chars(self, text: str) -> str:
        """Characters this tokenizer cannot represent: none (every text is UTF-8 bytes)."""
        return ""

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class CharTokenizer:
    """One token per character seen in the fitting text; id 0 means "unknown character".

    Reserving id 0 lets a tokenizer fitted on one corpus encode any other (evaluation on a
    shifted domain) instead of failing on a character it never saw.
    """

    kind = "char"
    UNKNOWN = 0

    def __init__(self, chars: str):
        points = np.unique(_codepoints(chars))  # sorted and deduplicated
        if len(points) + 1 > np.iinfo(TOKEN_DTYPE).max + 1:
            raise DataError(f"char tokenizer has {len(points)} characters, more than uint16 ids allow")
        self.chars = points.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
        self.vocab_size = 1 + len(points)
        # Lookup table id -> code point for vectorised decode; id 0 shows as U+FFFD.
        self._table = np.concatenate([np.array([0xFFFD], dtype="<u4"), points])
        # Dense code point -> id table for encoding (at most 1.1M entries, 2.2 MB); the extra
        # last slot stays 0 so any larger code point reads as unknown.
        top = int(points[-1]) + 2 if len(points) else 1
        self._ids = np.zeros(top, dtype=TOKEN_DTYPE)
        self._ids[points] = np.arange(1, len(points) + 1, dtype=TOKEN_DTYPE)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    def encode(self, text: str) -> np.ndarray:
        # One gather through the dense code point -> id table; code points past its end are
        # clipped onto its last slot, which is always 0 (unknown).
        points = _codepoints(text)
        return self._ids[np.minimum(points, len(self._ids) - 1)]

    def unknown_chars(self, text: str) -> str:
        """The distinct characters of ``text`` (sorted) that ``encode`` maps to ``UNKNOWN``; callers
        warn about them, since the model then sees a placeholder instead of what was written."""
        points = np.unique(_codepoints(text))
        unknown = points[self._ids[np.minimum(points, len(self._ids) - 1)] == self.UNKNOWN]
        return unknown.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def decode(self, ids) -> str:
        arr = _ids_array(ids, self.vocab_size, self.kind)
        return self._table[arr].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer from its ``to_dict()`` (as stored in a checkpoint)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise DataError("char tokenizer dict needs a string 'chars'")
        return CharTokenizer(chars)
    raise DataError(f"unknown tokenizer kind {kind!r}; known kinds: byte, char")


def build_tokenizer(kind: str, text: str):
    """A tokenizer of ``kind`` ('byte' or 'char'), fitted on ``text`` where that means anything."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_text(text)
    raise DataError(f"unknown tokenizer kind {kind!r}; known kinds: byte, char")
