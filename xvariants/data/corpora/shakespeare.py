"""Tiny Shakespeare: Karpathy's char-rnn ``input.txt`` (1,115,394 characters, 65 distinct)."""

from __future__ import annotations

from pathlib import Path

from .base import Corpus, Split, read_text, split_contiguous, split_meta
from .fetch import Source, resolve_files

DEFAULT_SPLIT: Split = (0.9, 0.1)

SOURCE = Source(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    own_names={"input.txt": ""},
    sha256={"input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
)


def load_shakespeare(
    split: Split, *, path: str | Path | None, data_dir: str | Path | None, download: bool
) -> Corpus:
    """Load Tiny Shakespeare, split by character position.

    The default (0.9, 0.1) is char-rnn's and nanoGPT's split: first 90% train,
    last 10% validation, and the test split is the validation split. ``path``
    may name the file itself or a folder holding ``input.txt``.
    """
    if path is not None and Path(path).is_file():
        file = Path(path)
    else:
        wanted = {
            "text": (
                ["input.txt", "tinyshakespeare.txt"],
                ["tinyshakespeare.txt", "tinyshakespeare/input.txt"],
            )
        }
        file = resolve_files("shakespeare", wanted, SOURCE, path=path, data_dir=data_dir, download=download)["text"]
    train, valid, test = split_contiguous(read_text(file), split, str(file))
    meta = {
        "source": "shakespeare",
        "path": str(file.resolve()),
        **split_meta(split, "split by character position", train, valid, test),
    }
    return Corpus("shakespeare", train, valid, test, meta)
