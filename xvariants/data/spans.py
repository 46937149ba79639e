"""Character spans of a text <-> token ranges, for every tokenizer the project uses.

Causal tracing corrupts exactly the subject's tokens, so it needs to know which tokens a
character span (the subject inside a prompt) occupies. ``encode_with_offsets`` gives, for
each token of ``tokenizer.encode(text)`` (the very same ids), the ``[start, end)`` characters
of ``text`` it encodes:

- byte: every byte of a multi-byte UTF-8 character maps to that whole character;
- char: token ``i`` is character ``i``;
- word: a word's characters; a line's ``<eos>`` is its ``"\\n"``, or the empty span at the
  end of the text for an unterminated last line (``WordTokenizer.encode`` adds one there);
- bpe (our byte-level BPE) and Hugging Face tokenizers: the ``tokenizers`` library's offsets
  (a token carrying part of a multi-byte character maps to that whole character; special
  tokens it adds, e.g. a BOS, are empty spans).

``token_span`` turns a character span into a token range and refuses a span that cuts a
token (naming it). Whitespace at a token's edges does not count as its content, so the
subject ``Paris`` owns the GPT-2-style token ``" Paris"``. ``find_subject`` looks the
subject up by text; ``encode_fact`` gives what a trace needs: the context ids, the subject's
range and the answer's first token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from xvariants.config_errors import DataError

from .tokenizers import ID_DTYPE, BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, WordTokenizer, _lines, _pieces

_WORD = re.compile(r"\S+")  # re's \s is str.isspace, the same set str.split() splits on


class SpanError(DataError):
    """A character span that is not a whole number of tokens, or not in the text."""


def _offsets_array(pairs: Any) -> np.ndarray:
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _byte_offsets(text: str) -> np.ndarray:
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    # bytes per character in UTF-8; a surrogate escape (U+DC80..U+DCFF) is one raw byte
    width = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    width[(points >= 0xDC80) & (points <= 0xDCFF)] = 1
    chars = np.repeat(np.arange(len(points)), width)
    return np.stack([chars, chars + 1], axis=1)


def _word_offsets(text: str) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    start = 0
    for line in _lines(text):
        pairs.extend((start + m.start(), start + m.end()) for m in _WORD.finditer(line))
        end = start + len(line)
        pairs.append((end, end + 1) if end < len(text) else (end, end))
        start = end + 1
    return pairs


def _hf_encoding_offsets(hf: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """A ``tokenizers.Tokenizer`` or a fast ``transformers`` tokenizer: ids and char offsets."""
    if hasattr(hf, "encode_batch") and hasattr(hf, "get_vocab_size"):  # tokenizers.Tokenizer
        encoding = hf.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    if not getattr(hf, "is_fast", False):
        raise DataError(
            f"{type(hf).__name__} gives no character offsets; load the fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True)) to map spans to tokens"
        )
    out = hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]


def encode_with_offsets(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, offsets)``: ``ids`` equal ``tokenizer.encode(text)``; ``offsets[i] = (start, end)``
    are the characters of ``text`` token ``i`` encodes (see the module docstring per kind).

    :param tokenizer: an xvariants ``Tokenizer`` (byte, char, word, bpe), a
        ``tokenizers.Tokenizer`` or a fast ``transformers`` tokenizer.
    :param add_special_tokens: Hugging Face tokenizers only: add BOS/EOS as ``tokenizer(text)`` does.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text), _byte_offsets(text)
    if isinstance(tokenizer, CharTokenizer):
        n = len(text)
        return tokenizer.encode(text), np.stack([np.arange(n), np.arange(n) + 1], axis=1).astype(np.int64)
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.encode(text), _offsets_array(_word_offsets(text))
    if isinstance(tokenizer, BPETokenizer):
        # the same pieces encode() uses; U+FFFD stands in for a surrogate escape, one char for one
        ids: list[int] = []
        pairs: list[tuple[int, int]] = []
        start = 0
        for piece in _pieces(BPETokenizer._valid_unicode(text)):
            encoding = tokenizer.hf_tokenizer.encode(piece)
            ids.extend(encoding.ids)
            pairs.extend((start + a, start + b) for a, b in encoding.offsets)
            start += len(piece)
        return np.asarray(ids, dtype=ID_DTYPE), _offsets_array(pairs)
    if isinstance(tokenizer, Tokenizer):
        raise DataError(f"no character offsets for the {tokenizer.name!r} tokenizer")
    ids, pairs = _hf_encoding_offsets(tokenizer, text, add_special_tokens)
    return np.asarray(ids, dtype=np.int64), _offsets_array(pairs)


def _core(text: str, start: int, end: int) -> tuple[int, int]:
    """A token's characters without the whitespace at its edges (whitespace-only tokens keep all)."""
    piece = text[start:end]
    stripped = piece.strip()
    if not stripped:
        return start, end
    lead = len(piece) - len(piece.lstrip())
    return start + lead, start + lead + len(stripped)


