"""Rotary position embedding (RoPE, Su et al., 2021).

Queries and keys have channel pairs rotated by an angle proportional to their position, so
``q_i . k_j`` depends on the content and on ``i - j`` only: relative positions without a
position table, no length limit, and nothing added to the residual stream. Pairs are
``(c, c + dim/2)`` (the GPT-NeoX / Llama layout); ``fraction < 1`` rotates only the first
channels of each head and leaves the rest position-free.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotate ``[..., T, d_head]`` queries or keys by their positions.

    :param d_head: per-head width.
    :param base: wavelength base (10000 as in the paper): pair ``c`` turns by
        ``position * base^(-2c/dim)`` radians.
    :param fraction: share of each head's channels that is rotated (rounded down to even).
    """

    def __init__(self, d_head: int, base: float = 10000.0, fraction: float = 1.0):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"rotary fraction must be in (0, 1], got {fraction}")
        if base <= 1.0:
            raise ValueError(f"rotary base must be > 1, got {base}")
        self.dim = int(d_head * fraction) // 2 * 2
        if self.dim == 0:
            raise ValueError(f"rotary fraction {fraction} of d_head={d_head} leaves no channel pair to rotate")
        self.base = base
        inv_freq = base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def angles(self, length: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape ``[length, dim / 2]`` for positions ``offset .. offset + length - 1``."""
        pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` ``[..., T, d_head]`` at positions ``offset ..`` -> rotated ``x`` (same shape, dtype)."""
        return self._rotate(x, *self.angles(x.size(-2), offset, x.device))

    def rotate_pair(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of the same positions, rotated with one computation of the angles."""
        cos, sin = self.angles(q.size(-2), offset, q.device)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        x1, x2, rest = x[..., :half].float(), x[..., half : self.dim].float(), x[..., self.dim :]
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
        return rotated if rest.size(-1) == 0 else torch.cat([rotated, rest], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"
