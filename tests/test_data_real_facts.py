"""The hand-written real facts (xvariants.data.real_facts): well-formed records for tracing and
editing a pre-trained LM; SmolLM2's knowledge of them is measured in bench/results/causal_trace/."""

from __future__ import annotations

from xvariants.data.real_facts import RELATIONS, counterfact, known_facts


def test_known_facts_are_well_formed():
    known = known_facts()
    assert len(known) >= 60 and len(RELATIONS) >= 5
    assert len({(r["subject"], r["relation"]) for r in known}) == len(known)
    for r in known:
        assert r["subject"] in r["prompt"], r
        assert not r["prompt"].endswith(" ") and r["answer"] and " " not in r["answer"], r


def test_counterfact_records_rewrite_to_another_object_of_the_relation():
    records = counterfact()
    assert len(records) == len(known_facts())
    for c in records:
        rw = c["requested_rewrite"]
        objects = {o for _, o in RELATIONS[rw["relation_id"]][2]}
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert {rw["target_new"]["str"], rw["target_true"]["str"]} <= objects
        assert "{}" in rw["prompt"] and len(c["paraphrase_prompts"]) == 2
        for p in c["paraphrase_prompts"]:
            assert rw["subject"] in p or rw["subject"][0].upper() + rw["subject"][1:] in p
        truth = dict(RELATIONS[rw["relation_id"]][2])
        for s, p in zip(c["neighborhood_subjects"], c["neighborhood_prompts"]):
            assert truth[s] == rw["target_true"]["str"] and s != rw["subject"]  # same true object, other subject
    assert sum(bool(c["neighborhood_prompts"]) for c in records) >= 15
