"""Token spans: offsets agree with encode and with a brute-force walk over decoded tokens, for
every tokenizer kind and Hugging Face tokenizers; partial-token spans and absent subjects are refused."""

from __future__ import annotations

import numpy as np
import pytest

from xvariants.config_errors import DataError
from xvariants.data.spans import (
    SpanError,
    encode_fact,
    encode_with_offsets,
    find_subject,
    span_from_offsets,
    token_span,
)
from xvariants.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, WordTokenizer, build_tokenizer

ASCII = (
    "Talven Morask was born in Lisbon . Talven Morask plays the violin .\n"
    "The favourite colour of Brea Doulith is amber .\n"
    "  indented\twords and  double  spaces\n"
)
NON_ASCII = (
    "Zoë Ångström was born in São Paulo ☃ and likes 🎉 parties .\n"
    "Ünïcødé Ñame speaks Ελληνικά at home — très bien .\n"
)
TRAIN = (ASCII + NON_ASCII) * 30
KINDS = ("byte", "char", "word", "bpe")


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "byte": ByteTokenizer(),
        "char": CharTokenizer.train(TRAIN),
        "word": WordTokenizer.train(TRAIN),
        "bpe": BPETokenizer.train(TRAIN, vocab_size=300, min_frequency=2),
    }


def brute_force_offsets(tok, ids, text: str) -> list[tuple[int, int]]:
    """Decode each token and accumulate lengths (word tokens: skip the whitespace between them;
    ``<eos>`` is the newline or the end of the text). For texts whose tokens decode to their text."""
    pairs, at = [], 0
    for i in ids.tolist():
        if isinstance(tok, WordTokenizer):
            if i == tok.eos_id:
                pairs.append((at, at + 1) if at < len(text) else (at, at))
                at += 1
                continue
            word = tok.decode([i])
            while text[at] in " \t":
                at += 1
        else:
            word = tok.decode([i])
        pairs.append((at, at + len(word)))
        at += len(word)
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", [ASCII, NON_ASCII, ASCII + NON_ASCII.rstrip("\n")], ids=["ascii", "non_ascii", "mixed"])
def test_offsets_give_the_same_ids_and_cover_the_text(tokenizers, kind, text):
    tok = tokenizers[kind]
    ids, offsets = encode_with_offsets(tok, text)
    assert ids.tolist() == tok.encode(text).tolist()
    assert offsets.shape == (len(ids), 2)
    assert (offsets[:, 0] <= offsets[:, 1]).all() and (np.diff(offsets[:, 0]) >= 0).all()
    assert offsets.min() >= 0 and offsets.max() <= len(text)
    covered = np.zeros(len(text), bool)
    for a, b in offsets.tolist():
        covered[a:b] = True
    uncovered = {text[i] for i in np.flatnonzero(~covered)}
    assert uncovered <= ({" ", "\t"} if kind == "word" else set())


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe"])
def test_offsets_agree_with_brute_force_on_ascii(tokenizers, kind):
    tok = tokenizers[kind]
    ids, offsets = encode_with_offsets(tok, ASCII)
    assert [tuple(p) for p in offsets.tolist()] == brute_force_offsets(tok, ids, ASCII)


@pytest.mark.parametrize("kind", ["char", "word"])
def test_offsets_agree_with_brute_force_on_non_ascii(tokenizers, kind):
    tok = tokenizers[kind]
    ids, offsets = encode_with_offsets(tok, NON_ASCII)
    assert [tuple(p) for p in offsets.tolist()] == brute_force_offsets(tok, ids, NON_ASCII)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_non_ascii_prefixes_decode_to_the_text_up_to_the_offset(tokenizers, kind):
    """Byte-level tokens may hold part of a character; wherever a token ends on a character
    boundary (the next token starts after it), decoding the prefix gives the text up to its end."""
    tok = tokenizers[kind]
    text = ASCII + NON_ASCII
    ids, offsets = encode_with_offsets(tok, text)
    checked = 0
    for i in range(len(ids) - 1):
        if offsets[i][1] <= offsets[i + 1][0]:
            assert tok.decode(ids[: i + 1]) == text[: offsets[i][1]]
            checked += 1
    assert checked > len(ids) // 2
    multi = [c for c, n in zip(*np.unique(offsets[:, 0], return_counts=True)) if n > 1]
    if kind == "byte":  # every byte of a multi-byte character maps to the whole character
        assert {text[c] for c in multi} == {c for c in text if len(c.encode()) > 1}


