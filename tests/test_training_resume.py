"""Transformer-XL through the training loop: a mid-epoch checkpoint restores the memory and
the resumed run continues with identical losses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, compose_train
from xvariants.loading import atomic_torch_save, safe_load


def _run(tmp_path, *overrides):
    from xvariants.training.run import train

    cfg = compose_train([*TINY, *overrides], tmp_path)
    return train(cfg), Path(cfg.paths.output_dir)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_xl_resume_mid_epoch_restores_memory(tmp_path, tiny_text):
    base = [
        "model=xl", "data=text", f"data.corpus.path={tiny_text}", "data.batching=ordered", "data.batches_per_epoch=null",
        "data.seq_len=16", "data.batch_size=4", "data.eval_batch_size=4",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.mem_len=16",
        "model.dropout=0.0",  # dropout RNG restoration is the loop's business (tests/test_training.py)
        "trainer.max_steps=8", "trainer.val_check_interval=100",
        "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='step{step}'", "callbacks.model_checkpoint.monitor=null",
    ]
    _, straight = _run(tmp_path / "a", *base)
    full = _losses(straight)
    ckpt_path = straight / "checkpoints" / "step4.ckpt"
    assert ckpt_path.exists(), sorted(p.name for p in (straight / "checkpoints").iterdir())
    ckpt = safe_load(ckpt_path)
    state = ckpt["xvariants"]["train_state"]
    assert isinstance(state, list) and len(state) == 3  # n_layers + 1
    assert all(s.shape == (4, 16, 32) and not s.requires_grad for s in state)

    _, resumed = _run(tmp_path / "b", *base, f"ckpt_path={ckpt_path}")
    again = _losses(resumed)
    later = [s for s in full if s >= 4]
    assert later and all(s in again for s in later)
    for s in later:
        assert again[s] == pytest.approx(full[s], abs=1e-6), (s, again[s], full[s])

    # the test can fail: the same checkpoint without its memory continues differently
    ckpt["xvariants"]["train_state"] = [torch.zeros(4, 0, 32) for _ in range(3)]
    wiped = tmp_path / "wiped.ckpt"
    atomic_torch_save(ckpt, wiped)
    _, forgot = _run(tmp_path / "c", *base, f"ckpt_path={wiped}")
    other = _losses(forgot)
    assert max(abs(other[s] - full[s]) for s in later) > 1e-5
