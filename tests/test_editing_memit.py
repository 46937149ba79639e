"""MEMIT (xvariants/editing/memit.py) against an independent least-squares solution, its
residual spreading over layers, batches, exact restore, and FT-L's L∞ bound."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.editing_common import FAST_MEMIT, RECORDS, STATS_IDS, TOK, make_lm, same_weights, weights
from xvariants.editing import EditRequest, FTOptions, ft_edit, key_stats, memit_edit
from xvariants.editing.requests import encode_request
from xvariants.interpret import run_with_cache
from xvariants.interpret.mlp_memory import mlp_memory

pytestmark = pytest.mark.usefixtures("one_thread")


def stats_for(lm, layers):
    return {layer: key_stats(lm, layer, STATS_IDS, corpus="facts_tiny+random", n_tokens=3072, seq_len=64)
            for layer in layers}


def bare_reads(lm, requests, names):
    """Each name at the subject's last token of each bare prompt, read directly ``[n, D]``."""
    out = {n: [] for n in names}
    for r in requests:
        enc = encode_request(TOK, EditRequest.from_record(r))
        _, cache = run_with_cache(lm, torch.tensor([enc.ids]), names)
        for n in names:
            out[n].append(cache[n][0, enc.lookup].double())
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("n_requests", [1, 3])
def test_one_layer_equals_the_least_squares_solution(n_requests):
    """ΔW = R Kᵀ (λC + KKᵀ)⁻¹ is the minimiser of ‖ΔW K − R‖² + λ‖ΔW L‖² with C = L Lᵀ: solve
    that stacked least-squares problem with numpy and compare."""
    lm = make_lm()
    before = weights(lm)
    stats = stats_for(lm, [0])
    lam = 5.0
    records = RECORDS[:n_requests]
    result = memit_edit(lm, TOK, records, layers=[0], stats=stats, prefix_groups=[[""]], apply=False,
                        options=replace(FAST_MEMIT, mom2_update_weight=lam))
    assert same_weights(lm, before)
    mem = mlp_memory(lm, 0)
    got = bare_reads(lm, records, [mem.key_hook, "blocks.0.hook_resid_post"])
    keys = got[mem.key_hook].numpy()  # [n, d_mlp]
    resid = (result.info["z"] - got["blocks.0.hook_resid_post"]).numpy()  # [n, d_model]
    chol = np.linalg.cholesky(stats[0].moment.numpy())
    a = np.concatenate([keys.T, np.sqrt(lam) * chol], axis=1)  # [d_mlp, n + d_mlp]
    b = np.concatenate([resid.T, np.zeros((resid.shape[1], chol.shape[1]))], axis=1)  # [d_model, n + d_mlp]
    expected = np.linalg.lstsq(a.T, b.T, rcond=None)[0].T  # ΔW a ≈ b
    np.testing.assert_allclose(result.deltas[mem.path].numpy(), expected, rtol=1e-6, atol=1e-10)
    if n_requests == 1:
        assert result.rank() == 1


def test_small_lambda_meets_the_targets_over_two_layers_and_restores():
    lm = make_lm()
    before = weights(lm)
    stats = stats_for(lm, [0, 1])
    opts = replace(FAST_MEMIT, mom2_update_weight=1e-4, v_num_grad_steps=6)
    records = RECORDS[:4]
    with memit_edit(lm, TOK, records, layers=[0, 1], stats=stats, prefix_groups=[[""]], options=opts) as result:
        first, second = result.info["per_layer"]
        assert first["residual_norm"] > 0
        assert 0 < second["residual_norm"] < first["residual_norm"]  # layer 0 took its half
        assert result.info["final_residual_norm"] < 1e-3 * first["residual_norm"]
        assert set(result.deltas) == {mlp_memory(lm, 0).path, mlp_memory(lm, 1).path}
        h = bare_reads(lm, records, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
        assert torch.allclose(h, result.info["z"], atol=1e-3 * first["residual_norm"])
    assert same_weights(lm, before)


def test_batch_of_edits_and_group_averaged_keys():
    lm = make_lm()
    before = weights(lm)
    stats = stats_for(lm, [0, 1])
    result = memit_edit(lm, TOK, RECORDS[:6], layers=[0, 1], stats=stats, options=FAST_MEMIT, apply=False)
    assert same_weights(lm, before)
    groups = result.info["prefix_groups"]
    assert groups[0] == [""] and len(groups) == 2 and len(groups[1]) == 2
    assert result.info["z"].shape == (6, 32)
    assert all(torch.linalg.matrix_rank(d).item() <= 6 for d in result.deltas.values())


def test_failure_part_way_restores_every_weight(monkeypatch):
    from xvariants.editing import memit

    lm = make_lm()
    before = weights(lm)
    stats = stats_for(lm, [0, 1])
    calls = {"n": 0}
    real = memit.read_at

    def fail_on_second_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first layer's update is already written
            assert not same_weights(lm, before)
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(memit, "read_at", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="boom"):
        memit_edit(lm, TOK, RECORDS[:2], layers=[0, 1], stats=stats, prefix_groups=[[""]], options=FAST_MEMIT)
    assert same_weights(lm, before)


def test_ft_l_changes_one_weight_within_its_linf_bound():
    lm = make_lm()
    before = weights(lm)
    eps = 1e-3
    mem = mlp_memory(lm, 0)
    with ft_edit(lm, TOK, RECORDS[0], layer=0, options=FTOptions(norm_constraint=eps, num_steps=5)) as result:
        (delta,) = result.deltas.values()
        assert 0 < delta.abs().max() <= eps + 1e-12
        changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == ["body.blocks.0.mlp.fc2.weight"] == [mem.path + ".weight"]
        assert result.info["losses"][-1] < result.info["losses"][0]
        assert all(p.requires_grad for p in lm.parameters()) and mem.weight.grad is None
    assert same_weights(lm, before)