def test_byte_offsets_of_surrogate_escapes_and_astral_characters():
    text = b"a\xffb\xf0\x9f\x8e\x89c".decode("utf-8", "surrogateescape")
    ids, offsets = encode_with_offsets(ByteTokenizer(), text)
    assert ids.tolist() == list(b"a\xffb\xf0\x9f\x8e\x89c")
    assert offsets.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [3, 4], [3, 4], [3, 4], [4, 5]]


def test_word_offsets_follow_str_split_on_unusual_whitespace():
    text = "alpha\u00a0beta\x1cgamma\u2028delta\r\nend"
    tok = WordTokenizer.train(text)
    ids, offsets = encode_with_offsets(tok, text)
    assert ids.tolist() == tok.encode(text).tolist()
    words = [text[a:b] for (a, b), i in zip(offsets.tolist(), ids.tolist()) if i != tok.eos_id]
    assert words == [w for line in text.split("\n") for w in line.split()]
    assert offsets[-1].tolist() == [len(text), len(text)]  # <eos> of the unterminated last line


def test_bpe_offsets_of_a_text_encoded_in_pieces(tokenizers):
    tok = tokenizers["bpe"]
    text = (ASCII + NON_ASCII) * 500  # > 64K characters: encode() cuts it into pieces
    assert len(text) > 1 << 16
    ids, offsets = encode_with_offsets(tok, text)
    assert ids.tolist() == tok.encode(text).tolist()
    span = find_subject(tok, text[-len(NON_ASCII):], "Ünïcødé Ñame")
    far = span_from_offsets(text, offsets, len(text) - len(NON_ASCII) + NON_ASCII.index("Ünïcødé"),
                            len(text) - len(NON_ASCII) + NON_ASCII.index(" speaks"))
    assert far[1] - far[0] == span[1] - span[0]
    assert tok.decode(ids[far[0]:far[1]]).strip() == "Ünïcødé Ñame"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("subject", ["Talven Morask", "Zoë Ångström", "Ünïcødé Ñame", "Ελληνικά"])
def test_find_subject_round_trips(tokenizers, kind, subject):
    tok = tokenizers[kind]
    text = ASCII + NON_ASCII
    start, end = find_subject(tok, text, subject)
    ids, offsets = encode_with_offsets(tok, text)
    assert text[offsets[start][0]:offsets[end - 1][1]].strip() == subject
    if kind != "word":
        assert tok.decode(ids[start:end]).strip() == subject


def test_find_subject_takes_the_first_occurrence(tokenizers):
    tok = tokenizers["word"]
    assert find_subject(tok, "Talven Morask met Talven Morask", "Talven Morask") == (0, 2)


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_a_span_that_cuts_a_token_is_refused_naming_the_token(tokenizers, kind):
    tok = tokenizers[kind]
    text = ASCII
    _, offsets = encode_with_offsets(tok, text)
    i = next(i for i, (a, b) in enumerate(offsets.tolist()) if len(text[a:b].strip()) >= 3)
    a, b = offsets[i].tolist()
    a += len(text[a:b]) - len(text[a:b].lstrip())
    with pytest.raises(SpanError, match=f"token {i} ") as err:
        token_span(tok, text, a, a + 1)
    assert repr(text[offsets[i][0]:b]) in str(err.value)


