"""Tokenizers: exact round trips, deterministic vocabularies, serialisation, clear errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from xvariants.data.tokenizers import (
    TOKENIZER_NAMES,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)
from xvariants.data.tokenizers import _pieces

TRAIN_TEXT = (
    "the quick brown fox jumps over the lazy dog\n"
    "  the dog sleeps;\tthe fox runs — très vite ☃\n"
    "\n"
    "def f(x):\n    return x * 2  # doubled\n"
) * 20


def test_byte_tokenizer_round_trips_arbitrary_bytes():
    rng = np.random.default_rng(0)
    data = bytes(range(256)) + rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes() + b"\xff\xfe\xc3"
    text = data.decode("utf-8", "surrogateescape")  # as read from a file with surrogateescape
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(data)
    assert tok.decode(ids) == text
    assert tok.decode(ids).encode("utf-8", "surrogateescape") == data
    assert tok.vocab_size == 256 and tok.unit == "byte"


@pytest.mark.parametrize("name", ["char", "word", "bpe"])
def test_trained_tokenizers_round_trip_their_training_text(name):
    options = {"vocab_size": 300} if name == "bpe" else {}
    tok = build_tokenizer(name, TRAIN_TEXT, **options)
    ids = tok.encode(TRAIN_TEXT)
    assert ids.ndim == 1 and ids.dtype in (np.int32, np.int64)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.unit == name
    if name == "word":
        # Words round-trip as ids; the text comes back with whitespace normalised.
        assert tok.encode(tok.decode(ids)).tolist() == ids.tolist()
        expected = "".join(" ".join(line.split()) + "\n" for line in TRAIN_TEXT.split("\n")[:-1])
        assert tok.decode(ids) == expected
    else:
        assert tok.decode(ids) == TRAIN_TEXT


def test_char_tokenizer_vocabulary_and_unknown():
    tok = CharTokenizer.train("banana!")
    assert tok.chars == ["!", "a", "b", "n"]
    assert tok.vocab_size == 5 and tok.unk_id == 4
    assert tok.encode("nab?").tolist() == [3, 1, 2, 4]
    assert tok.decode([3, 1, 4]) == "na<unk>"


def test_char_tokenizer_handles_surrogate_escapes():
    text = b"a\xffb\xfe".decode("utf-8", "surrogateescape")
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == text


def test_word_tokenizer_vocabulary_is_frequency_then_alphabetical():
    tok = WordTokenizer.train("b z c\nc b\nc <unk> a\n")  # z seen before a, ranked after
    assert tok.words == ["<eos>", "<unk>", "c", "b", "a", "z"]
    assert tok.encode("c a\nnever\n").tolist() == [2, 4, 0, 1, 0]
    assert tok.decode([2, 4, 0, 1, 0, 3]) == "c a\n<unk>\nb"
    # A text without a final newline still ends its last line with <eos>.
    assert tok.encode("c a").tolist() == [2, 4, 0]


def test_word_tokenizer_min_freq_and_max_size():
    text = "a a a b b c\n"
    assert WordTokenizer.train(text, min_freq=2).words == ["<eos>", "<unk>", "a", "b"]
    assert WordTokenizer.train(text, max_size=3).words == ["<eos>", "<unk>", "a"]
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer.train(text, min_freq=0)


def test_bpe_tokenizer_respects_vocab_size_and_survives_undecodable_bytes():
    tok = BPETokenizer.train(TRAIN_TEXT, vocab_size=280)
    assert 256 <= tok.vocab_size <= 280
    text = b"the fox \xff runs".decode("utf-8", "surrogateescape")
    assert tok.decode(tok.encode(text)) == "the fox \ufffd runs"


def test_bpe_encoding_in_pieces_equals_encoding_whole():
    long_text = TRAIN_TEXT * 40  # several pieces of the parallel encoder
    tok = BPETokenizer.train(TRAIN_TEXT, vocab_size=300)
    assert len(list(_pieces(long_text))) > 1
    whole = tok._hf.encode(long_text).ids
    assert tok.encode(long_text).tolist() == whole


def _all_tokenizers() -> list[Tokenizer]:
    return [
        ByteTokenizer(),
        build_tokenizer("char", TRAIN_TEXT),
        build_tokenizer("word", TRAIN_TEXT, min_freq=2),
        build_tokenizer("bpe", TRAIN_TEXT, vocab_size=300),
    ]


@pytest.mark.parametrize("tok", _all_tokenizers(), ids=TOKENIZER_NAMES)
def test_serialisation_gives_identical_encodings(tok, tmp_path):
    probe = TRAIN_TEXT + "unseen ✓ words\n"
    expected = tok.encode(probe)

    d = tok.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON values only
    assert tokenizer_from_dict(d).encode(probe).tolist() == expected.tolist()

    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert type(loaded) is type(tok)
    assert loaded.encode(probe).tolist() == expected.tolist()
    assert loaded.vocab_size == tok.vocab_size

    # Checkpoints are loaded with weights_only=True: the dict must survive that.
    buffer = io.BytesIO()
    torch.save({"tokenizer": d}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)["tokenizer"]
    assert tokenizer_from_dict(restored).encode(probe).tolist() == expected.tolist()


def test_unknown_tokenizer_name_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        build_tokenizer("sentencepiece", TRAIN_TEXT)
    message = str(info.value)
    assert "tokenizer.name" in message and "'sentencepiece'" in message
    for name in TOKENIZER_NAMES:
        assert name in message
    with pytest.raises(ValueError, match="tokenizer.name"):
        tokenizer_from_dict({"name": "nope"})


def test_unknown_tokenizer_option_is_refused():
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size .*'char'"):
        build_tokenizer("char", TRAIN_TEXT, vocab_size=10)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        ByteTokenizer().decode([0, 256])
