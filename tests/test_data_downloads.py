"""Downloaders, run offline: each source's URL points at a small archive the test builds."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from xvariants.data.corpora import ChecksumError, CorpusNotFoundError, load_corpus
from xvariants.data.corpora import fetch, hutter, ptb, shakespeare, wikitext
from xvariants.data.tokenizers import ByteTokenizer


@pytest.fixture(autouse=True)
def _isolated_lookup(monkeypatch, tmp_path):
    """Nothing but the test's own folders may be searched: no shared data, env dir or real cache."""
    monkeypatch.setattr(fetch, "SHARED_DATA_DIR", tmp_path / "no-shared")
    monkeypatch.delenv("XVARIANTS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.as_uri()


def _tgz(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.as_uri()


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the files are local now; nothing should be downloaded")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_shakespeare_download_then_local(tmp_path, monkeypatch):
    data = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    (tmp_path / "input.txt").write_bytes(data)
    source = dataclasses.replace(
        shakespeare.SOURCE, url=(tmp_path / "input.txt").as_uri(), sha256={"input.txt": _sha(data)}
    )
    monkeypatch.setattr(shakespeare, "SOURCE", source)
    data_dir = tmp_path / "data"
    corpus = load_corpus("shakespeare", data_dir=data_dir)
    assert (data_dir / "shakespeare" / "input.txt").read_bytes() == data
    assert corpus.train + corpus.valid == data.decode()
    _no_network(monkeypatch)
    assert load_corpus("shakespeare", data_dir=data_dir).train == corpus.train


def test_ptb_download_from_tgz(tmp_path, monkeypatch):
    texts = {s: f" a {s} sentence <unk> N \n the end \n".encode() * 10 for s in ("train", "valid", "test")}
    url = _tgz(tmp_path / "simple-examples.tgz", {f"./simple-examples/data/ptb.{s}.txt": t for s, t in texts.items()})
    sums = {f"ptb.{s}.txt": _sha(t) for s, t in texts.items()}
    monkeypatch.setattr(ptb, "SOURCE", dataclasses.replace(ptb.SOURCE, url=url, sha256=sums))
    corpus = load_corpus("ptb", data_dir=tmp_path / "data")
    assert corpus.valid == texts["valid"].decode()
    assert (tmp_path / "data" / "ptb" / "ptb.test.txt").read_bytes() == texts["test"]


@pytest.mark.parametrize("name", ["wikitext2", "wikitext103"])
def test_wikitext_download_from_zip(tmp_path, monkeypatch, name):
    folder = wikitext.FOLDERS[name]
    texts = {s: f" = Heading {s} = \n\n Some @-@ text . \n".encode() for s in ("train", "valid", "test")}
    url = _zip(tmp_path / f"{folder}-v1.zip", {f"{folder}/wiki.{s}.tokens": t for s, t in texts.items()})
    sums = {f"wiki.{s}.tokens": _sha(t) for s, t in texts.items()}
    monkeypatch.setitem(wikitext.SOURCES, name, dataclasses.replace(wikitext.SOURCES[name], url=url, sha256=sums))
    corpus = load_corpus(name, data_dir=tmp_path / "data")
    assert (corpus.train, corpus.test) == (texts["train"].decode(), texts["test"].decode())
    assert sorted(p.name for p in (tmp_path / "data" / name).iterdir()) == sorted(sums)  # archive removed


def test_enwik8_download_keeps_exact_bytes(tmp_path, monkeypatch):
    # Multi-byte characters and invalid UTF-8, so split points may cut through a character.
    data = ("<page>Zürich – 東京</page>\n".encode() + b"\xff\xfe broken \xc3") * 500
    url = _zip(tmp_path / "enwik8.zip", {"enwik8": data})
    source = dataclasses.replace(hutter.SOURCES["enwik8"], url=url, sha256={"enwik8": _sha(data)})
    monkeypatch.setitem(hutter.SOURCES, "enwik8", source)
    corpus = load_corpus("enwik8", data_dir=tmp_path / "data")
    tok = ByteTokenizer()
    parts = [bytes(tok.encode(corpus.split(s)).astype("uint8")) for s in ("train", "valid", "test")]
    n = len(data)
    assert [len(p) for p in parts] == [n * 90 // 100, n * 5 // 100, n - n * 90 // 100 - n * 5 // 100]
    assert b"".join(parts) == data
    assert corpus.meta["bytes"] == {"train": len(parts[0]), "valid": len(parts[1]), "test": len(parts[2])}


def test_text8_download(tmp_path, monkeypatch):
    data = b"anarchism originated as a term of abuse " * 1000
    url = _zip(tmp_path / "text8.zip", {"text8": data})
    monkeypatch.setitem(hutter.SOURCES, "text8", dataclasses.replace(hutter.SOURCES["text8"], url=url))
    corpus = load_corpus("text8", data_dir=tmp_path / "data")
    assert (corpus.train + corpus.valid + corpus.test).encode() == data
    assert len(corpus.valid) == len(data) // 20
    # A file given directly is read without any lookup or download.
    _no_network(monkeypatch)
    direct = load_corpus("text8", path=tmp_path / "data" / "text8" / "text8")
    assert direct.test == corpus.test


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    data = b"some bytes that are not the published file\n" * 10
    url = _zip(tmp_path / "enwik8.zip", {"enwik8": data})
    monkeypatch.setitem(hutter.SOURCES, "enwik8", dataclasses.replace(hutter.SOURCES["enwik8"], url=url))
    with pytest.raises(ChecksumError) as info:
        load_corpus("enwik8", data_dir=tmp_path / "data")
    message = str(info.value)
    assert "checksum mismatch for enwik8" in message and hutter.SOURCES["enwik8"].sha256["enwik8"] in message
    assert _sha(data) in message
    assert list((tmp_path / "data" / "enwik8").iterdir()) == []


def test_offline_error_says_what_to_download_and_where(tmp_path, monkeypatch):
    missing_url = (tmp_path / "unreachable" / "input.txt").as_uri()
    monkeypatch.setattr(shakespeare, "SOURCE", dataclasses.replace(shakespeare.SOURCE, url=missing_url))
    with pytest.raises(CorpusNotFoundError) as info:
        load_corpus("shakespeare", data_dir=tmp_path / "data")
    message = str(info.value)
    assert "Downloading" in message and "failed" in message
    assert f"Download {missing_url}" in message and str(tmp_path / "data" / "shakespeare") in message
    with pytest.raises(CorpusNotFoundError, match="download=False"):
        load_corpus("shakespeare", data_dir=tmp_path / "data", download=False)


def test_archive_without_the_expected_member(tmp_path, monkeypatch):
    url = _zip(tmp_path / "text8.zip", {"other": b"x"})
    monkeypatch.setitem(hutter.SOURCES, "text8", dataclasses.replace(hutter.SOURCES["text8"], url=url))
    with pytest.raises(CorpusNotFoundError, match="no member 'text8'"):
        load_corpus("text8", data_dir=tmp_path / "data")


def test_lookup_order_and_env_dir(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    (env_dir / "ptb").mkdir(parents=True)
    for s in ("train", "valid", "test"):
        (env_dir / "ptb" / f"ptb.{s}.txt").write_text(f"env {s}\n")
    arg_dir.mkdir()
    (arg_dir / "ptb.train.txt").write_text("arg train\n")  # a distinctive name at the data_dir root
    monkeypatch.setenv("XVARIANTS_DATA_DIR", str(env_dir))
    corpus = load_corpus("ptb", data_dir=arg_dir)
    assert (corpus.train, corpus.valid) == ("arg train\n", "env valid\n")
    override = load_corpus("ptb", train_file=env_dir / "ptb" / "ptb.test.txt")
    assert override.train == "env test\n"
