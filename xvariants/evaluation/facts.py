"""Fact accuracy: does a model complete a known-facts prompt with its object?

A fact counts as known when the model's greedy next token after the prompt is the answer's
first token (``xvariants.data.spans.encode_fact``: exact for every tokenizer), which is the
test causal tracing applies before it traces a fact. Prompts of equal token length run as
one batch, so a thousand prompts cost a few dozen forward passes and no padding enters the
model (padding would be one more thing for the universal bodies' halting to see).

The known-facts file (``known_facts.json`` of the ``facts`` corpus) splits its prompts into
``train`` templates (written into the training text) and ``heldout`` paraphrase templates
(never seen), so the two accuracies say memorised vs generalised.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvariants.data.spans import encode_fact
from xvariants.modes import eval_modes


@dataclass
class SplitAccuracy:
    """Accuracy of one split: ``correct`` of ``n`` prompts, with a 95% Wilson interval."""

    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        # Wilson, not the normal approximation: accuracies here sit near 1, where the latter
        # gives intervals past 100%
        if not self.n:
            return (float("nan"), float("nan"))
        p, n = self.accuracy, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (max(0.0, centre - half), min(1.0, centre + half))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci95": [lo, hi]}


@dataclass
class FactAccuracy:
    """Per-split accuracies and each record's outcome (``known[i]`` for ``records[i]``)."""

    splits: dict[str, SplitAccuracy] = field(default_factory=dict)
    known: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {name: s.to_dict() for name, s in sorted(self.splits.items())}


def load_known_facts(path: str | Path) -> list[dict[str, Any]]:
    """Read a known-facts file: a JSON list of ``{subject, prompt, answer, ...}`` records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"known-facts file {str(path)!r} does not exist")
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: a known-facts file is a JSON list of records")
    for i, r in enumerate(records):
        missing = {"subject", "prompt", "answer"} - set(r)
        if missing:
            raise ValueError(f"{path}: record {i} lacks {', '.join(sorted(missing))}")
    return records


@torch.no_grad()
def predict_next(model: nn.Module, prompts: Sequence[Sequence[int]], batch_size: int = 256) -> list[int]:
    """Greedy next token after each prompt (token ids), batched by prompt length."""
    from xvariants.interpret.patching import lm_logits  # logits at the last position only

    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        by_len[len(p)].append(i)
    limit = getattr(model, "max_context", None)
    out = [0] * len(prompts)
    with eval_modes(model):
        device = next(model.parameters()).device
        for length, idx in sorted(by_len.items()):
            if limit is not None and length > limit:
                raise ValueError(f"prompt {idx[0]} has {length} tokens; the model's context is {limit}")
            for s in range(0, len(idx), batch_size):
                rows = idx[s : s + batch_size]
                batch = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
                logits, _ = lm_logits(model, batch, all_positions=False)
                for i, tok in zip(rows, logits.argmax(-1).tolist()):
                    out[i] = tok
    return out


def fact_accuracy(model: nn.Module, tokenizer: Any, records: Iterable[dict[str, Any]], batch_size: int = 256) -> FactAccuracy:
    """Greedy fact accuracy per ``split`` of the records (records without one count as ``all``);
    ``all`` is always reported too."""
    records = list(records)
    encoded = [encode_fact(tokenizer, r["prompt"], r["subject"], r["answer"]) for r in records]
    predicted = predict_next(model, [e.ids.tolist() for e in encoded], batch_size=batch_size)
    result = FactAccuracy()
    for r, e, p in zip(records, encoded, predicted):
        hit = p == e.answer_id
        result.known.append(hit)
        for name in {r.get("split", "all"), "all"}:
            s = result.splits.setdefault(name, SplitAccuracy())
            s.n += 1
            s.correct += int(hit)
    return result
