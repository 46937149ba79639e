"""Editing the Universal Transformer's shared MLP: one ΔW that acts at every step, keys taken at
one step, at the traced peak step or averaged over steps; pooled key statistics under ACT."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.editing_common import FAST_MEMIT, FAST_ROME, RECORDS, STATS_IDS, TOK, make_lm, same_weights, weights
from xvariants.editing import EditRequest, key_stats, memit_edit, peak_step, rome_edit
from xvariants.editing.requests import encode_request
from xvariants.interpret import run_with_cache, run_with_hooks
from xvariants.interpret.mlp_memory import mlp_memory

pytestmark = pytest.mark.usefixtures("one_thread")
REQUEST = EditRequest.from_record(RECORDS[1])
STEPS = 3


def pooled_stats(lm):
    return key_stats(lm, 0, STATS_IDS, corpus="facts_tiny+random", n_tokens=3072, seq_len=64)


@pytest.mark.parametrize("body", ["universal", "universal-act"])
def test_every_step_changes_by_the_same_delta_w(body):
    """With each step's keys held at their pre-edit values, every step's MLP output moves by
    exactly ΔW k_t: one weight, changed once, acting at all steps."""
    lm = make_lm(body)
    before = weights(lm)
    text = torch.tensor([encode_request(TOK, REQUEST).ids])
    keys = [f"steps.{t}.mlp.hook_post" for t in range(STEPS)]
    outs = [f"steps.{t}.hook_mlp_out" for t in range(STEPS)]
    _, old = run_with_cache(lm, text, keys + outs)
    result = rome_edit(lm, TOK, REQUEST, layer=1, stats=pooled_stats(lm), options=FAST_ROME)
    (delta,) = result.deltas.values()
    assert len(result.deltas) == 1 and result.rank() == 1
    assert all(mlp_memory(lm, t).weight is mlp_memory(lm, 0).weight for t in range(STEPS))

    def hold(act, hook):  # the key this step had before the edit
        return old[hook.name]

    _, new = run_with_cache(lm, text, outs, fwd_hooks=[(k, hold) for k in keys])
    for t in range(STEPS):
        moved = new[outs[t]].double() - old[outs[t]].double()
        expected = old[keys[t]].double() @ delta.T
        assert torch.allclose(moved, expected, atol=1e-9), t
        assert moved.abs().max() > 0
    result.restore()
    assert same_weights(lm, before)


def test_key_step_mean_averages_keys_over_steps_and_meets_the_constraint():
    lm = make_lm("universal")
    mem = mlp_memory(lm, 0)
    enc = encode_request(TOK, REQUEST)
    _, cache = run_with_cache(lm, torch.tensor([enc.ids]), [f"steps.{t}.mlp.hook_post" for t in range(STEPS)])
    k_mean = torch.stack([cache[f"steps.{t}.mlp.hook_post"][0, enc.lookup] for t in range(STEPS)]).mean(0)
    result = rome_edit(lm, TOK, REQUEST, layer=0, stats=pooled_stats(lm), apply=False,
                       options=replace(FAST_ROME, key_step="mean"))
    assert result.info["steps"] == [0, 1, 2]
    assert torch.allclose(result.info["k0"], k_mean, atol=1e-12)
    result.apply()
    assert torch.allclose(mem.apply(k_mean), result.info["v_star"], atol=1e-8)
    result.restore()


def test_key_step_int_and_peak():
    lm = make_lm("universal-act")
    stats = pooled_stats(lm)
    at_two = rome_edit(lm, TOK, REQUEST, layer=0, stats=stats, apply=False, options=replace(FAST_ROME, key_step=2))
    assert at_two.info["steps"] == [2]
    peak = peak_step(lm, TOK, REQUEST, samples=3)
    assert 0 <= peak < STEPS
    traced = rome_edit(lm, TOK, REQUEST, layer=0, stats=stats, apply=False,
                       options=replace(FAST_ROME, key_step="peak"))
    assert traced.info["steps"] == [peak_step(lm, TOK, REQUEST)]


def test_pooled_statistics_count_only_running_positions():
    lm = make_lm("universal-act")
    ids = torch.as_tensor(STATS_IDS[:512]).reshape(8, 64)
    names = [f"steps.{t}.mlp.hook_post" for t in range(STEPS)] + [f"steps.{t}.hook_active" for t in range(STEPS)]
    _, cache = run_with_cache(lm, ids, names)
    keys = torch.cat([cache[f"steps.{t}.mlp.hook_post"][cache[f"steps.{t}.hook_active"].bool()]
                      for t in range(STEPS)]).double()
    assert keys.shape[0] < 512 * STEPS  # some positions halted early
    from xvariants.editing import collect_key_stats

    st = collect_key_stats(lm, 0, [ids[:4], ids[4:]])
    assert st.step == "all" and st.count == keys.shape[0] and st.n_tokens == 512
    assert torch.allclose(st.moment, keys.T @ keys / keys.shape[0], atol=1e-12)
    one = collect_key_stats(lm, 0, [ids], step=1)
    k1 = cache["steps.1.mlp.hook_post"][cache["steps.1.hook_active"].bool()].double()
    assert one.count == k1.shape[0] and torch.allclose(one.moment, k1.T @ k1 / k1.shape[0], atol=1e-12)


def test_memit_over_steps_of_the_shared_weight():
    lm = make_lm("universal")
    before = weights(lm)
    stats = pooled_stats(lm)
    with memit_edit(lm, TOK, RECORDS[:2], layers=[0, 1], stats={0: stats, 1: stats}, prefix_groups=[[""]],
                    options=replace(FAST_MEMIT, mom2_update_weight=1e-4)) as result:
        assert len(result.deltas) == 1  # both steps wrote into the one shared matrix
        assert result.info["final_residual_norm"] < result.info["per_layer"][0]["residual_norm"]
    assert same_weights(lm, before)


def test_edits_run_on_a_model_with_memory_without_touching_its_state():
    """Transformer-XL edits use the current segment (memory None); the edited model still runs
    segment after segment with memory."""
    lm = make_lm("xl")
    stats = key_stats(lm, 0, STATS_IDS, corpus="facts_tiny+random", n_tokens=3072, seq_len=64)
    ids = torch.as_tensor(STATS_IDS[:32]).reshape(2, 16)
    first = lm(ids[:, :8])
    with rome_edit(lm, TOK, REQUEST, layer=0, stats=stats, options=FAST_ROME):
        edited = run_with_hooks(lm, ids[:, 8:], state=first.state)
        assert torch.isfinite(edited.logits).all()
    plain = lm(ids[:, 8:], state=first.state)
    assert not torch.allclose(edited.logits, plain.logits)


def test_steps_every_position_halted_before_are_left_out():
    """Under ACT a step that no position reaches fires no hook (the loop stops): the statistics
    pool only the steps that ran, and ROME's step-averaged key is then that of the steps run."""
    from tests.editing_common import BODIES
    from xvariants.editing import collect_key_stats
    from xvariants.models import build_language_model

    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_heads": 2, "dropout": 0.0, **BODIES["universal-act"], "halting_bias_init": 20.0}
    lm = build_language_model(cfg, TOK.vocab_size).double().eval()
    ids = torch.as_tensor(STATS_IDS[:3072]).reshape(-1, 64)
    _, cache = run_with_cache(lm, ids[:2], [f"steps.{t}.mlp.hook_post" for t in range(STEPS)])
    assert list(cache) == ["steps.0.mlp.hook_post"]  # every position halts after step 0
    pooled = collect_key_stats(lm, 0, [ids[:24], ids[24:]])
    first = collect_key_stats(lm, 0, [ids[:24], ids[24:]], step=0)
    assert pooled.count == first.count == 3072 and torch.equal(pooled.moment, first.moment)
    mean = rome_edit(lm, TOK, REQUEST, layer=0, stats=pooled, apply=False, options=replace(FAST_ROME, key_step="mean"))
    step0 = rome_edit(lm, TOK, REQUEST, layer=0, stats=pooled, apply=False, options=replace(FAST_ROME, key_step=0))
    assert mean.info["steps"] == [0, 1, 2] and torch.allclose(mean.info["k0"], step0.info["k0"], atol=1e-12)
    (a,), (b,) = mean.deltas.values(), step0.deltas.values()
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
