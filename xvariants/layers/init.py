"""Weight initialisation schemes shared by the bodies."""

from __future__ import annotations

import math

from torch import nn


def init_gpt2(module: nn.Module, n_residual_layers: int, std: float = 0.02) -> None:
    """GPT-2 init: N(0, std) for linear and embedding weights, zero biases, unit LayerNorm,
    and projections that write into the residual stream scaled by 1/sqrt(2 * depth) so the
    residual variance does not grow with depth.

    Linear layers marked with ``residual_projection = True`` get the scaled std.
    """
    scaled = std / math.sqrt(2 * max(1, n_residual_layers))
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=scaled if getattr(m, "residual_projection", False) else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