def test_bad_spans_and_missing_subjects_have_one_clear_message(tokenizers):
    tok = tokenizers["char"]
    with pytest.raises(SpanError, match="not a non-empty span"):
        token_span(tok, "abc", 2, 9)
    with pytest.raises(SpanError, match="not a non-empty span"):
        token_span(tok, "abc", 2, 2)
    with pytest.raises(SpanError, match="does not occur in the prompt"):
        find_subject(tok, "Talven Morask was born in", "Brea Doulith")
    with pytest.raises(SpanError, match="holds no token"):
        token_span(tokenizers["word"], "a  b", 1, 3)
    assert issubclass(SpanError, DataError)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_fact_gives_context_subject_and_first_answer_token(tokenizers, kind):
    tok = tokenizers[kind]
    prompt, subject, answer = "The favourite colour of Brea Doulith is", "Brea Doulith", "amber"
    fact = encode_fact(tok, prompt, subject, answer)
    whole = tok.decode(fact.ids.tolist() + [fact.answer_id])
    if kind == "word":
        assert fact.ids.tolist() == tok.encode(prompt).tolist()[:-1]  # without the line's <eos>
        assert tok.decode([fact.answer_id]) == "amber"
    else:
        assert (prompt + " " + answer).startswith(whole) and len(whole) > len(prompt)
        assert tok.decode([fact.answer_id]).strip()[:1] == "a"
    assert tok.decode(fact.ids[fact.subject[0]:fact.subject[1]]).strip() == subject
    bare = encode_fact(tok, prompt, subject)
    assert bare.answer_id is None and bare.subject == fact.subject
    assert bare.ids.tolist() == fact.ids.tolist()[: len(bare.ids)]


class _Glued:
    """A stand-in ``tokenizers.Tokenizer`` whose last token joins the prompt's end to the answer."""

    def get_vocab_size(self):
        return 2

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def encode(self, text, add_special_tokens=True):
        from types import SimpleNamespace

        return SimpleNamespace(ids=[0, 1], offsets=[(0, len(text) - 3), (len(text) - 3, len(text))])


def test_encode_fact_refuses_an_answer_glued_to_the_prompt(tokenizers):
    with pytest.raises(SpanError, match="joins the end of the prompt"):
        encode_fact(_Glued(), "Talven Morask was born in", "Talven", "X")
    with pytest.raises(SpanError, match="does not occur"):
        encode_fact(tokenizers["word"], "Talven Morask was born in", "Brea", "Lisbon")


def _gpt2_style(bpe: BPETokenizer, trim: bool):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = HFTokenizer.from_str(bpe.to_dict()["hf_tokenizer"])
    hf.post_processor = processors.ByteLevel(trim_offsets=trim)
    return hf


@pytest.mark.parametrize("trim", [False, True])
def test_hugging_face_tokenizers_map_spans_with_their_offsets(tokenizers, trim):
    hf = _gpt2_style(tokenizers["bpe"], trim)
    text = ASCII + NON_ASCII
    ids, _ = encode_with_offsets(hf, text)
    assert ids.tolist() == hf.encode(text).ids
    start, end = find_subject(hf, text, "Zoë Ångström")
    assert hf.decode(ids[start:end].tolist()).strip() == "Zoë Ångström"
    fact = encode_fact(hf, "The favourite colour of Brea Doulith is", "Brea Doulith", "amber")
    assert hf.decode([fact.answer_id]).strip().startswith("a")


def test_transformers_fast_tokenizers_use_the_offsets_mapping(tokenizers):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (interpret extra)")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_gpt2_style(tokenizers["bpe"], True))
    text = ASCII + NON_ASCII
    ids, _ = encode_with_offsets(fast, text)
    assert ids.tolist() == fast(text)["input_ids"]
    start, end = find_subject(fast, text, "Ünïcødé Ñame")
    assert fast.decode(ids[start:end].tolist()).strip() == "Ünïcødé Ñame"

    class Slow:
        is_fast = False

    with pytest.raises(DataError, match="no character offsets"):
        encode_with_offsets(Slow(), text)


def test_every_built_tokenizer_kind_has_offsets():
    for name in KINDS:
        tok = build_tokenizer(name, TRAIN, **({"vocab_size": 300} if name == "bpe" else {}))
        assert len(encode_with_offsets(tok, "Talven Morask")[0]) == len(tok.encode("Talven Morask"))
