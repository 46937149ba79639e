"""enwik8 and text8: the first 10^8 bytes of a 2006 English Wikipedia dump, raw and cleaned.

Both come from Matt Mahoney's page (the Hutter Prize data) as single-file zips.
"""

from __future__ import annotations

from pathlib import Path

from .base import Corpus, EmptyCorpusError, Split, check_splits_nonempty, has_test_split, split_meta, split_points
from .fetch import Source, resolve_files

DEFAULT_SPLIT: Split = (0.9, 0.05, 0.05)
LENGTH = 10**8

SOURCES = {
    "enwik8": Source(
        url="http://mattmahoney.net/dc/enwik8.zip",
        own_names={"enwik8": "enwik8"},
        sha256={"enwik8": "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"},
    ),
    "text8": Source(url="http://mattmahoney.net/dc/text8.zip", own_names={"text8": "text8"}),
}


def load_hutter(
    name: str, split: Split, *, path: str | Path | None, data_dir: str | Path | None, download: bool
) -> Corpus:
    """Load ``name`` ("enwik8" or "text8"): its first 10^8 bytes, split contiguously.

    The default split is the standard 90M / 5M / 5M. It is taken in bytes and
    each part decoded on its own with ``surrogateescape``, so a multi-byte
    character cut by a split boundary, or any invalid UTF-8, still reaches the
    byte tokenizer as the exact original bytes. (text8 is ASCII: bytes are characters.)
    ``path`` may name the file itself or a folder holding it.
    """
    if path is not None and Path(path).is_file():
        file = Path(path)
    else:
        wanted = {"data": ([name], [name])}
        file = resolve_files(name, wanted, SOURCES[name], path=path, data_dir=data_dir, download=download)["data"]
    with file.open("rb") as f:
        data = f.read(LENGTH)
    if not data:
        raise EmptyCorpusError(f"corpus file is empty: {file}")
    train_end, valid_end = split_points(len(data), split)
    train = data[:train_end].decode("utf-8", "surrogateescape")
    valid = data[train_end:valid_end].decode("utf-8", "surrogateescape")
    test = data[valid_end:].decode("utf-8", "surrogateescape") if has_test_split(split) else valid
    check_splits_nonempty(str(file), train, valid, test)
    meta = {
        "source": name,
        "path": str(file.resolve()),
        "bytes": {"train": train_end, "valid": valid_end - train_end, "test": len(data) - valid_end},
        **split_meta(split, f"first {LENGTH:,} bytes split by byte position", train, valid, test),
    }
    if not has_test_split(split):
        meta["bytes"]["test"] = meta["bytes"]["valid"]
    return Corpus(name, train, valid, test, meta)
