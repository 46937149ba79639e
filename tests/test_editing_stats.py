"""Key statistics (xvariants/editing/stats.py): C equals Σkkᵀ/n computed directly, the
safetensors cache is keyed by model, layer, corpus and count, and too little data is refused
with the count it needs."""

from __future__ import annotations

import pytest
import torch

from tests.editing_common import IDS, STATS_IDS, make_lm
from xvariants.editing import KeyStats, StatsError, collect_key_stats, key_stats, model_fingerprint
from xvariants.editing import stats as stats_module
from xvariants.editing.stats import solve_live, stream_batches
from xvariants.interpret import run_with_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def test_moment_is_the_mean_outer_product_of_the_keys():
    lm = make_lm()
    batches = list(stream_batches(IDS, 768, 64, 4))
    assert [tuple(b.shape) for b in batches] == [(4, 64)] * 3
    assert torch.equal(torch.cat([b for b in batches], 1).reshape(-1), torch.as_tensor(IDS[:768]).reshape(4, 192).reshape(-1))
    st = collect_key_stats(lm, 1, batches, corpus="facts_tiny")
    keys = torch.cat([run_with_cache(lm, b, "blocks.1.mlp.hook_post")[1]["blocks.1.mlp.hook_post"].reshape(-1, 128)
                      for b in batches]).double()
    assert st.count == st.n_tokens == 768 and st.step is None and st.layer == 1
    assert torch.allclose(st.moment, keys.T @ keys / 768, rtol=1e-12, atol=1e-15)
    assert st.moment.dtype == torch.float64


def test_stateful_bodies_carry_memory_across_windows():
    lm = make_lm("xl")
    batches = list(stream_batches(STATS_IDS, 256, 32, 2))
    streamed = collect_key_stats(lm, 0, batches)
    state, keys = None, []
    for b in batches:
        out, cache = run_with_cache(lm, b, "blocks.0.mlp.hook_post", state=state)
        state = out.state
        keys.append(cache["blocks.0.mlp.hook_post"].reshape(-1, 128).double())
    keys = torch.cat(keys)
    assert torch.allclose(streamed.moment, keys.T @ keys / keys.shape[0], atol=1e-12)


def test_cache_round_trip_and_keys(tmp_path, monkeypatch):
    lm = make_lm()
    first = key_stats(lm, 0, STATS_IDS, corpus="mix", n_tokens=2048, seq_len=64, cache_dir=tmp_path)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and files[0].parts[-3:] == (model_fingerprint(lm), "mix", "layer0_n2048_T64.safetensors")

    def no_streaming(*a, **k):
        raise AssertionError("the cached statistics should have been loaded")

    monkeypatch.setattr(stats_module, "collect_key_stats", no_streaming)
    again = key_stats(lm, 0, STATS_IDS, corpus="mix", n_tokens=2048, seq_len=64, cache_dir=tmp_path)
    assert torch.equal(again.moment, first.moment) and again.count == first.count == 2048
    lazy = key_stats(lm, 0, no_streaming, corpus="mix", n_tokens=2048, seq_len=64, cache_dir=tmp_path)
    assert torch.equal(lazy.moment, first.moment)  # a corpus function is not called on a cache hit
    monkeypatch.undo()
    built = key_stats(lm, 0, lambda: STATS_IDS, corpus="mix", n_tokens=1024, seq_len=64, cache_dir=tmp_path)
    assert built.n_tokens == 1024  # ... and called on a miss
    key_stats(lm, 0, STATS_IDS, corpus="mix", n_tokens=2560, seq_len=64, cache_dir=tmp_path)  # another count
    with torch.no_grad():
        lm.body.blocks[0].mlp.fc1.weight.mul_(1.01)  # another model
    key_stats(lm, 0, STATS_IDS, corpus="mix", n_tokens=2048, seq_len=64, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4


def test_too_few_keys_name_the_count_needed():
    lm = make_lm()
    with pytest.raises(StatsError, match=r"100 keys for d_mlp = 128.*at least 128 key tokens.*about 1280"):
        key_stats(lm, 0, IDS, corpus="facts_tiny", n_tokens=100, seq_len=50)
    with pytest.raises(StatsError, match="tokens asked for, the corpus has"):
        key_stats(lm, 0, IDS, corpus="facts_tiny", n_tokens=10**6)


def test_ill_conditioned_moment_is_refused():
    d = 8
    basis = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eig = torch.tensor([1.0] * (d - 1) + [1e-14], dtype=torch.float64)
    q, _ = torch.linalg.qr(basis)
    bad = KeyStats(q @ torch.diag(eig) @ q.T, count=1000, n_tokens=1000, layer=0, corpus="tiny")
    with pytest.raises(StatsError, match=r"ill-conditioned \(condition number 1e\+14 > 1e\+10; 1 of 8 .*at least 80"):
        bad.check()
    bad.check(max_condition=1e15)  # the bound is an option


def test_dead_units_are_left_out_of_the_solve():
    c = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    st = KeyStats(c, count=100, n_tokens=100, layer=0)
    st.check()  # a unit that never fired is not ill-conditioning
    assert st.live.tolist() == [True, False, True]
    x = solve_live(c, torch.tensor([2.0, 5.0, 8.0], dtype=torch.float64), st.live)
    assert x.tolist() == [1.0, 0.0, 2.0]
