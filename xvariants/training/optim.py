"""AdamW with decay/no-decay groups and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.layers.positions import LearnedPositions

#: modules whose ``weight`` is a matrix worth decaying; everything else (biases, norms,
#: learned attention biases such as Transformer-XL's u/v, halting biases) is not decayed.
#: The learned position table is an embedding like any other (nanoGPT and GPT-2 decay it too).
DECAY_MODULES = (nn.Linear, nn.Embedding, LearnedPositions)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (Linear/Embedding/position-table weights) and the rest.

    Tied parameters appear once (``named_parameters`` de-duplicates them).
    """
    decay_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, DECAY_MODULES) and getattr(m, "weight", None) is not None
    }
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + 0.5 * (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * progress))


def validate_optim(optim: dict) -> None:
    require(optim.get("lr", 0) > 0, "optim.lr", f"must be > 0, got {optim.get('lr')}")
    require(optim.get("weight_decay", 0) >= 0, "optim.weight_decay", f"must be >= 0, got {optim.get('weight_decay')}")
    require(optim.get("warmup_steps", 0) >= 0, "optim.warmup_steps", f"must be >= 0, got {optim.get('warmup_steps')}")
    require(
        0.0 <= optim.get("min_lr_ratio", 0.0) <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {optim.get('min_lr_ratio')}"
    )
    if optim.get("schedule", "cosine") not in ("cosine", "constant"):
        raise ConfigError("optim.schedule", f"unknown schedule {optim.get('schedule')!r}", ["cosine", "constant"])


def build_optimizer(model: nn.Module, optim: dict, total_steps: int):
    """AdamW + LambdaLR stepping every optimizer step, as Lightning's ``configure_optimizers`` dict."""
    validate_optim(optim)
    opt = torch.optim.AdamW(
        param_groups(model, optim.get("weight_decay", 0.0)),
        lr=optim["lr"],
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        eps=optim.get("eps", 1e-8),
    )
    if optim.get("schedule", "cosine") == "constant":
        fn = lambda step: min(1.0, (step + 1) / max(1, optim.get("warmup_steps", 0)))  # noqa: E731
    else:
        kw = dict(
            warmup_steps=optim.get("warmup_steps", 0), total_steps=total_steps, min_lr_ratio=optim.get("min_lr_ratio", 0.1)
        )
        fn = lambda step: warmup_cosine(step, **kw)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
