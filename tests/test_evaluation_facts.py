"""Fact accuracy (xvariants.evaluation.facts): batching by prompt length changes no prediction,
the counts per split are exact, and bad files or prompts fail with one message."""

from __future__ import annotations

import json

import pytest
import torch

from xvariants.data.facts import generate
from xvariants.data.spans import encode_fact
from xvariants.data.tokenizers import WordTokenizer
from xvariants.evaluation.facts import SplitAccuracy, fact_accuracy, load_known_facts, predict_next
from xvariants.models import build_language_model


@pytest.fixture(scope="module")
def setup():
    facts = generate(seed=5, n_subjects=6, mentions=2)
    tok = WordTokenizer.train("\n".join(facts.paragraphs["train"] + facts.paragraphs["valid"]))
    torch.manual_seed(0)
    cfg = {"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "max_len": 64}
    model = build_language_model(cfg, tok.vocab_size).eval()
    return facts, tok, model


def test_batched_predictions_equal_one_prompt_at_a_time(setup):
    facts, tok, model = setup
    prompts = [encode_fact(tok, r["prompt"], r["subject"]).ids.tolist() for r in facts.known[:40]]
    assert len({len(p) for p in prompts}) > 1  # several lengths, so several batches
    batched = predict_next(model, prompts, batch_size=7)
    with torch.no_grad():
        single = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert batched == single


def test_counts_per_split_match_the_predictions(setup):
    facts, tok, model = setup
    records = facts.known[:30]
    predicted = predict_next(model, [encode_fact(tok, r["prompt"], r["subject"]).ids.tolist() for r in records])
    # make every third record's answer the model's own prediction: exactly those are known
    rigged = []
    for i, (r, p) in enumerate(zip(records, predicted)):
        answer = tok.decode([p]).strip() if i % 3 == 0 else r["answer"]
        if i % 3 and encode_fact(tok, r["prompt"], r["subject"], answer).answer_id == p:
            answer = next(o for o in ("Paris", "Rome", "Oslo") if tok.encode(o)[0] != p)
        rigged.append({**r, "answer": answer})
    acc = fact_accuracy(model, tok, rigged)
    assert acc.known == [i % 3 == 0 for i in range(30)]
    assert acc.splits["all"].correct == 10 and acc.splits["all"].n == 30
    by_split = {s: sum(1 for i, r in enumerate(rigged) if r["split"] == s) for s in ("train", "heldout")}
    assert {s: acc.splits[s].n for s in by_split if by_split[s]} == {s: n for s, n in by_split.items() if n}


def test_wilson_interval_stays_inside_0_1_and_covers_the_estimate():
    s = SplitAccuracy(n=50, correct=50)
    lo, hi = s.interval()
    assert 0.9 < lo < 1.0 and hi == 1.0
    s = SplitAccuracy(n=100, correct=30)
    lo, hi = s.interval()
    assert lo < 0.3 < hi and hi - lo == pytest.approx(0.18, abs=0.01)


def test_bad_files_and_prompts(tmp_path, setup):
    _, _, model = setup
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_known_facts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "A B", "prompt": "A B is"}]))
    with pytest.raises(ValueError, match="record 0 lacks answer"):
        load_known_facts(bad)
    with pytest.raises(ValueError, match="context is 64"):
        predict_next(model, [[1] * 65])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        predict_next(model, [[]])
