"""The one LightningModule for every body.

It knows the model contract and nothing about variants: next-token loss plus whatever
extra losses the body reports, aux statistics logged as they come, recurrent state carried
(detached) across consecutive batches of the same streams.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any

import numpy as np

import lightning as L
import torch

from xvariants.config_errors import ConfigError
from xvariants.constants import BIT_UNITS, IGNORE_INDEX
from xvariants.models import build_language_model, detach_state, map_state
from xvariants.models.contract import AuxOutput
from xvariants.training.optim import build_optimizer


class LMTask(L.LightningModule):
    """Language-model training around any body.

    :param model: flat model config (see ``configs/model/*.yaml``); stored in the checkpoint
        so :meth:`load_from_checkpoint` rebuilds the model without Hydra.
    :param vocab_size: number of token ids.
    :param optim: optimizer/schedule config (see ``configs/optim``).
    :param tokenizer_state: ``tokenizer.to_dict()``, saved so a checkpoint can decode and re-encode.
    :param data_meta: corpus description (name, splits, Python version for the stdlib corpus, ...).
    :param unit: token unit (``byte``, ``char``, ``word``, ``bpe``); byte/char also log ``bpc``.
    :param compile: ``torch.compile`` the model in place before fitting.
    :param log_accuracy: also log token and sequence accuracy on scored positions.
    :param data: the data config the model was trained on (eval.py rebuilds the test split from it).
    :param val_lengths: memory lengths (``mem_len`` / ``clamp_len`` / ``same_length``) a body with
        segment memory uses during validation, e.g. Transformer-XL's longer evaluation memory
        (the experiments' ``eval.val_mem_len``); None = the training lengths. Restored after.
    """

    def __init__(
        self,
        model: dict,
        vocab_size: int,
        optim: dict,
        tokenizer_state: dict | None = None,
        data_meta: dict | None = None,
        unit: str = "token",
        compile: bool = False,
        log_accuracy: bool = False,
        data: dict | None = None,
        val_lengths: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_language_model(dict(model), vocab_size)
        if val_lengths and not hasattr(self.model.body, "lengths"):
            raise ConfigError(
                "eval.val_mem_len",
                f"validation memory lengths need a body with segment memory; body {model.get('body')!r} has none",
            )
        self._val_lengths = contextlib.ExitStack()
        self.train_state = None  # recurrent state of the training streams (per rank)
        self.last_aux: AuxOutput | None = None  # for callbacks (ponder maps, ...)
        self._next_batch = 0  # index of the next training batch within the epoch
        self._resumed_mid_epoch = False
        self._rng_to_restore: dict | None = None
        self._eval_state = None
        self._eval_sums: dict[str, torch.Tensor] = {}
        self._t_batch = None

    # ------------------------------------------------------------------ steps
    def forward(self, tokens, targets=None, state=None, **kw):
        return self.model(tokens, targets, state, **kw)

    def _on_device(self, state):
        return map_state(state, lambda t: t.to(self.device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(
            batch["input"],
            batch["target"],
            self._on_device(self.train_state),
            padding_mask=batch.get("padding_mask"),
            return_logits=self.hparams.log_accuracy,
        )
        self.train_state = detach_state(out.state)
        self.last_aux = out.aux
        loss = out.loss + out.aux.total_loss()
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.aux.losses.items():
            self.log(f"train/{name}", value)
        for name, value in out.aux.stats.items():
            self.log(f"train/{name}", value)
        if self.hparams.log_accuracy:
            self._log_accuracy("train", out.logits, batch["target"])
        self._next_batch = int(batch["index"]) + 1
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            # dropout of the first resumed batch draws what the uninterrupted run drew
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: Any, batch_idx: int) -> None:
        if self._t_batch is not None:
            dt = time.perf_counter() - self._t_batch
            n = batch["input"].numel() * self.trainer.world_size
            self.log("train/tokens_per_sec", n / max(dt, 1e-9), prog_bar=False)

    def on_train_epoch_start(self) -> None:
        # memory from the end of the previous epoch belongs to other text: start fresh,
        # unless this epoch resumes one that a checkpoint interrupted
        finished = self._next_batch >= self.trainer.num_training_batches
        if not self._resumed_mid_epoch or finished:
            self.train_state = None
            self._next_batch = 0
        self._resumed_mid_epoch = False

    def _eval_step(self, batch: dict, prefix: str) -> None:
        out = self.model(
            batch["input"],
            batch["target"],
            self._eval_state,
            padding_mask=batch.get("padding_mask"),
            return_logits=self.hparams.log_accuracy,
        )
        self._eval_state = detach_state(out.state)
        self.last_aux = out.aux
        sums = self._eval_sums
        sums["nll"] = sums.get("nll", 0.0) + out.nll.detach().double().sum()
        sums["tokens"] = sums.get("tokens", 0.0) + torch.tensor(float(out.n_tokens), dtype=torch.float64, device=self.device)
        for name, value in out.aux.losses.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)
        for name, value in out.aux.stats.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)
        if self.hparams.log_accuracy:
            self._log_accuracy(prefix, out.logits, batch["target"])

    def _eval_epoch_start(self) -> None:
        self._eval_state = None
        self._eval_sums = {}

    def _eval_epoch_end(self, prefix: str) -> None:
        if not self._eval_sums:
            return
        nll = self.trainer.strategy.reduce(self._eval_sums["nll"], reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._eval_sums["tokens"], reduce_op="sum")
        loss = (nll / tokens.clamp(min=1)).float()
        self.log(f"{prefix}/loss", loss, prog_bar=True)
        self.log(f"{prefix}/ppl", torch.exp(loss.clamp(max=50)))
        if self.hparams.unit in BIT_UNITS:
            self.log(f"{prefix}/bpc", loss / math.log(2), prog_bar=True)
        self.log(f"{prefix}/tokens", tokens.float())
        self._eval_sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start()
        if self.hparams.val_lengths:
            self._val_lengths.enter_context(self.model.body.lengths(**self.hparams.val_lengths))

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start()

    def on_validation_epoch_end(self) -> None:
        try:
            self._eval_epoch_end("val")
        finally:
            self._val_lengths.close()  # back to the training lengths

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _log_accuracy(self, prefix: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        scored = targets != IGNORE_INDEX
        hit = (logits.argmax(-1) == targets) & scored
        self.log(f"{prefix}/acc_token", hit.sum() / scored.sum().clamp(min=1), sync_dist=prefix != "train")
        rows = scored.any(-1)
        seq_ok = ((hit | ~scored).all(-1) & rows).sum() / rows.sum().clamp(min=1)
        self.log(f"{prefix}/acc_seq", seq_ok, sync_dist=prefix != "train")

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            total = int(self.trainer.estimated_stepping_batches)
        return build_optimizer(self.model, dict(self.hparams.optim), total)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.compile:
            self.model.compile()

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self.train_state
        if state is not None and self._trainer is not None and self.trainer.world_size > 1:
            # every rank owns different streams: keep all of them, indexed by rank
            state = map_state(state, lambda t: self.all_gather(t))
        checkpoint["xvariants"] = {
            "format": 1,
            "next_batch": self._next_batch,
            "train_state": map_state(state, lambda t: t.detach().cpu()),
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
            "rng": get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        xv = checkpoint.get("xvariants")
        if xv is None or self._trainer is None:
            return
        state = xv.get("train_state")
        if state is not None and xv.get("world_size", 1) > 1:
            if xv["world_size"] != self.trainer.world_size:
                raise RuntimeError(
                    f"checkpoint carries recurrent state of {xv['world_size']} ranks; resume with the same number of devices"
                )
            state = map_state(state, lambda t: t[self.trainer.global_rank])
        self.train_state = state
        self._next_batch = xv.get("next_batch", 0)
        self._resumed_mid_epoch = self._next_batch > 0
        self._rng_to_restore = xv.get("rng")
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "resume_batch"):
            datamodule.resume_batch = self._next_batch


def get_rng_state() -> dict:
    """Global RNG states as tensors and ints only (so ``weights_only`` loading accepts them)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
