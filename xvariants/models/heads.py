"""Input embeddings and output heads around a body.

The head owns the loss so that an adaptive softmax (which never forms full logits during
training) can replace the plain linear head without the training loop noticing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.constants import IGNORE_INDEX
from xvariants.layers.hooks import HookPoint
from xvariants.layers.positions import build_positions


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
        emb = self.tok(tokens)
        if self.scale != 1.0:  # x * 1.0 == x: skip a [B, T, D] multiply (and its backward)
            emb = emb * self.scale
        h = self.hook_embed(emb)
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
        return token_nll(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).view_as(targets)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")`` for
    ``logits`` ``[N, V]``: per-row NLL in float32, 0 where the target is ``-100``.

    The forward is the same computation (log-softmax, then pick the target), bit for bit.
    When a gradient is needed (eager mode), the backward is ``softmax * g`` with ``g``
    subtracted at each target - one pass over ``[N, V]`` - instead of autograd's
    ``nll_loss_backward`` (a zero-filled ``[N, V]`` gradient plus a scatter) followed by
    ``log_softmax_backward``; equal up to float rounding. Under ``torch.compile`` or
    without gradients the built-in is used.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad) or torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return _SoftmaxCrossEntropy.apply(logits, targets)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy with a single-pass backward (see :func:`token_nll`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        ignored = targets == IGNORE_INDEX
        safe = targets.masked_fill(ignored, 0)  # other out-of-range ids still raise in gather
        nll = logp.gather(1, safe[:, None]).squeeze(1).neg_().masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logp, safe, ignored)
        ctx.logits_dtype = logits.dtype
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll: torch.Tensor):
        logp, safe, ignored = ctx.saved_tensors
        g = grad_nll.float().masked_fill(ignored, 0.0)[:, None]  # [N, 1]
        grad = torch.exp(logp).mul_(g)  # softmax * g
        grad.scatter_add_(1, safe[:, None], g.neg())  # - g at the target
        return grad.to(ctx.logits_dtype), None
