"""Position-wise feed-forward network."""

from __future__ import annotations

import torch
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.layers.hooks import HookPoint

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class FeedForward(nn.Module):
    """``fc2(dropout(act(fc1(x))))``.

    Hook points follow TransformerLens: ``hook_pre`` is the pre-activation, ``hook_post``
    the activation that feeds ``fc2`` (the "key" that ROME/MEMIT edit against).

    :param d_model: model width.
    :param d_ff: hidden width.
    :param activation: ``gelu`` (GPT-2), ``relu`` (original Transformer / Transformer-XL) or ``silu``.
    :param dropout: dropout on the hidden activation (Transformer-XL puts one here).
    :param bias: whether the two linear maps have biases.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError("activation", f"unknown activation {activation!r}", ACTIVATIONS)
        require(isinstance(d_ff, int) and not isinstance(d_ff, bool) and d_ff > 0, "d_ff", f"must be a positive integer, got {d_ff!r}")
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.fc2.residual_projection = True  # scaled at init (GPT-2)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.hook_post(self.act(self.hook_pre(self.fc1(x))))))
