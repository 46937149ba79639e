"""The embedded default corpus: the running interpreter's standard library source.

Every machine that runs Python has it, so it needs no download: about 1,800
``.py`` files (30 MB on CPython 3.11) of real code with long-range structure.
Its content depends on the Python version, which ``meta`` records.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from .base import (
    Corpus,
    EmptyCorpusError,
    Split,
    check_splits_nonempty,
    has_test_split,
    join_documents,
    split_meta,
)

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of every ``*.py`` file under ``root``, sorted, third-party folders excluded."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        for file in files:
            if file.endswith(".py"):
                found.append((Path(folder) / file).relative_to(root).as_posix())
    return sorted(found)


def file_bucket(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone (sha1, unlike the salted built-in ``hash``)."""
    digest = hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(relative_path: str, split: Split) -> str:
    """Which split a file belongs to: train, valid, or test (valid when there is no test split)."""
    bucket = file_bucket(relative_path)
    if bucket < split[0]:
        return "train"
    if bucket < split[0] + split[1] or not has_test_split(split):
        return "valid"
    return "test"


def load_stdlib(split: Split, root: Path | None = None) -> Corpus:
    """Load the standard library, split by file: each file lies wholly in one split.

    Inside a split, files are sorted by relative path and joined, each after a
    ``<|file|> <path>`` header line, so the text is identical on every run.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    paths = stdlib_files(root)
    if not paths:
        raise EmptyCorpusError(f"no .py files found in the standard library folder {root}")
    documents: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for relative in paths:
        text = (root / relative).read_bytes().decode("utf-8", "surrogateescape")
        documents[assign_split(relative, split)].append((relative, text))
    train = join_documents(documents["train"])
    valid = join_documents(documents["valid"])
    test = join_documents(documents["test"]) if has_test_split(split) else valid
    check_splits_nonempty(f"the stdlib corpus ({root})", train, valid, test)
    meta = {
        "source": "stdlib",
        "path": str(root),
        "python_version": sys.version,
        "files": {s: len(documents[s]) for s in ("train", "valid", "test")},
        **split_meta(split, "by file: sha1 of the relative path picks the split", train, valid, test),
    }
    if not has_test_split(split):
        meta["files"]["test"] = meta["files"]["valid"]
    return Corpus("stdlib", train, valid, test, meta)
