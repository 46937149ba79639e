"""Observability and end-to-end runs: ponder histogram / map callback, and the UT experiment
configs training from one command (train(cfg) as train.py calls it)."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.conftest import TINY, compose_train
from xvariants.models import build_body
from xvariants.training.ponder import ponder_steps, save_ponder_map, step_fractions


def test_ponder_steps_histogram_excludes_padding():
    body = build_body("universal", d_model=16, n_heads=2, act=True, max_steps=4, halting_bias_init=0.0).eval()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    out = body(torch.randn(2, 6, 16), padding_mask=pad)
    n = ponder_steps(out.aux, pad)
    assert n.numel() == 9 and n.min() >= 1
    fr = step_fractions(n, 4)
    assert sum(fr.values()) == pytest.approx(1.0) and set(fr) == {1, 2, 3, 4}
    assert ponder_steps(build_body("vanilla", d_model=16, n_layers=1, n_heads=2)(torch.randn(1, 2, 16)).aux) is None


def test_save_ponder_map(tmp_path):
    body = build_body("universal", d_model=16, n_heads=2, act=True, max_steps=4, halting_bias_init=0.0).eval()
    out = body(torch.randn(1, 12, 16))
    path = tmp_path / "maps" / "m.png"
    save_ponder_map(
        out.aux.maps["n_updates"][0],
        path,
        remainders=out.aux.maps["remainders"][0],
        step_weights=out.aux.maps["step_weights"][0],
        tokens=list("abcdefghijkl"),
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SMALL = ["model.d_model=32", "data.batch_size=8", "data.train_max_len=8", "data.eval_batch_size=4", "data.val_batches=2",
         "data.test_batches=1", "data.test_min_len=9", "data.test_max_len=16", "trainer.max_steps=4"]


def test_ut_act_experiment_trains_logs_ponder_and_reloads(tmp_path):
    from xvariants.training.run import load_task, train

    cfg = compose_train(["experiment=ut_addition_act", *TINY, *SMALL, "callbacks.ponder.every_n_steps=1"], tmp_path)
    metrics = train(cfg)
    for key in ("train/ponder_steps_mean", "train/halt_max_frac", "val/acc_token", "val/acc_seq", "test/acc_token"):
        assert key in metrics, key
    run = tmp_path / "run"
    assert list((run / "ponder_maps").glob("ponder_map_step*.png"))
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    assert any(r.get("train/ponder_frac_step8") not in (None, "") for r in rows)
    task, _ = load_task(str(run / "checkpoints" / "last.ckpt"))
    assert task.model.body.halting.ponder_calls.item() == 4  # the warm-up counter is checkpointed


@pytest.mark.slow
def test_ut_fixed_and_vanilla_experiments_train(tmp_path):
    from xvariants.training.run import train

    for name in ("ut_reverse_fixed", "ut_reverse_vanilla"):
        cfg = compose_train([f"experiment={name}", *TINY, *SMALL, "test=false"], tmp_path / name)
        metrics = train(cfg)
        assert torch.isfinite(torch.tensor(metrics["val/loss"])) and "val/acc_seq" in metrics
