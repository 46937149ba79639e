"""Position signals: sinusoidal and learned absolute positions, and the sinusoid table
shared with relative attention (distances) and Universal Transformer step signals."""

from __future__ import annotations

import torch
from torch import nn

#: absolute position kinds an embedding can add (``none``: the body brings its own)
POSITIONS = ("learned", "sinusoidal", "none")


def sinusoid_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional or reversed) positions.

    Returns ``[len(positions), dim]`` laid out as all sines then all cosines, the layout of
    the Transformer-XL code (Vaswani et al. interleave them; the two differ by a fixed
    permutation of channels, which a learned model does not notice).

    :param positions: 1-D float tensor of positions (or distances).
    :param dim: embedding width; must be even.
    """
    if dim % 2:
        raise ValueError(f"sinusoid width must be even, got {dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = torch.outer(positions.float(), inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal absolute positions; no parameters, no length limit."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    def forward(self, length: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
        pos = torch.arange(offset, offset + length, device=device)
        return sinusoid_table(pos, self.d_model)


class LearnedPositions(nn.Module):
    """A learned table of ``max_len`` absolute positions (GPT-2 style)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, length: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
        if offset + length > self.max_len:
            raise ValueError(
                f"sequence reaches position {offset + length} but learned positions stop at "
                f"max_len={self.max_len}; raise model.max_len or use positions=sinusoidal"
            )
        return self.weight[offset : offset + length]


def build_positions(kind: str, d_model: int, max_len: int) -> nn.Module | None:
    """``kind`` is one of ``learned``, ``sinusoidal`` or ``none`` (the body handles positions)."""
    if kind == "learned":
        return LearnedPositions(max_len, d_model)
    if kind == "sinusoidal":
        return SinusoidalPositions(d_model)
    if kind == "none":
        return None
    from xvariants.config_errors import ConfigError

    hint = " (rotary positions are a body option: positions: none, rotary: true)" if kind in ("rotary", "rope") else ""
    raise ConfigError("positions", f"unknown kind {kind!r}{hint}", POSITIONS)
