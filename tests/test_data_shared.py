"""The real corpora in ``<repo_root>/../shared/data``: loaders find them and match published facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from xvariants.data.corpora import CorpusNotFoundError, load_corpus
from xvariants.data.corpora.fetch import SHARED_DATA_DIR
from xvariants.data.tokenizers import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared(relative: str) -> Path:
    path = REPO_ROOT.parent / "shared" / "data" / relative
    if not path.is_file():
        pytest.skip(f"shared corpus file {path} is absent (the project's shared/ folder is not beside the repo)")
    return path


@pytest.fixture(autouse=True)
def _only_shared_lookup(monkeypatch, tmp_path):
    """Keep a user's data dir or download cache from standing in for the shared files."""
    monkeypatch.delenv("XVARIANTS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_lookup_points_at_shared_beside_the_repo():
    assert SHARED_DATA_DIR == REPO_ROOT.parent / "shared" / "data"


def test_tiny_shakespeare(tmp_path):
    path = _shared("tinyshakespeare.txt")
    corpus = load_corpus("shakespeare", download=False)
    assert Path(corpus.meta["path"]) == path.resolve()
    text = corpus.train + corpus.valid
    assert len(text) == 1_115_394
    assert len(set(text)) == 65
    assert len(corpus.train) == 1_003_854  # nanoGPT's int(n * 0.9)
    assert corpus.test == corpus.valid and corpus.meta["test_is_valid"] is True
    tok = build_tokenizer("char", corpus.train)
    assert tok.vocab_size == 65 + 1  # + <unk>
    assert tok.decode(tok.encode(corpus.valid)) == corpus.valid
    # The same file through the generic text source, and through an explicit path.
    assert load_corpus("shakespeare", path=path, download=False).train == corpus.train
    assert load_corpus("text", path=path, split=(0.9, 0.1)).train == corpus.train


def test_penn_treebank():
    _shared("ptb/ptb.train.txt")
    corpus = load_corpus("ptb", download=False)
    assert corpus.meta["test_is_valid"] is False
    tok = build_tokenizer("word", corpus.train)
    assert tok.vocab_size == 10_000  # 9,999 words incl. <unk>, plus <eos>
    counts = {s: len(tok.encode(corpus.split(s))) for s in ("train", "valid", "test")}
    assert counts == {"train": 929_589, "valid": 73_760, "test": 82_430}  # words + <eos>, as Transformer-XL
    lines = corpus.train.count("\n")
    assert counts["train"] - lines == 887_521
    assert (tok.encode(corpus.valid) == tok.unk_id).sum() == corpus.valid.split().count("<unk>")


def test_wikitext2_valid_and_test_via_text_source():
    valid, test = _shared("wikitext-2/valid.txt"), _shared("wikitext-2/test.txt")
    corpus = load_corpus("text", train_file=valid, valid_file=valid, test_file=test)
    assert corpus.valid.count("\n") == 3_760 and corpus.test.count("\n") == 4_358
    tok = build_tokenizer("word", corpus.valid)
    assert tok.decode(tok.encode(corpus.test)).count("\n") == 4_358


def test_wikitext2_without_train_split_fails_clearly():
    _shared("wikitext-2/valid.txt")
    with pytest.raises(CorpusNotFoundError) as info:
        load_corpus("wikitext2", download=False)
    message = str(info.value)
    assert "wiki.train.tokens" in message and "wikitext-2-v1.zip" in message
    assert "wiki.valid.tokens" not in message.split("Looked in")[0]  # only the missing file is named
