"""Tokenizers that turn corpus text into integer ids and back.

Every tokenizer is fully described by ``to_dict()``: a JSON-safe dict of plain
str/int/list values. That dict is what checkpoints store (they are loaded with
``torch.load(weights_only=True)``, which refuses custom objects) and what the
token cache hashes, so two tokenizers with equal dicts encode identically.

Text is always a ``str``. Corpora are read with ``errors="surrogateescape"``, so
bytes that are not valid UTF-8 arrive as lone surrogates U+DC80..U+DCFF; the
byte tokenizer turns them back into the exact original bytes.
"""

from __future__ import annotations

from xvariants.config_errors import DataError

import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_NAMES = ("byte", "char", "word", "bpe")

# Ids are int32: every vocabulary fits, and it halves memory against int64 for
# 100M-token corpora. Batching widens to int64 when it builds tensors.
ID_DTYPE = np.int32

Ids = Sequence[int] | np.ndarray


class Tokenizer(ABC):
    """A reversible map between text and ids, plus the unit that bits are reported in."""

    name: str = ""
    unit: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids; valid ids are ``0 .. vocab_size - 1``."""

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Return the ids of ``text`` as a 1-D int32 array."""

    @abstractmethod
    def decode(self, ids: Ids) -> str:
        """Return the text of ``ids``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict from which ``tokenizer_from_dict`` rebuilds this tokenizer."""

    def save(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        """Read a tokenizer written by ``save``."""
        return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _as_id_array(ids: Ids) -> np.ndarray:
    """Accept lists, numpy arrays and torch tensors alike (tensors via ``__array__``)."""
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(
            f"token ids must lie in [0, {vocab_size}); got min {ids.min()}, max {ids.max()}"
        )


class ByteTokenizer(Tokenizer):
    """One id per byte of the UTF-8 (surrogate-escaped) encoding: 256 ids, no training.

    Round-trips arbitrary bytes exactly: a file read with ``errors="surrogateescape"``
    encodes to its original bytes, and decoding rebuilds the same ``str``.
    """

    name = "byte"
    unit = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        data = text.encode("utf-8", "surrogateescape")
        return np.frombuffer(data, dtype=np.uint8).astype(ID_DTYPE)

    def decode(self, ids: Ids) -> str:
        array = _as_id_array(ids)
        _check_ids(array, 256)
        return array.astype(np.uint8).tobytes().decode("utf-8", "surrogateescape")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        return cls()


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of ``text`` as uint32, without a Python-level loop.

    ``surrogatepass`` lets the surrogate escapes of undecodable bytes through.
    """
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One id per character of the training split.

    Ids ``0 .. len(chars) - 1`` are the training characters in code-point order
    (so they match char-rnn/nanoGPT ids); the last id, ``len(chars)``, is
    ``<unk>`` and stands for any character never seen in training.
    """

    name = "char"
    unit = "char"
    UNK = "<unk>"

    def __init__(self, chars: Sequence[str]):
        points = sorted({ord(c) for c in chars})
        if not points:
            raise DataError("a char tokenizer needs a non-empty training text")
        self._points = np.asarray(points, dtype=np.uint32)
        self._chars = [chr(p) for p in points]

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(list(set(text)))

    @property
    def chars(self) -> list[str]:
        """The known characters, in id order (``<unk>`` excluded)."""
        return list(self._chars)

    @property
    def unk_id(self) -> int:
        return len(self._chars)

    @property
    def vocab_size(self) -> int:
        return len(self._chars) + 1

    def encode(self, text: str) -> np.ndarray:
        points = _code_points(text)
        ids = np.searchsorted(self._points, points)
        ids = np.minimum(ids, len(self._points) - 1)
        known = self._points[ids] == points
        return np.where(known, ids, self.unk_id).astype(ID_DTYPE)

    def decode(self, ids: Ids) -> str:
        array = _as_id_array(ids)
        _check_ids(array, self.vocab_size)
        table = np.asarray(self._chars + [self.UNK], dtype=object)
        return "".join(table[array].tolist())

    def to_dict(self) -> dict[str, Any]:
        # Code points rather than a string: lone surrogates (escaped bytes) are
        # not valid in every serialiser, integers are.
        return {"name": self.name, "code_points": self._points.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls([chr(p) for p in d["code_points"]])


def _lines(text: str) -> list[str]:
    """Split on "\\n" like iterating over a text file: a final newline adds no empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class WordTokenizer(Tokenizer):
    """Whitespace-separated words with ``<eos>`` at every line end (the PTB/WikiText convention).

    Id 0 is ``<eos>``, id 1 is ``<unk>``; the other words follow by decreasing
    training frequency, ties broken alphabetically, so the vocabulary is
    deterministic. A literal ``<unk>`` in the text (PTB has them) is id 1.
    """

    name = "word"
    unit = "word"
    EOS = "<eos>"
    UNK = "<unk>"

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:2] != [self.EOS, self.UNK]:
            raise DataError(f"a word vocabulary must start with {self.EOS!r}, {self.UNK!r}")
        if len(set(words)) != len(words):
            raise DataError("a word vocabulary must not repeat words")
        self._words = words
        self._index = {w: i for i, w in enumerate(words)}

    @classmethod
    def train(cls, text: str, min_freq: int = 1, max_size: int | None = None) -> WordTokenizer:
        """Build the vocabulary of ``text``.

        Words seen fewer than ``min_freq`` times become ``<unk>``; ``max_size``
        caps the whole vocabulary, the two special tokens included.
        """
        if min_freq < 1:
            raise DataError(f"tokenizer.min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 2:
            raise DataError(f"tokenizer.max_size must be >= 2 (<eos> and <unk>), got {max_size}")
        counts = Counter(word for line in _lines(text) for word in line.split())
        counts.pop(cls.EOS, None)
        counts.pop(cls.UNK, None)
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max_size - 2]
        return cls([cls.EOS, cls.UNK, *ranked])

    @property
    def words(self) -> list[str]:
        """The vocabulary in id order."""
        return list(self._words)

    @property
    def eos_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def vocab_size(self) -> int:
        return len(self._words)

    def encode(self, text: str) -> np.ndarray:
        index, unk, eos = self._index, self.unk_id, self.eos_id
        ids: list[int] = []
        for line in _lines(text):
            ids.extend(index.get(word, unk) for word in line.split())
            ids.append(eos)
        return np.asarray(ids, dtype=ID_DTYPE)

    def decode(self, ids: Ids) -> str:
        array = _as_id_array(ids)
        _check_ids(array, self.vocab_size)
        out: list[str] = []
        line: list[str] = []
        for i in array.tolist():
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self._words[i])
        out.append(" ".join(line))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "words": list(self._words)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        return cls(d["words"])


# Cut points for parallel BPE encoding: right after a newline that sits between
# two non-space characters. The byte-level pre-tokenizer never joins text across
# such a point, so encoding the pieces gives exactly the ids of the whole.
_SAFE_CUT = re.compile(r"\S\n(?=\S)")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _pieces(text: str, size: int = 1 << 16) -> Iterator[str]:
    start = 0
    while len(text) - start > size:
        match = _SAFE_CUT.search(text, start + size)
        if match is None:
            break
        yield text[start : match.end()]
        start = match.end()
    yield text[start:]


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) trained with the Hugging Face ``tokenizers`` library.

    Valid Unicode text round-trips exactly. The library only accepts valid
    Unicode, so surrogate escapes (undecodable bytes) are encoded as U+FFFD.
    """

    name = "bpe"
    unit = "bpe"

    def __init__(self, hf_tokenizer: Any):
        self._hf = hf_tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges on ``text`` until ``vocab_size`` ids (at least the 256 byte ids)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise DataError(f"tokenizer.vocab_size must be >= 256 for byte-level BPE, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(_pieces(cls._valid_unicode(text)), trainer=trainer)
        return cls(hf)

    @staticmethod
    def _valid_unicode(text: str) -> str:
        if _SURROGATES.search(text):
            return _SURROGATES.sub("\ufffd", text)
        return text

    @property
    def hf_tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` underneath (its encodings carry character offsets)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size())

    def encode(self, text: str) -> np.ndarray:
        pieces = list(_pieces(self._valid_unicode(text)))
        encodings = self._hf.encode_batch(pieces)
        if not encodings:
            return np.zeros(0, dtype=ID_DTYPE)
        return np.concatenate([np.asarray(e.ids, dtype=ID_DTYPE) for e in encodings])

    def decode(self, ids: Ids) -> str:
        array = _as_id_array(ids)
        _check_ids(array, self.vocab_size)
        return self._hf.decode(array.tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hf_tokenizer": self._hf.to_str()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(d["hf_tokenizer"]))


_CLASSES: dict[str, type[Tokenizer]] = {
    "byte": ByteTokenizer,
    "char": CharTokenizer,
    "word": WordTokenizer,
    "bpe": BPETokenizer,
}

# Training options each tokenizer accepts (the keyword arguments of its ``train``).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "byte": (),
    "char": (),
    "word": ("min_freq", "max_size"),
    "bpe": ("vocab_size", "min_frequency"),
}


def _check_name(name: str, field: str) -> None:
    if name not in _CLASSES:
        raise DataError(f"{field} must be one of {', '.join(TOKENIZER_NAMES)}; got {name!r}")


def check_tokenizer_options(name: str, options: dict[str, Any], field: str = "tokenizer") -> None:
    """Raise ``ValueError`` for an unknown tokenizer name or an option it does not take."""
    _check_name(name, f"{field}.name")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(_OPTIONS[name]) or "none"
        raise DataError(
            f"{field}.{unknown[0]} is not an option of the {name!r} tokenizer (options: {allowed})"
        )


def build_tokenizer(name: str, train_text: str, **options: Any) -> Tokenizer:
    """Train the tokenizer called ``name`` on ``train_text``.

    Options: ``word`` takes ``min_freq`` and ``max_size``; ``bpe`` takes
    ``vocab_size`` and ``min_frequency``; ``byte`` and ``char`` take none.
    """
    check_tokenizer_options(name, options)
    if name == "byte":
        return ByteTokenizer()
    if not train_text:
        raise DataError(f"cannot train a {name!r} tokenizer on an empty training text")
    cls = _CLASSES[name]
    return cls.train(train_text, **options)  # type: ignore[attr-defined]


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from ``Tokenizer.to_dict()`` output."""
    if not isinstance(d, dict) or "name" not in d:
        raise DataError("a saved tokenizer must be a dict with a 'name' key")
    _check_name(d["name"], "tokenizer.name")
    return _CLASSES[d["name"]].from_dict(d)  # type: ignore[attr-defined]
