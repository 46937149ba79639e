"""A run folder's records survive every later start in the same folder (a resume with
``hydra.run.dir`` pointing at it, or a rerun): metrics are appended, run files kept beside.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder is not empty, and the run
files (``config.yaml``, ...) used to be rewritten: a resume into the original folder lost the
record of everything before it.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("xvariants")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing ``metrics.csv`` instead of deleting it.

    The existing header seeds the known columns, so Lightning's own column handling (it
    rewrites the file with a wider header when a new metric appears) keeps the earlier rows.
    """

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = list(header)  # the file's column order: appended rows must follow it
        log.info("appending metrics to %s (it holds the records of earlier starts in this folder)", path)

    def log_hparams(self, params: dict) -> None:
        path = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        earlier = path.read_text() if not self.hparams and path.is_file() else None
        super().log_hparams(params)
        if earlier is not None and path.read_text() != earlier:
            _numbered(path).write_text(earlier)


class CSVLogger(LightningCSVLogger):
    """``metrics.csv`` that keeps the rows of earlier starts in the same folder, and is written
    whenever a checkpoint is: a run killed and resumed from its last checkpoint has on disk
    every row up to that checkpoint. Rows of steps after the checkpoint that a resumed run
    repeats appear twice, the later ones being the resumed run's (same ``step`` value)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and getattr(rank_zero_only, "rank", 0) == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment  # Lightning's: a stand-in on the other ranks

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()


def write_run_file(path: Path, text: str) -> None:
    """Write one of a run's own files (``config.yaml``, ``run_meta.json``...). An earlier start
    in this folder that wrote different content keeps it, renamed to the first free
    ``<stem>.<n><suffix>`` (``config.1.yaml`` is the first start's, ...); ``path`` holds
    the latest start's."""
    if path.is_file() and path.read_text() != text:
        kept = _numbered(path)
        path.rename(kept)
        log.info("kept the earlier %s as %s", path.name, kept.name)
    path.write_text(text)


def _numbered(path: Path) -> Path:
    """The first ``<stem>.<n><suffix>`` beside ``path`` that does not exist yet (n = 1, 2, ...)."""
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    return kept
