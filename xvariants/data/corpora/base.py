"""The ``Corpus`` record and the helpers every source shares: reading, splitting, errors."""

from __future__ import annotations

from xvariants.config_errors import DataError

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

Split = tuple[float, ...]

# Multi-document corpora put this header line before each document, so a model
# (and a person reading samples) can see where one file ends and the next begins.
DOCUMENT_HEADER = "<|file|> {path}\n"


class CorpusNotFoundError(FileNotFoundError):
    """A corpus file or folder is not where it was looked for."""


class EmptyCorpusError(DataError):
    """A corpus file, folder or split holds no text."""


class ChecksumError(DataError):
    """A downloaded file does not have its published sha256."""


@dataclass
class Corpus:
    """Three text splits and a record of where they came from.

    ``meta`` holds plain JSON values: source paths, the split rule, split sizes,
    and whatever else identifies the data (the Python version for ``stdlib``).
    When a corpus has no separate test split, ``test`` is the validation text
    and ``meta["test_is_valid"]`` is true.
    """

    name: str
    train: str = field(repr=False)
    valid: str = field(repr=False)
    test: str = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s)):,}" for s in ("train", "valid", "test"))
        return f"Corpus({self.name!r}, {sizes} chars)"

    def split(self, name: str) -> str:
        """Return the text of split ``name`` ("train", "valid" or "test")."""
        if name not in ("train", "valid", "test"):
            raise DataError(f"split must be one of train, valid, test; got {name!r}")
        return getattr(self, name)


def read_text(path: Path) -> str:
    """Read a file as UTF-8, keeping undecodable bytes as surrogate escapes and line ends as-is.

    Refuses a missing or empty file with an error naming it.
    """
    if not path.is_file():
        raise CorpusNotFoundError(f"corpus file not found: {path}")
    data = path.read_bytes()
    if not data:
        raise EmptyCorpusError(f"corpus file is empty: {path}")
    return data.decode("utf-8", "surrogateescape")


def check_split(split: Split | list[float], field_name: str = "corpus.split") -> Split:
    """Validate split fractions: 2 or 3 of them, train and valid positive, summing to 1.

    A 2-tuple, or a 3-tuple whose test fraction is 0, means "no test split":
    the test split is the validation split.
    """
    fractions = tuple(float(f) for f in split)
    if len(fractions) not in (2, 3):
        raise DataError(f"{field_name} must have 2 or 3 fractions (train, valid[, test]); got {split!r}")
    if fractions[0] <= 0 or fractions[1] <= 0 or min(fractions) < 0:
        raise DataError(f"{field_name} needs positive train and valid fractions; got {split!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"{field_name} fractions must sum to 1; got {split!r} (sum {sum(fractions)})")
    return fractions


def has_test_split(split: Split) -> bool:
    return len(split) == 3 and split[2] > 0


def split_points(length: int, split: Split) -> tuple[int, int]:
    """End offsets of train and valid for a contiguous split of ``length`` units.

    Fractions are taken as the decimals they are written as (0.9 is 9/10), so a
    100M-byte corpus splits at exactly 90M and 95M.
    """
    train_end = int(Fraction(repr(split[0])) * length)
    if not has_test_split(split):
        return train_end, length
    valid_end = train_end + int(Fraction(repr(split[1])) * length)
    return train_end, valid_end


def split_contiguous(text: str, split: Split, source: str) -> tuple[str, str, str]:
    """Cut ``text`` into train / valid / test by character position, in that order."""
    train_end, valid_end = split_points(len(text), split)
    train, valid = text[:train_end], text[train_end:valid_end]
    test = text[valid_end:] if has_test_split(split) else valid
    check_splits_nonempty(source, train, valid, test)
    return train, valid, test


def check_splits_nonempty(source: str, train: str, valid: str, test: str) -> None:
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if not text:
            raise EmptyCorpusError(
                f"the {name} split of {source} is empty (split sizes: train {len(train)}, "
                f"valid {len(valid)}, test {len(test)} chars); use a larger text or other split fractions"
            )


def join_documents(documents: list[tuple[str, str]]) -> str:
    """Join ``(relative_path, text)`` pairs, each preceded by its header line and ending in a newline."""
    parts = []
    for path, text in documents:
        parts.append(DOCUMENT_HEADER.format(path=path))
        parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def split_meta(split: Split, rule: str, train: str, valid: str, test: str) -> dict[str, Any]:
    """The meta entries every corpus records about its split."""
    return {
        "split": list(split),
        "split_rule": rule,
        "test_is_valid": not has_test_split(split),
        "chars": {"train": len(train), "valid": len(valid), "test": len(test)},
    }
