"""CounterFact-style metrics (xvariants/editing/metrics.py) on a hand-built bigram model, whose
next-token probabilities are set by hand, so every number can be computed on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from xvariants.data.tokenizers import WordTokenizer
from xvariants.editing import aggregate, ngram_entropy, record_metrics, target_nll
from xvariants.editing.metrics import RecordMetrics, harmonic_mean

WORDS = ["<eos>", "<unk>", "Ann", "Bob", "lives", "in", "is", "near", "Paris", "Rome", "Oslo"]
TOK = WordTokenizer(WORDS)
ID = {w: i for i, w in enumerate(WORDS)}
#: p(next word | last word), the rest of each row spread evenly
P = {"in": {"Rome": 0.5, "Paris": 0.2, "Oslo": 0.1}, "near": {"Rome": 0.1, "Paris": 0.6},
     "Oslo": {"Rome": 0.25}}


class Bigram(nn.Module):
    """Next-token logits depend only on the current token: ``log P[token]``."""

    def __init__(self):
        super().__init__()
        table = torch.full((len(WORDS), len(WORDS)), 1.0 / len(WORDS), dtype=torch.float64)
        for word, row in P.items():
            rest = (1 - sum(row.values())) / (len(WORDS) - len(row))
            table[ID[word]] = rest
            for nxt, p in row.items():
                table[ID[word], ID[nxt]] = p
        self.log_p = nn.Parameter(table.log())

    def forward(self, tokens):
        return self.log_p[tokens]


RECORD = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} lives in", "subject": "Ann", "target_new": {"str": "Rome"},
                          "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["Ann is near", "Ann is in"],
    "neighborhood_prompts": ["Bob lives in", "Bob is near"],
}


def test_scores_and_magnitudes_equal_the_hand_computed_values():
    m = record_metrics(Bigram(), TOK, RECORD)
    assert m.case_id == 7
    assert (m.es, m.em) == (1.0, pytest.approx(0.5 - 0.2))
    assert (m.ps, m.pm) == (0.5, pytest.approx(((0.1 - 0.6) + (0.5 - 0.2)) / 2))
    assert (m.ns, m.nm) == (0.5, pytest.approx(((0.2 - 0.5) + (0.6 - 0.1)) / 2))
    new, true = m.nll["paraphrase"]
    assert new == pytest.approx([-math.log(0.1), -math.log(0.5)]) and true == pytest.approx([-math.log(0.6), -math.log(0.2)])


def test_multi_token_targets_use_the_mean_token_nll():
    nll = target_nll(Bigram(), TOK, ["Ann lives in", "Bob is near"], "Oslo Rome")
    expected_first = -(math.log(0.1) + math.log(0.25)) / 2
    rest_near = (1 - 0.7) / (len(WORDS) - 2)
    expected_second = -(math.log(rest_near) + math.log(0.25)) / 2
    np.testing.assert_allclose(nll, [expected_first, expected_second], rtol=1e-12)
    whole = target_nll(Bigram(), TOK, ["Ann lives in", "Bob is near"], "Oslo Rome", reduce="sum")
    np.testing.assert_allclose(whole, [2 * expected_first, 2 * expected_second], rtol=1e-12)


def test_ties_count_as_failures():
    tied = {**RECORD, "requested_rewrite": {**RECORD["requested_rewrite"], "target_new": {"str": "Ann"},
                                            "target_true": {"str": "Bob"}}}
    m = record_metrics(Bigram(), TOK, tied)  # both unlisted: equal probability everywhere
    assert (m.es, m.ps, m.ns) == (0.0, 0.0, 0.0) and m.em == 0.0


def test_ngram_entropy_by_hand():
    bigrams = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # (a,b) twice, (b,a) once
    trigrams = 1.0  # (a,b,a), (b,a,b)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * bigrams + 4 / 3 * trigrams) / 2)
    assert ngram_entropy("x") == 0.0
    assert ngram_entropy("a, b.") == ngram_entropy("a , b .")  # punctuation is a word of its own


def test_aggregate_means_confidence_intervals_and_score():
    a = RecordMetrics(0, es=1.0, ps=0.5, ns=1.0, em=0.3, pm=0.1, nm=0.2, fluency=4.0)
    b = RecordMetrics(1, es=0.0, ps=1.0, ns=0.5, em=-0.1, pm=0.3, nm=0.0, fluency=5.0)
    out = aggregate([a, b])
    assert out["es"]["mean"] == 50.0 and out["es"]["ci95"] == pytest.approx(1.96 * 50 / math.sqrt(2))
    assert out["ps"]["mean"] == 75.0 and out["ns"]["mean"] == 75.0
    assert out["em"]["mean"] == pytest.approx(10.0) and out["fluency"]["mean"] == pytest.approx(450.0)
    assert out["score"]["mean"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 75))
    assert harmonic_mean([0.0, 1.0, 1.0]) == 0.0


def test_fluency_samples_from_the_prompts():
    m = record_metrics(Bigram(), TOK, RECORD, fluency=True, gen_tokens=12)
    assert len(m.generations) == 3 and m.generations[0].startswith("Ann lives in ")
    assert all(len(g.split()) >= 12 for g in m.generations)
    assert m.fluency == pytest.approx(np.mean([ngram_entropy(g) for g in m.generations]))
    assert m.fluency > 0
