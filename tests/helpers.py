"""Test-only Lightning callbacks, importable by `python train.py +callbacks.x._target_=tests.helpers.X`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class BatchProbe(L.Callback):
    """Write, per rank, the first token of every stream of each training batch, and the losses."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append(
            {
                "index": int(batch["index"]),
                "first_tokens": batch["input"][:, 0].tolist(),
                "last_tokens": batch["input"][:, -1].tolist(),
                "next_tokens": batch["target"][:, -1].tolist(),
                "loss": float(outputs["loss"]),
            }
        )

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}_{os.getpid()}.json"
        path.write_text(json.dumps(self.records))
