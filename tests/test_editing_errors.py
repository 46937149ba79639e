"""Bad input to the editors: one clear message each, raised before any weight changes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.editing_common import FAST_MEMIT, FAST_ROME, IDS, RECORDS, STATS_IDS, TOK, make_lm, same_weights, weights
from tests.test_contract import CASES, registered
from tests.test_contract import make_lm as contract_lm
from xvariants.editing import (
    EditError,
    EditRequest,
    StatsError,
    collect_key_stats,
    ft_edit,
    key_stats,
    memit_edit,
    rome_edit,
)
from xvariants.editing.stats import stream_batches
from xvariants.models import build_language_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_and_stats():
    lm = make_lm()
    stats = {layer: key_stats(lm, layer, STATS_IDS, corpus="mix", n_tokens=3072, seq_len=64) for layer in (0, 1)}
    return lm, stats


def record(**rewrite):
    rec = {**RECORDS[0], "requested_rewrite": {**RECORDS[0]["requested_rewrite"], **rewrite}}
    return rec


def every_editor(lm, stats, request):
    yield lambda: rome_edit(lm, TOK, request, layer=0, stats=stats[0], options=FAST_ROME)
    yield lambda: memit_edit(lm, TOK, [RECORDS[1], request], layers=[0, 1], stats=stats, options=FAST_MEMIT)
    yield lambda: ft_edit(lm, TOK, request, layer=0)


def test_target_new_equal_to_target_true(lm_and_stats):
    lm, stats = lm_and_stats
    before = weights(lm)
    true = RECORDS[0]["requested_rewrite"]["target_true"]
    bad = record(target_new=dict(true))
    for edit in every_editor(lm, stats, bad):
        with pytest.raises(EditError, match=rf"target_new '{true['str']}' equals target_true; an edit must change"):
            edit()
    assert same_weights(lm, before)


def test_subject_not_in_the_prompt(lm_and_stats):
    lm, stats = lm_and_stats
    before = weights(lm)
    with pytest.raises(EditError, match="subject 'Nobody Known' is not in the prompt 'Someone was born in'"):
        EditRequest("Someone was born in", "Nobody Known", "Rome")
    bad = record(prompt="Someone was born in", subject="Nobody Known")
    for edit in every_editor(lm, stats, bad):
        with pytest.raises(EditError, match="is not in the prompt"):
            edit()
    # a subject that covers part of a word is refused with the word named
    half = {"prompt": "{}ian was born in", "subject": "Thiasoun", "target_new": {"str": "Rome"},
            "target_true": {"str": "Seoul"}}
    with pytest.raises(EditError, match="subject: .*covers part of token 0 'Thiasounian'"):
        rome_edit(lm, TOK, {"requested_rewrite": half}, layer=0, stats=stats[0], options=FAST_ROME)
    assert EditRequest("Ann Lee was born in", "Ann Lee", "Rome").prompt == "{} was born in"
    assert same_weights(lm, before)


def test_target_outside_the_vocabulary(lm_and_stats):
    lm, stats = lm_and_stats
    before = weights(lm)
    bad = record(target_new={"str": "Atlantis"})
    for edit in every_editor(lm, stats, bad):
        with pytest.raises(EditError, match="target 'Atlantis' is not in the tokenizer's vocabulary"):
            edit()
    assert same_weights(lm, before)


def test_layer_out_of_range(lm_and_stats):
    lm, stats = lm_and_stats
    before = weights(lm)
    message = r"layer 2 is out of range: this model has 2 MLP layers/steps \(0..1\)"
    with pytest.raises(EditError, match=message):
        rome_edit(lm, TOK, RECORDS[0], layer=2, stats=stats[0], options=FAST_ROME)
    with pytest.raises(EditError, match=message):
        memit_edit(lm, TOK, RECORDS[:2], layers=[0, 2], stats=stats, options=FAST_MEMIT)
    with pytest.raises(EditError, match="layer -1 is out of range"):
        ft_edit(lm, TOK, RECORDS[0], layer=-1)
    with pytest.raises(EditError, match="ascending list without repeats"):
        memit_edit(lm, TOK, RECORDS[:2], layers=[1, 0], stats=stats, options=FAST_MEMIT)
    with pytest.raises(EditError, match="only a Universal Transformer's shared MLP has steps"):
        rome_edit(lm, TOK, RECORDS[0], layer=0, stats=stats[0], options=replace(FAST_ROME, key_step="mean"))
    assert same_weights(lm, before)


def test_statistics_too_small_or_missing(lm_and_stats):
    lm, stats = lm_and_stats
    before = weights(lm)
    small = collect_key_stats(lm, 0, stream_batches(IDS, 64, 64, 1), corpus="facts_tiny")
    with pytest.raises(StatsError, match=r"64 keys for d_mlp = 128, so C = E\[kkᵀ\] has rank at most 64; stream at least 128"):
        rome_edit(lm, TOK, RECORDS[0], layer=0, stats=small, options=FAST_ROME)
    with pytest.raises(StatsError, match="64 keys for d_mlp = 128"):
        memit_edit(lm, TOK, RECORDS[:2], layers=[0, 1], stats={0: small, 1: stats[1]}, options=FAST_MEMIT)
    with pytest.raises(StatsError, match="need the key statistics C of the edited layer"):
        memit_edit(lm, TOK, RECORDS[:2], layers=[0, 1], stats={0: stats[0]}, options=FAST_MEMIT)
    assert same_weights(lm, before)


def test_model_without_mlps():
    toy = next(c for c in CASES if c.name == "toy")
    with registered("toy"):
        lm = contract_lm(toy)
        before = weights(lm)
        for edit in (lambda: rome_edit(lm, TOK, RECORDS[0], layer=0, stats=None, options=FAST_ROME),
                     lambda: memit_edit(lm, TOK, RECORDS[:1], layers=[0], stats=None, options=FAST_MEMIT),
                     lambda: ft_edit(lm, TOK, RECORDS[0], layer=0),
                     lambda: collect_key_stats(lm, 0, [torch.zeros(1, 4, dtype=torch.long)])):
            with pytest.raises(EditError, match=r"LanguageModel \(body ToyMixerBody\) has no MLP key hook points \('blocks.\{l\}.mlp.hook_post'\)"):
                edit()
        assert same_weights(lm, before)


def test_bidirectional_encoder_is_refused():
    torch.manual_seed(0)
    enc = build_language_model({"body": "vanilla", "d_model": 32, "n_heads": 2, "n_layers": 2, "causal": False},
                               TOK.vocab_size).eval()
    before = weights(enc)
    with pytest.raises(EditError, match="bidirectional encoder has no next-token prediction"):
        rome_edit(enc, TOK, RECORDS[0], layer=0, stats=None, options=FAST_ROME)
    assert same_weights(enc, before)
