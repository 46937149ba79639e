"""Any text the user has: one file, a folder of files, or explicit train/valid/test files."""

from __future__ import annotations

import os
from pathlib import Path

from xvariants.config_errors import DataError

from .base import (
    Corpus,
    CorpusNotFoundError,
    EmptyCorpusError,
    Split,
    join_documents,
    read_text,
    split_contiguous,
    split_meta,
)


def is_text(data: bytes) -> bool:
    """A file counts as text when it is valid UTF-8 and has no NUL byte (binaries nearly always do)."""
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def folder_documents(folder: Path) -> list[tuple[str, str]]:
    """Every non-empty text file under ``folder``, recursively, sorted by relative path.

    Hidden files and folders (names starting with ".") are skipped, and so is
    any file that is not text by ``is_text``, whatever its extension.
    """
    documents = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if file.startswith("."):
                continue
            path = Path(current) / file
            data = path.read_bytes()
            if data and is_text(data):
                documents.append((path.relative_to(folder).as_posix(), data.decode("utf-8")))
    return sorted(documents)


def load_text(
    path: str | Path | None,
    split: Split,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    test_file: str | Path | None = None,
) -> Corpus:
    """Load ``path`` (file or folder) split by character position, or the explicit split files.

    A file or a folder's joined documents are cut contiguously: the first
    ``split[0]`` of the characters train, the next ``split[1]`` validate, the
    rest test. With explicit files, ``train_file`` and ``valid_file`` are
    required and a missing ``test_file`` makes the test split the validation one.
    """
    explicit = (train_file, valid_file, test_file)
    if path is not None and any(f is not None for f in explicit):
        raise DataError("the text corpus takes either corpus.path or corpus.train_file/valid_file/test_file, not both")
    if path is None:
        if train_file is None or valid_file is None:
            raise DataError(
                "the text corpus needs corpus.path (a file or folder) or both corpus.train_file and corpus.valid_file"
            )
        return _load_explicit(Path(train_file), Path(valid_file), None if test_file is None else Path(test_file))

    path = Path(path)
    if path.is_dir():
        documents = folder_documents(path)
        if not documents:
            raise EmptyCorpusError(f"folder {path} holds no non-empty UTF-8 text file")
        text = join_documents(documents)
        rule = f"{len(documents)} text files joined in path order, then split by character position"
    elif path.is_file():
        text = read_text(path)
        rule = "split by character position"
    elif path.exists():
        raise DataError(f"text corpus path is not a regular file or folder: {path}")
    else:
        raise CorpusNotFoundError(f"text corpus path not found: {path}")
    train, valid, test = split_contiguous(text, split, str(path))
    meta = {"source": "text", "path": str(path.resolve()), **split_meta(split, rule, train, valid, test)}
    return Corpus("text", train, valid, test, meta)


def _load_explicit(train_file: Path, valid_file: Path, test_file: Path | None) -> Corpus:
    for name, file in (("train_file", train_file), ("valid_file", valid_file), ("test_file", test_file)):
        if file is not None and file.exists() and not file.is_file():
            raise DataError(f"corpus.{name} is not a regular file: {file}")
    train, valid = read_text(train_file), read_text(valid_file)
    test = valid if test_file is None else read_text(test_file)
    meta = {
        "source": "text",
        "files": {
            "train": str(train_file.resolve()),
            "valid": str(valid_file.resolve()),
            "test": str((test_file or valid_file).resolve()),
        },
        "split_rule": "explicit files",
        "test_is_valid": test_file is None,
        "chars": {"train": len(train), "valid": len(valid), "test": len(test)},
    }
    return Corpus("text", train, valid, test, meta)
