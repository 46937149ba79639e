"""Language-modelling corpora: ``load_corpus(name, ...)`` returns a ``Corpus`` of three text splits.

Sources: ``stdlib`` (the default, no download), ``text`` (the user's files),
the standard benchmarks ``shakespeare``, ``ptb``, ``wikitext2``,
``wikitext103``, ``enwik8``, ``text8``, found locally (see ``fetch``) or
downloaded from their canonical addresses, and ``facts`` (generated known facts
mixed with real text, see ``facts``).
"""

from __future__ import annotations

from xvariants.config_errors import DataError

from pathlib import Path
from typing import Any

from .base import (
    ChecksumError,
    Corpus,
    CorpusNotFoundError,
    EmptyCorpusError,
    Split,
    check_split,
)
from .facts import FACTS_OPTIONS, load_facts
from .hutter import load_hutter
from .ptb import load_ptb
from .shakespeare import load_shakespeare
from .stdlib import load_stdlib
from .text import load_text
from .wikitext import load_wikitext

CORPUS_NAMES = ("stdlib", "text", "shakespeare", "ptb", "wikitext2", "wikitext103", "enwik8", "text8", "facts")

DEFAULT_SPLITS: dict[str, Split] = {
    "stdlib": (0.9, 0.05, 0.05),
    "text": (0.9, 0.05, 0.05),
    "shakespeare": (0.9, 0.1),
    "enwik8": (0.9, 0.05, 0.05),
    "text8": (0.9, 0.05, 0.05),
}

# The arguments each source reads; any other argument given a value is an error,
# so a misspelt or misplaced setting never passes silently.
_ACCEPTS = {
    "stdlib": {"split"},
    "text": {"path", "train_file", "valid_file", "test_file", "split"},
    "shakespeare": {"path", "split"},
    "ptb": {"path", "train_file", "valid_file", "test_file"},
    "wikitext2": {"path", "train_file", "valid_file", "test_file"},
    "wikitext103": {"path", "train_file", "valid_file", "test_file"},
    "enwik8": {"path", "split"},
    "text8": {"path", "split"},
    "facts": set(FACTS_OPTIONS),
}


def check_corpus_name(name: str, field_name: str = "corpus.name") -> None:
    if name not in CORPUS_NAMES:
        raise DataError(f"{field_name} must be one of {', '.join(CORPUS_NAMES)}; got {name!r}")


def load_corpus(
    name: str,
    *,
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    test_file: str | Path | None = None,
    split: Split | list[float] | None = None,
    download: bool = True,
    **options: Any,
) -> Corpus:
    """Load corpus ``name`` as train / valid / test text.

    ``split`` (fractions; None means the source's default, 0.9/0.05/0.05 except
    Tiny Shakespeare's 0.9/0.1) applies to the sources without official splits.
    A 2-tuple or a zero test fraction makes the test split the validation split.
    ``path`` is the file or folder for ``text`` and, optionally, where a
    benchmark's files are; ``*_file`` name split files explicitly. ``data_dir``
    and ``download`` steer the lookup and download of benchmarks. ``options``
    are the settings of the generated ``facts`` corpus (``corpora.facts.load_facts``).
    """
    check_corpus_name(name)
    given = {
        "path": path,
        "train_file": train_file,
        "valid_file": valid_file,
        "test_file": test_file,
        "split": split,
        **options,
    }
    unused = sorted(k for k, v in given.items() if (v is not None or k in options) and k not in _ACCEPTS[name])
    if unused:
        raise DataError(
            f"corpus.{unused[0]} does not apply to the {name!r} corpus "
            f"(it takes: {', '.join(sorted(_ACCEPTS[name]))}, data_dir, download)"
        )
    fractions = check_split(split) if split is not None else DEFAULT_SPLITS.get(name, ())
    files = {"train": train_file, "valid": valid_file, "test": test_file}
    if name == "facts":
        return load_facts(data_dir=data_dir, **options)
    if name == "stdlib":
        return load_stdlib(fractions)
    if name == "text":
        return load_text(path, fractions, train_file, valid_file, test_file)
    if name == "shakespeare":
        return load_shakespeare(fractions, path=path, data_dir=data_dir, download=download)
    if name == "ptb":
        return load_ptb(path=path, data_dir=data_dir, download=download, files=files)
    if name in ("wikitext2", "wikitext103"):
        return load_wikitext(name, path=path, data_dir=data_dir, download=download, files=files)
    return load_hutter(name, fractions, path=path, data_dir=data_dir, download=download)


__all__ = [
    "CORPUS_NAMES",
    "ChecksumError",
    "Corpus",
    "CorpusNotFoundError",
    "EmptyCorpusError",
    "check_corpus_name",
    "load_corpus",
]
