"""Corpora without downloads: the stdlib default, the user's text, and argument checking."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xvariants.data.corpora import (
    CORPUS_NAMES,
    CorpusNotFoundError,
    EmptyCorpusError,
    load_corpus,
)
from xvariants.data.corpora.base import DOCUMENT_HEADER
from xvariants.data.corpora.stdlib import assign_split

HEADER = re.compile("^" + re.escape(DOCUMENT_HEADER.split("{")[0]) + "(.+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus("stdlib")


def test_stdlib_is_deterministic(stdlib):
    again = load_corpus("stdlib")
    assert (again.train, again.valid, again.test) == (stdlib.train, stdlib.valid, stdlib.test)
    assert again.meta == stdlib.meta


def test_stdlib_is_identical_in_another_process(stdlib):
    """Another interpreter, with another string-hash salt, must build the very same splits."""
    script = (
        "import hashlib; from xvariants.data.corpora import load_corpus; c = load_corpus('stdlib'); "
        "print(*(hashlib.sha256(c.split(s).encode('utf-8', 'surrogateescape')).hexdigest() "
        "for s in ('train', 'valid', 'test')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    here = [hashlib.sha256(stdlib.split(s).encode("utf-8", "surrogateescape")).hexdigest() for s in ("train", "valid", "test")]
    assert result.stdout.split() == here


def test_stdlib_splits_by_file(stdlib):
    files = {s: HEADER.findall(stdlib.split(s)) for s in ("train", "valid", "test")}
    assert {s: len(f) for s, f in files.items()} == stdlib.meta["files"]
    assert all(files.values())
    assert not set(files["train"]) & set(files["valid"])
    assert not set(files["train"]) & set(files["test"])
    assert not set(files["valid"]) & set(files["test"])
    for split, names in files.items():
        assert names == sorted(names)
        assert all(assign_split(name, (0.9, 0.05, 0.05)) == split for name in names)
    every = files["train"] + files["valid"] + files["test"]
    assert "os.py" in every
    assert not [f for f in every if "site-packages" in f or "dist-packages" in f]
    # roughly 90 / 5 / 5 of the files
    assert 0.85 < len(files["train"]) / len(every) < 0.95


def test_stdlib_meta_records_the_python_version(stdlib):
    assert stdlib.meta["python_version"] == sys.version
    assert stdlib.meta["source"] == "stdlib"
    assert stdlib.meta["chars"]["train"] == len(stdlib.train)
    assert "train=" in repr(stdlib) and len(repr(stdlib)) < 200  # never prints the text


def test_text_file_splits_by_character_position(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    (tmp_path / "book.txt").write_text(text)
    corpus = load_corpus("text", path=tmp_path / "book.txt")
    assert (corpus.train, corpus.valid, corpus.test) == (text[:900], text[900:950], text[950:])
    assert corpus.meta["test_is_valid"] is False

    two = load_corpus("text", path=tmp_path / "book.txt", split=(0.8, 0.2))
    assert two.valid == text[800:] and two.test is two.valid and two.meta["test_is_valid"] is True
    zero = load_corpus("text", path=tmp_path / "book.txt", split=(0.7, 0.3, 0.0))
    assert zero.test == zero.valid == text[700:] and zero.meta["test_is_valid"] is True


def test_text_file_keeps_undecodable_bytes(tmp_path):
    data = b"abc\xff\xfe" * 100
    (tmp_path / "raw.bin").write_bytes(data)
    corpus = load_corpus("text", path=tmp_path / "raw.bin")
    joined = corpus.train + corpus.valid + corpus.test
    assert joined.encode("utf-8", "surrogateescape") == data


def test_text_folder_joins_text_files_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second document\n" * 20)
    (tmp_path / "a.txt").write_text("first document\n" * 20)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00binary")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "empty.txt").write_text("")
    corpus = load_corpus("text", path=tmp_path)
    joined = corpus.train + corpus.valid + corpus.test
    assert HEADER.findall(joined) == ["a.txt", "b/two.md"]
    assert "hidden" not in joined and "PNG" not in joined
    assert joined.index("first document") < joined.index("second document")


def test_text_explicit_files(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(f"{split} text\n")
    corpus = load_corpus(
        "text",
        train_file=tmp_path / "train.txt",
        valid_file=tmp_path / "valid.txt",
        test_file=tmp_path / "test.txt",
    )
    assert (corpus.train, corpus.valid, corpus.test) == ("train text\n", "valid text\n", "test text\n")
    no_test = load_corpus("text", train_file=tmp_path / "train.txt", valid_file=tmp_path / "valid.txt")
    assert no_test.test == no_test.valid and no_test.meta["test_is_valid"] is True


def test_text_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="not found: .*nowhere.txt"):
        load_corpus("text", path=tmp_path / "nowhere.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmptyCorpusError, match="empty: .*empty.txt"):
        load_corpus("text", path=tmp_path / "empty.txt")
    folder = tmp_path / "binaries"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(EmptyCorpusError, match="no non-empty UTF-8 text file"):
        load_corpus("text", path=folder)
    with pytest.raises(EmptyCorpusError, match="empty"):
        load_corpus("text", train_file=tmp_path / "empty.txt", valid_file=tmp_path / "empty.txt")
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(EmptyCorpusError, match="split of .*tiny.txt is empty"):
        load_corpus("text", path=tmp_path / "tiny.txt")
    with pytest.raises(ValueError, match="corpus.path"):
        load_corpus("text")


def test_load_corpus_argument_errors(tmp_path):
    with pytest.raises(ValueError) as info:
        load_corpus("wikipedia")
    assert "corpus.name" in str(info.value) and all(n in str(info.value) for n in CORPUS_NAMES)
    with pytest.raises(ValueError, match="corpus.path does not apply to the 'stdlib'"):
        load_corpus("stdlib", path=tmp_path)
    with pytest.raises(ValueError, match="corpus.split .*sum to 1"):
        load_corpus("text", path=tmp_path, split=(0.9, 0.2))
    with pytest.raises(ValueError, match="corpus.split .*2 or 3"):
        load_corpus("text", path=tmp_path, split=(1.0,))
