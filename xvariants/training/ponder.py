"""Observability of adaptive computation: a Lightning callback for bodies with ACT.

The scalar statistics (mean / max ponder steps, fraction halting at step 1 and at
``max_steps``, mean remainder, ponder cost) come from ``aux.stats`` and are logged by the
LightningModule itself. This callback adds what scalars cannot show:

* the histogram of ponder steps N over the real positions of a training batch, as a native
  histogram for TensorBoard / Weights & Biases and, for every logger (CSV included), as the
  fraction of positions taking 1, 2, ... steps (``train/ponder_frac_step{k}``);
* a per-position ponder map of one validation sample saved as a PNG (steps N + R per
  token, and each step's weight in the output), optionally also sent to TensorBoard / W&B.

It reads ``pl_module.last_aux`` (the :class:`~xvariants.models.contract.AuxOutput` of the last
step) and does nothing for bodies without ``aux.maps["n_updates"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("xvariants")


def ponder_steps(aux: Any, padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Steps N of the real positions of a batch (1-D float tensor), or None without ACT."""
    maps = getattr(aux, "maps", None) or {}
    n = maps.get("n_updates")
    if n is None:
        return None
    n = n.detach().float().cpu()
    real = n > 0  # padding starts halted: N = 0
    if padding_mask is not None and padding_mask.shape == n.shape:
        real &= ~padding_mask.detach().cpu().bool()
    return n[real]


def step_fractions(n: torch.Tensor, max_steps: int) -> dict[int, float]:
    """Fraction of positions taking exactly ``k`` steps, for ``k = 1 .. max_steps``."""
    total = max(n.numel(), 1)
    return {k: float((n == k).sum()) / total for k in range(1, max_steps + 1)}


def save_ponder_map(
    n_updates: torch.Tensor,
    path: str | Path,
    *,
    remainders: torch.Tensor | None = None,
    step_weights: torch.Tensor | None = None,
    tokens: list[str] | None = None,
    title: str = "ponder map",
    max_positions: int = 200,
):
    """Save a per-position ponder map of one sample as a PNG; returns the matplotlib figure.

    :param n_updates: ``[T]`` steps per position (0 = padding, dropped).
    :param remainders: ``[T]`` remainders; the bar then shows the ponder cost N + R.
    :param step_weights: ``[T, S]`` each step's weight in the output (a heatmap below the bars).
    :param tokens: labels of the positions (shown when there are at most 80).
    :param max_positions: plot at most the first ``max_positions`` real positions.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = n_updates.detach().float().cpu()
    keep = (n > 0).nonzero().squeeze(1)[:max_positions]
    n = n[keep]
    rho = n + (remainders.detach().float().cpu()[keep] if remainders is not None else 0.0)
    rows = 2 if step_weights is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.12 * len(keep) + 2), 2.6 * rows), squeeze=False)
    ax = axes[0, 0]
    ax.bar(range(len(keep)), rho.numpy(), color="tab:blue", width=0.9, label="N + R" if remainders is not None else "N")
    ax.set_ylabel("ponder (N + R)" if remainders is not None else "steps N")
    ax.set_xlim(-0.5, len(keep) - 0.5)
    ax.set_title(f"{title}: mean N {float(n.mean()) if len(n) else 0.0:.2f}, max {int(n.max()) if len(n) else 0}")
    if tokens is not None and len(keep) <= 80:
        ax.set_xticks(range(len(keep)))
        ax.set_xticklabels([repr(tokens[i])[1:-1] for i in keep.tolist()], fontsize=7)
    if step_weights is not None:
        w = step_weights.detach().float().cpu()[keep].T  # [S, T]
        ax2 = axes[1, 0]
        im = ax2.imshow(w.numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax2.set_ylabel("step")
        ax2.set_xlabel("position")
        ax2.set_yticks(range(w.size(0)))
        ax2.set_yticklabels([str(s + 1) for s in range(w.size(0))], fontsize=7)
        fig.colorbar(im, ax=ax2, label="step weight")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


class PonderLogger(Callback):
    """Histogram of ponder steps while training, ponder map of a validation sample as a PNG.

    :param every_n_steps: log the histogram every this many training steps.
    :param map_dir: where PNGs go (default ``<trainer.default_root_dir>/ponder_maps``); None
        with ``save_maps=False`` disables them.
    :param save_maps: save a ponder map of the first sample of the first validation batch at
        every validation run.
    :param max_positions: positions shown in a map.
    """

    def __init__(
        self, every_n_steps: int = 50, map_dir: str | None = None, save_maps: bool = True, max_positions: int = 200
    ):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.map_dir, self.save_maps, self.max_positions = every_n_steps, map_dir, save_maps, max_positions
        self.saved: list[Path] = []

    def _max_steps(self, pl_module, n: torch.Tensor) -> int:
        body = getattr(getattr(pl_module, "model", None), "body", None)
        bound = getattr(body, "n_steps", None)
        return int(bound) if bound else int(n.max()) if n.numel() else 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        n = ponder_steps(getattr(pl_module, "last_aux", None), batch.get("padding_mask") if isinstance(batch, dict) else None)
        if n is None or n.numel() == 0:
            return
        fractions = step_fractions(n, self._max_steps(pl_module, n))
        for logger in trainer.loggers:
            logger.log_metrics({f"train/ponder_frac_step{k}": v for k, v in fractions.items()}, step=step)
            exp = getattr(logger, "experiment", None)
            try:
                if hasattr(exp, "add_histogram"):  # TensorBoard
                    exp.add_histogram("train/ponder_steps", n, step, bins="auto")
                elif type(logger).__name__ == "WandbLogger":
                    import wandb

                    exp.log({"train/ponder_steps_hist": wandb.Histogram(n.numpy()), "trainer/global_step": step})
            except Exception as e:  # never let a logging backend stop training
                log.warning("ponder histogram not logged to %s: %s", type(logger).__name__, e)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.save_maps or batch_idx != 0 or trainer.sanity_checking:
            return
        aux = getattr(pl_module, "last_aux", None)
        maps = getattr(aux, "maps", None) or {}
        if "n_updates" not in maps:
            return
        tokens = None
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is not None and isinstance(batch, dict) and "input" in batch:
            try:
                tokens = [tok.decode([int(i)]) for i in batch["input"][0].tolist()]
            except Exception:  # a tokenizer that cannot decode single ids: no labels
                tokens = None
        root = Path(self.map_dir) if self.map_dir else Path(trainer.default_root_dir) / "ponder_maps"
        path = root / f"ponder_map_step{trainer.global_step:07d}.png"
        weights = maps.get("step_weights")
        fig = save_ponder_map(
            maps["n_updates"][0],
            path,
            remainders=maps.get("remainders", None)[0] if "remainders" in maps else None,
            step_weights=None if weights is None else weights[0],
            tokens=tokens,
            title=f"validation sample, step {trainer.global_step}",
            max_positions=self.max_positions,
        )
        self.saved.append(path)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_figure"):
                try:
                    exp.add_figure("val/ponder_map", fig, trainer.global_step)
                except Exception as e:
                    log.warning("ponder map not logged to %s: %s", type(logger).__name__, e)
