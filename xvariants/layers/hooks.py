"""Identity modules that mark named activations (TransformerLens-style hook points).

A ``HookPoint`` returns its input unchanged. Because it is a module, its place in the
module tree gives it a canonical name (``body.blocks.0.attn.hook_pattern``), and a
PyTorch forward hook registered on it can read the activation or return a replacement.
With no hook registered the call costs one module dispatch and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn


class HookPoint(nn.Module):
    """Identity on a tensor; a place to attach forward hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def has_hooks(self) -> bool:
        """True when someone listens here; lets callers skip work nobody will read."""
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)
