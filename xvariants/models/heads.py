"""Input embeddings and output heads around a body.

The head owns the loss so that an adaptive softmax (which never forms full logits during
training) can replace the plain linear head without the training loop noticing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.layers.hooks import HookPoint
from xvariants.layers.positions import build_positions

IGNORE_INDEX = -100


class InputEmbedding(nn.Module):
    """Token embedding (+ absolute positions) -> dropout.

    :param vocab_size: number of token ids.
    :param d_model: embedding width.
    :param positions: ``learned``, ``sinusoidal`` or ``none`` (the body brings its own).
    :param max_len: longest sequence learned positions cover.
    :param dropout: dropout on the summed embedding.
    :param scale: multiply token embeddings by sqrt(d_model) (Vaswani, Transformer-XL).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        positions: str = "learned",
        max_len: int = 1024,
        dropout: float = 0.0,
        scale: bool = False,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = build_positions(positions, d_model, max_len)
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.drop = nn.Dropout(dropout)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.max_len = max_len if positions == "learned" else None

    @property
    def weight(self) -> torch.Tensor:
        return self.tok.weight

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        h = self.hook_embed(self.tok(tokens) * self.scale)
        if self.pos is not None:
            h = h + self.hook_pos_embed(self.pos(tokens.size(1), offset, device=tokens.device))
        return self.drop(h)


class LinearHead(nn.Module):
    """Full softmax over the vocabulary; ``weight`` may be tied to the input embedding."""

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size, bias=bias)

    @property
    def weight(self) -> nn.Parameter:
        return self.proj.weight

    def tie_to(self, embedding: InputEmbedding) -> None:
        self.proj.weight = embedding.tok.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores ``[..., V]`` (softmax of them = next-token distribution)."""
        return self.proj(hidden)

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood (nats), 0 where ``targets == IGNORE_INDEX``."""
        logits = self.proj(hidden)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(targets)
