"""Token and tokenizer caches: hits skip the work and give identical results; keys separate what differs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xvariants.data import cache
from xvariants.data.cache import build_tokenizer_cached, encode_cached, token_dtype
from xvariants.data.tokenizers import ByteTokenizer, CharTokenizer, WordTokenizer, tokenizer_from_dict

TEXT = "to be or not to be\nthat is the question\n" * 50


def _refuse(*args, **kwargs):
    raise AssertionError("the cache should have answered without tokenising")


def test_second_encode_is_read_from_cache(tmp_path, monkeypatch):
    tok = CharTokenizer.train(TEXT)
    first = encode_cached(TEXT, tok, tmp_path)
    assert isinstance(first, np.memmap) and first.dtype == np.uint16
    assert first.tolist() == tok.encode(TEXT).tolist()

    again = tokenizer_from_dict(tok.to_dict())  # a new object, as in a new run
    monkeypatch.setattr(again, "encode", _refuse)
    second = encode_cached(TEXT, again, tmp_path)
    assert np.array_equal(first, second)
    assert len(list((tmp_path / "tokens").glob("*.bin"))) == 1


def test_key_depends_on_text_and_tokenizer(tmp_path):
    char = CharTokenizer.train(TEXT)
    encode_cached(TEXT, char, tmp_path)
    encode_cached(TEXT + "x", char, tmp_path)
    encode_cached(TEXT, CharTokenizer.train(TEXT + "Z"), tmp_path)
    encode_cached(TEXT, WordTokenizer.train(TEXT), tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.bin"))) == 4
    assert not list((tmp_path / "tokens").glob(".*"))  # no temporary files left behind


def test_dtype_follows_vocab_size():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    words = " ".join(f"w{i}" for i in range(70_000)) + "\n"
    tok = WordTokenizer.train(words)
    ids = encode_cached(words, tok, tmp_path)
    assert ids.dtype == np.uint32 and int(ids.max()) >= 65536
    assert ids.tolist() == tok.encode(words).tolist()


def test_damaged_entry_is_rebuilt(tmp_path):
    tok = ByteTokenizer()
    encode_cached(TEXT, tok, tmp_path)
    (bin_path,) = (tmp_path / "tokens").glob("*.bin")
    bin_path.write_bytes(b"\x00\x01")  # truncated: size no longer matches the meta
    assert encode_cached(TEXT, tok, tmp_path).tolist() == tok.encode(TEXT).tolist()
    meta = json.loads(bin_path.with_suffix(".json").read_text())
    assert meta["length"] == len(TEXT.encode()) and meta["tokenizer"] == "byte"


def test_tokenizer_is_trained_once(tmp_path, monkeypatch):
    first = build_tokenizer_cached("word", TEXT, tmp_path, min_freq=2)
    monkeypatch.setattr(cache, "build_tokenizer", _refuse)
    second = build_tokenizer_cached("word", TEXT, tmp_path, min_freq=2)
    assert second.to_dict() == first.to_dict()
    with pytest.raises(AssertionError, match="without tokenising"):
        build_tokenizer_cached("word", TEXT, tmp_path, min_freq=1)  # other options: a new entry