def span_from_offsets(text: str, offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int]:
    """The token range ``[tok_start, tok_end)`` of characters ``[char_start, char_end)``.

    A token belongs to the span when its content (``_core``) lies inside it, is outside when
    the two do not meet; anything else is a cut token and raises ``SpanError`` naming it.
    An empty token belongs only when it sits strictly inside the span.
    """
    if not (0 <= char_start < char_end <= len(text)):
        raise SpanError(
            f"character span [{char_start}, {char_end}) is not a non-empty span of the text "
            f"({len(text)} characters)"
        )
    inside: list[int] = []
    for i, (a, b) in enumerate(np.asarray(offsets).tolist()):
        c0, c1 = _core(text, a, b)
        if c0 == c1:
            if char_start < c0 < char_end:
                inside.append(i)
        elif char_start <= c0 and c1 <= char_end:
            inside.append(i)
        elif c1 > char_start and c0 < char_end:
            raise SpanError(
                f"character span [{char_start}, {char_end}) {text[char_start:char_end]!r} covers part of "
                f"token {i} {text[a:b]!r} (characters [{a}, {b})); a span must start and end on token "
                "boundaries"
            )
    if not inside:
        raise SpanError(f"character span [{char_start}, {char_end}) {text[char_start:char_end]!r} holds no token")
    if inside != list(range(inside[0], inside[-1] + 1)):
        raise SpanError(f"the tokens of character span [{char_start}, {char_end}) are not contiguous: {inside}")
    return inside[0], inside[-1] + 1


def token_span(tokenizer: Any, text: str, char_start: int, char_end: int) -> tuple[int, int]:
    """The token range ``[tok_start, tok_end)`` (indices into ``encode_with_offsets(text)``) of
    characters ``[char_start, char_end)``; ``SpanError`` if the span cuts a token or is not in the text."""
    _, offsets = encode_with_offsets(tokenizer, text)
    return span_from_offsets(text, offsets, char_start, char_end)


def subject_chars(prompt: str, subject: str) -> tuple[int, int]:
    """Characters of the first occurrence of ``subject`` in ``prompt`` (as ROME's
    ``find_token_range``, which uses ``str.index``)."""
    if not subject:
        raise SpanError("the subject is empty")
    at = prompt.find(subject)
    if at < 0:
        raise SpanError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    return at, at + len(subject)


def find_subject(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token range of the first occurrence of ``subject`` in ``prompt``.

    Unlike ROME's ``find_token_range``, which widens a span to whole tokens, a subject that
    covers part of a token is refused (``SpanError``): corrupting half a word is not what
    the user asked for.
    """
    return token_span(tokenizer, prompt, *subject_chars(prompt, subject))


@dataclass(frozen=True)
class FactTokens:
    """A prompt ready for next-token tracing.

    ``ids``: the context, i.e. every token before the answer's first token (the word
    tokenizer's trailing ``<eos>`` is not part of it); ``offsets``: their characters in
    ``text``; ``subject``: token range of the subject in ``ids``; ``answer_id``: the answer's
    first token, the one causal tracing scores (None when no answer was given).
    """

    text: str
    ids: np.ndarray
    offsets: np.ndarray
    subject: tuple[int, int]
    answer_id: int | None


def encode_fact(tokenizer: Any, prompt: str, subject: str, answer: str | None = None) -> FactTokens:
    """Encode ``prompt`` (the text stops right before the answer, as in the known-facts file)
    and locate ``subject`` in it and ``answer``'s first token after it.

    The answer continues the prompt after one space (none when the prompt ends in whitespace),
    so the first answer token is tokenizer-specific but exact: ``" Paris"`` for GPT-2-style
    BPE, ``Paris`` for the word tokenizer, ``P`` for char/byte (the context then ends in the
    space). Raises ``SpanError`` when the subject is missing or cuts a token.
    """
    chars = subject_chars(prompt, subject)
    if answer is None:
        text = prompt
        ids, offsets = encode_with_offsets(tokenizer, text)
        keep = len(ids)
        while keep and offsets[keep - 1][0] == offsets[keep - 1][1] == len(text):
            keep -= 1  # tokens that encode nothing at the very end: the word tokenizer's <eos>
        answer_id = None
    else:
        if not answer.strip():
            raise SpanError("the answer is empty")
        sep = "" if not prompt or prompt[-1].isspace() else " "
        answer_at = len(prompt) + len(sep) + len(answer) - len(answer.lstrip())
        text = prompt + sep + answer
        ids, offsets = encode_with_offsets(tokenizer, text)
        first = [i for i, (a, b) in enumerate(offsets.tolist()) if b > answer_at and a != b]
        if not first:
            raise SpanError(f"the answer {answer!r} gives no token after the prompt {prompt!r}")
        keep, answer_id = first[0], int(ids[first[0]])
        a, b = offsets[keep].tolist()
        if _core(text, a, b)[0] < answer_at:
            raise SpanError(
                f"token {keep} {text[a:b]!r} joins the end of the prompt {prompt!r} to the answer "
                f"{answer!r}; the answer's first token must start after the prompt"
            )
    span = span_from_offsets(text, offsets, *chars)
    if span[1] > keep:
        raise SpanError(f"subject {subject!r} runs into the answer's first token in {text!r}")
    return FactTokens(text, np.asarray(ids[:keep]), np.asarray(offsets[:keep]), span, answer_id)
