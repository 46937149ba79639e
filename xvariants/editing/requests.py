"""Edit requests and how their prompts become token ids.

A request says: in ``prompt`` (a template with ``{}`` where the subject goes), the subject
``subject`` should now be followed by ``target_new`` instead of ``target_true``. Prompts are
encoded as text, like the original code (``prefix + prompt.format(subject)``), so every
tokenizer the project knows works (word, byte, char, our BPE, Hugging Face fast tokenizers);
the subject's tokens come from character offsets (:mod:`xvariants.data.spans`), never from
re-tokenising pieces. A target continues its prompt after one space and may be several tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xvariants.data.spans import SpanError, _core, encode_with_offsets, span_from_offsets

SLOT = "{}"


class EditError(ValueError):
    """A request, layer or model that cannot be edited; raised before any weight changes."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite.

    :param prompt: template with one ``{}`` for the subject (``"{} was born in"``); a plain
        prompt that contains ``subject`` is accepted and its first occurrence becomes the slot.
    :param subject: the subject text.
    :param target_new: the object the edited model should produce.
    :param target_true: the object the model knew (optional; needed by the metrics).
    :param case_id: the record's id, if it came from a CounterFact-style file.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditError("request: the subject is empty")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EditError("request: target_new is empty")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditError(
                f"request: target_new {self.target_new!r} equals target_true; an edit must change the object"
            )
        count = self.prompt.count(SLOT)
        if count > 1:
            raise EditError(f"request: the prompt {self.prompt!r} has {count} '{{}}' slots; write exactly one")
        if count == 0:
            if self.subject not in self.prompt:
                raise EditError(
                    f"request: subject {self.subject!r} is not in the prompt {self.prompt!r}; write the prompt "
                    "with '{}' where the subject goes, or include the subject"
                )
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, SLOT, 1))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EditRequest:
        """The request of a CounterFact-style record (``requested_rewrite`` with ``prompt``,
        ``subject``, ``target_new.str``, ``target_true.str``)."""
        try:
            rw = record["requested_rewrite"]
            return cls(rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"],
                       record.get("case_id"))
        except (KeyError, TypeError) as e:
            raise EditError(f"record: not a CounterFact-style record (missing {e})") from None

    def text(self, prefix: str = "") -> str:
        """The prompt with the subject filled in, after ``prefix``."""
        return prefix + self.prompt.replace(SLOT, self.subject, 1)

    def subject_at(self, prefix: str = "") -> int:
        """Character index of the subject in :meth:`text` (the slot, not an earlier repeat)."""
        return len(prefix) + self.prompt.index(SLOT)


@dataclass(frozen=True)
class Encoded:
    """A prompt as token ids.

    :param ids: the prompt's tokens (a special token the tokenizer adds first is kept).
    :param target: the target's tokens (empty without a target).
    :param lookup: index of the subject's last token in ``ids`` (None without a subject).
    """

    ids: tuple[int, ...]
    target: tuple[int, ...] = ()
    lookup: int | None = None

    def teacher_forced(self) -> tuple[list[int], list[int]]:
        """``(input ids, positions)``: prompt + target without its last token, and the positions
        whose next-token distributions score the target tokens, in order."""
        n = len(self.ids)
        return list(self.ids) + list(self.target[:-1]), list(range(n - 1, n - 1 + len(self.target)))


def teacher_forced_batch(encs: Sequence[Encoded]) -> tuple[list[list[int]], list[int], list[int], list[int]]:
    """``(sequences, rows, positions, target ids)`` for scoring every target token of ``encs`` in
    one padded batch: target token k sits at ``(rows[k], positions[k])``."""
    seqs: list[list[int]] = []
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, enc in enumerate(encs):
        ids, positions = enc.teacher_forced()
        seqs.append(ids)
        rows += [i] * len(positions)
        cols += positions
        targets += list(enc.target)
    return seqs, rows, cols, targets


def encode(tokenizer: Any, text: str, *, subject: tuple[int, int] | None = None, target: str | None = None) -> Encoded:
    """Encode ``text`` (optionally followed by one space and ``target``).

    :param subject: ``(char_start, char_end)`` of the subject in ``text``; its last token is
        ``lookup``. A subject that cuts a token raises :class:`EditError` (naming the token).
    :param target: the continuation whose tokens are returned apart; a token that joins the
        end of ``text`` to the target raises :class:`EditError`, and so does a target the
        tokenizer only knows as its unknown token.
    """
    target_at = None
    full = text
    if target is not None:
        sep = "" if not text or text[-1].isspace() else " "
        target_at = len(text) + len(sep) + len(target) - len(target.lstrip())
        full = text + sep + target.strip()
    ids, offsets = encode_with_offsets(tokenizer, full)
    ids, offsets = [int(i) for i in ids], offsets.tolist()
    while offsets and offsets[-1][0] == offsets[-1][1] == len(full) and len(full) > 0:
        ids.pop()  # tokens that encode nothing at the very end (the word tokenizer's <eos>)
        offsets.pop()
    n_prompt = len(ids)
    if target_at is not None:
        first = [i for i, (a, b) in enumerate(offsets) if b > target_at and a != b]
        if not first:
            raise EditError(f"target {target!r} gives no token after the prompt {text!r}")
        n_prompt = first[0]
        a, b = offsets[n_prompt]
        if _core(full, a, b)[0] < target_at:
            raise EditError(f"token {full[a:b]!r} joins the end of the prompt {text!r} to the target {target!r}")
        unk = getattr(tokenizer, "unk_id", None)
        if unk is None:
            unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and int(unk) in ids[n_prompt:]:
            raise EditError(f"target {target!r} is not in the tokenizer's vocabulary (it encodes to the unknown token)")
    lookup = None
    if subject is not None:
        try:
            _, end = span_from_offsets(full, offsets[:n_prompt] if n_prompt else offsets, *subject)
        except SpanError as e:
            raise EditError(f"subject: {e}") from None
        lookup = end - 1
    return Encoded(tuple(ids[:n_prompt]), tuple(ids[n_prompt:]), lookup)


def encode_request(tokenizer: Any, request: EditRequest, prefix: str = "", *, target: str | None = None) -> Encoded:
    """:func:`encode` of ``prefix + request.text()`` with the subject's slot located."""
    at = request.subject_at(prefix)
    return encode(tokenizer, request.text(prefix), subject=(at, at + len(request.subject)), target=target)
