"""CounterFact-style evaluation (``experiments/py/eval_utils_counterfact.py``, ``summarize.py``).

For every prompt the mean per-token NLL of " target_new" and of " target_true" (teacher forced;
a multi-token target is scored on all its tokens and divided by their count, as the original's
``test_batch_prediction``; ``reduce="sum"`` scores the whole target's log-probability instead);
p = exp(−NLL). Per record:

* ES / EM: on the rewrite prompt, the fraction with p(new) > p(true) / the mean p(new) − p(true);
* PS / PM: the same over the paraphrase prompts;
* NS / NM: over the neighbourhood prompts, the fraction with p(true) > p(new) / mean p(true) − p(new);
* fluency: the mean over generations of the weighted bigram/trigram entropy (bits; weights
  2/3 and 4/3), the original's ``n_gram_entropy``; words and punctuation are split by a regex
  (the original uses NLTK's ``word_tokenize``).

:func:`aggregate` averages the per-record values, ×100, with 95% CIs (1.96·std/√N), and
S = harmonic mean of the aggregated ES, PS and NS. Ties count as failures, as in the code.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from xvariants.editing.requests import encode, teacher_forced_batch
from xvariants.editing.runs import decode, device_of, eval_mode, logits_at, pad, sample

#: per-record metric names (ES, PS, NS and their magnitudes; fluency when generations ran)
METRICS = ("es", "ps", "ns", "em", "pm", "nm")
_WORDS = re.compile(r"\w+|[^\w\s]")


@torch.no_grad()
def target_nll(model: nn.Module, tokenizer: Any, prompts: Sequence[str], target: str,
               batch_rows: int = 64, reduce: str = "mean") -> np.ndarray:
    """NLL (nats) of ``target`` continuing each prompt (after one space): the mean over the
    target's tokens (``reduce="mean"``, the original's) or their sum (``"sum"``, -log p of the
    whole target)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    out = []
    encs = [encode(tokenizer, p, target=target) for p in prompts]
    with eval_mode(model) as inner:
        dev = device_of(inner)
        for at in range(0, len(encs), batch_rows):
            chunk = encs[at : at + batch_rows]
            seqs, rows, cols, targets = teacher_forced_batch(chunk)
            logits = logits_at(inner, pad(seqs, dev), torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev))
            nll = -torch.log_softmax(logits.double(), -1).gather(1, torch.as_tensor(targets, device=dev)[:, None])[:, 0]
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=dev).index_add(0, torch.as_tensor(rows, device=dev), nll)
            if reduce == "mean":
                sums = sums / torch.as_tensor([len(e.target) for e in chunk], device=dev)
            out.append(sums.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The mean of ``weights[i]`` × entropy (bits) of the ``ns[i]``-gram distribution of ``text``."""
    words = _WORDS.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return float(np.mean(values))


@dataclass
class RecordMetrics:
    """One record's metrics (fractions and probability differences in [0, 1] / [-1, 1]) and the
    NLLs they came from: ``nll[kind] = (new [n], true [n])`` per prompt kind."""

    case_id: int | None
    es: float
    ps: float
    ns: float
    em: float
    pm: float
    nm: float
    fluency: float | None = None
    nll: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict, repr=False)
    generations: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compare(new: np.ndarray, true: np.ndarray, flip: bool) -> tuple[float, float]:
    if new.size == 0:
        return float("nan"), float("nan")
    if flip:  # neighbourhood: the true object should stay the more probable
        return float(np.mean(true < new)), float(np.mean(np.exp(-true) - np.exp(-new)))
    return float(np.mean(true > new)), float(np.mean(np.exp(-new) - np.exp(-true)))


def record_metrics(model: nn.Module, tokenizer: Any, record: Mapping[str, Any], *, fluency: bool = False,
                   generation_prompts: Sequence[str] | None = None, gen_tokens: int = 100, top_k: int = 5,
                   seed: int = 0, reduce: str = "mean") -> RecordMetrics:
    """Evaluate ``model`` on one CounterFact-style record (edited or not).

    :param reduce: how a many-token target's NLL is formed (:func:`target_nll`).
    :param fluency: also sample ``gen_tokens`` tokens (top-k) from each generation prompt —
        the record's ``generation_prompts``, else its rewrite and paraphrase prompts — and report
        their mean n-gram entropy.
    """
    rw = record["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    prompts = {
        "rewrite": [rw["prompt"].replace("{}", rw["subject"], 1)],
        "paraphrase": list(record.get("paraphrase_prompts", [])),
        "neighborhood": list(record.get("neighborhood_prompts", [])),
    }
    nll = {k: (target_nll(model, tokenizer, p, new, reduce=reduce), target_nll(model, tokenizer, p, true, reduce=reduce))
           for k, p in prompts.items()}
    es, em = _compare(*nll["rewrite"], flip=False)
    ps, pm = _compare(*nll["paraphrase"], flip=False)
    ns, nm = _compare(*nll["neighborhood"], flip=True)
    out = RecordMetrics(record.get("case_id"), es, ps, ns, em, pm, nm,
                        nll={k: (a.tolist(), b.tolist()) for k, (a, b) in nll.items()})
    if fluency:
        gp = list(generation_prompts or record.get("generation_prompts") or prompts["rewrite"] + prompts["paraphrase"])
        g = torch.Generator().manual_seed(seed)
        ids = [[int(i) for i in encode(tokenizer, p).ids] for p in gp]
        texts = [p + " " + decode(tokenizer, t) for p, t in zip(gp, sample(model, ids, gen_tokens, top_k=top_k, generator=g))]
        out.generations = texts
        out.fluency = float(np.mean([ngram_entropy(t) for t in texts]))
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    values = [float(v) for v in values]
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def aggregate(records: Sequence[RecordMetrics]) -> dict[str, dict[str, float]]:
    """Per metric ``{"mean", "ci95", "n"}`` over records (NaN entries skipped), ×100 except
    fluency (bits ×100 as the paper's GE); ``score``: S = harmonic mean of ES, PS, NS (×100)."""
    out: dict[str, dict[str, float]] = {}
    for name in (*METRICS, "fluency"):
        vals = np.array([getattr(r, name) for r in records if getattr(r, name) is not None], dtype=np.float64)
        vals = vals[~np.isnan(vals)] * 100
        if vals.size:
            out[name] = {"mean": float(vals.mean()), "ci95": float(1.96 * vals.std() / math.sqrt(vals.size)),
                         "n": int(vals.size)}
    if all(k in out for k in ("es", "ps", "ns")):
        out["score"] = {"mean": harmonic_mean([out[k]["mean"] for k in ("es", "ps", "ns")]), "ci95": float("nan"),
                        "n": min(out[k]["n"] for k in ("es", "ps", "ns"))}
    return out
