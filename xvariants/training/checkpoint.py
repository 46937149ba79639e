"""The Lightning side of safe checkpoints: atomic saves and ``weights_only`` loads for the Trainer,
and the checkpoint callback that keeps a run folder's checkpoints its own across resumes.
The file operations themselves live in :mod:`xvariants.loading`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from xvariants.loading import atomic_torch_save, remove_stale_temp_files, safe_load

log = logging.getLogger("xvariants")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin: atomic saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")


def _inside(path: str, folder: str | None) -> bool:
    if not path or not folder:
        return False
    return Path(folder).resolve() in Path(path).resolve().parents


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with two rules for run folders (``configs/callbacks``):

    - "best" is the best checkpoint in this callback's folder (``dirpath``). Resumed into the
      same folder, the competition continues (the earlier best stays best until beaten);
      resumed into another folder, it starts afresh: Lightning would restore the old run's
      ``best_model_path``, so that the summary and ``test=true`` used the old folder's file
      until this run validated. That path is dropped here.
    - on the first start, temporary files left by saves that were killed outright are removed
      from the folder (only names of :func:`xvariants.loading.atomic_torch_save`'s form).

    Same class name as Lightning's on purpose: a callback's state is stored in checkpoints under
    a key made from its class name, so checkpoints move between the two unchanged.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit" and self.dirpath:
            removed = remove_stale_temp_files(self.dirpath)
            if removed:
                log.warning(
                    "removed %d temporary file(s) left by interrupted checkpoint saves in %s: %s",
                    len(removed), self.dirpath, ", ".join(p.name for p in removed),
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            # Lightning's says it keeps best_model_path; the message below says what happens
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        if self.best_model_path and not _inside(self.best_model_path, self.dirpath):
            log.info(
                "the resumed run's best checkpoint (%s) is in another folder: this run's best is chosen "
                "among its own validations, in %s", self.best_model_path, self.dirpath,
            )
            self.best_model_path = ""
