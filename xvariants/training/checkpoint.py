"""The Lightning side of safe checkpoints: atomic saves and ``weights_only`` loads for the Trainer.
The file operations themselves live in :mod:`xvariants.loading`."""

from __future__ import annotations

from lightning.pytorch.plugins.io import TorchCheckpointIO

from xvariants.loading import atomic_torch_save, safe_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin: atomic saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")
