"""Multi-head self-attention on ``F.scaled_dot_product_attention``, with a KV cache.

Masks are built only when they are needed: a plain causal or bidirectional call goes to
SDPA with ``is_causal`` and no mask tensor, which lets PyTorch pick its fused kernels.
Attention probabilities are materialised only when asked for (``need_weights``) or when a
hook listens on ``hook_pattern`` or ``hook_scores`` (the scaled, masked logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.config_errors import ConfigError, check_positive_int, check_probability
from xvariants.layers.hooks import HookPoint
from xvariants.layers.rotary import RotaryEmbedding


Projection = Callable[[torch.Tensor], torch.Tensor]


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Tensors are ``[B, H, S, Dh]``; ``append`` concatenates along S and returns the whole cache.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            if k.size(0) != self.k.size(0):
                raise ValueError(f"KV cache holds batch size {self.k.size(0)}, got {k.size(0)}")
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class DecodingCache:
    """One :class:`KVCache` per attention layer of a body, plus the number of cached positions."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [KVCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask ``[B or 1, 1, q_len, k_len]``, True where a query may attend.

    Queries are the last ``q_len`` of the ``k_len`` positions (the earlier ones are cached).
    Each query may always see itself: a padded query would otherwise see no key at all and
    SDPA would return NaN there, which leaks into real positions through ``0 * NaN`` in later
    layers. Real queries never attend to padding, so this changes nothing for them.
    """
    offset = k_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None] + offset
    k_idx = torch.arange(k_len, device=device)[None, :]
    allowed = (k_idx <= q_idx) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        if key_padding_mask.shape[-1] != k_len:
            raise ValueError(f"padding mask covers {key_padding_mask.shape[-1]} positions, attention sees {k_len}")
        allowed = allowed & ~key_padding_mask[:, None, None, :].bool()
    return allowed | (k_idx == q_idx)[None, None]


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    :param d_model: model width; must be divisible by ``n_heads``.
    :param n_heads: number of heads.
    :param dropout: dropout on the attention probabilities.
    :param bias: whether the QKV and output projections have biases.
    :param rotary: a :class:`RotaryEmbedding` applied to queries and keys (after ``hook_q`` /
        ``hook_k``; cached keys are stored rotated), or None for no rotary positions.

    ``forward(x, causal=..., key_padding_mask=..., kv_cache=..., need_weights=...)`` takes
    ``x`` ``[B, T, D]``; ``key_padding_mask`` ``[B, S]`` is True at padded keys (S = cached + T).
    Returns ``(out [B, T, D], weights [B, H, T, S] or None)``.
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, rotary: RotaryEmbedding | None = None
    ):
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        check_probability(dropout, "attn_dropout")
        if d_model % n_heads:
            raise ConfigError(
                "n_heads", f"d_model={d_model} is not divisible by n_heads={n_heads}", "divisors of d_model"
            )
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.out.residual_projection = True
        self.rotary = rotary
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_scores = HookPoint()  # scaled, masked logits [B, H, T, S] (-inf where masked)
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    # ---- pieces of forward for callers that compute attention for a subset of positions (the
    # universal body's sparse ACT steps); no hook points fire and rotary positions are not applied
    def split_projections(self) -> tuple[Projection, Projection]:
        """``(project_q, project_kv)``: the query projection ``[..., D] -> [..., D]`` and the fused
        key/value projection ``[..., D] -> [..., 2 D]`` (keys first), heads side by side, for
        callers that project different positions for queries and for keys. Get them once per
        forward pass: they share one view of each part of the fused weight, so autograd sums
        their gradients there once."""
        D, w, b = self.d_model, self.qkv.weight, self.qkv.bias
        wq, wkv = w[:D], w[D:]
        bq, bkv = (None, None) if b is None else (b[:D], b[D:])
        return (lambda x: F.linear(x, wq, bq)), (lambda x: F.linear(x, wkv, bkv))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, H, T, Dh]``."""
        return t.view(*t.shape[:2], self.n_heads, self.d_head).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Attention of queries ``q`` ``[B, H, Q, Dh]`` over ``k``, ``v`` ``[B, H, S, Dh]``
        (``allowed`` ``[B or 1, 1, Q, S]`` True where a query may attend, None = everywhere),
        with this module's attention dropout; returns the heads merged, ``[B, Q, D]``, before
        the output projection :attr:`out`."""
        p_drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p_drop)
        return y.transpose(1, 2).reshape(q.size(0), q.size(2), self.d_model)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.rotary is not None:
            offset = getattr(kv_cache, "length", 0)  # cached positions come first (0 without a cache)
            q, k = self.rotary.rotate_pair(q, k, offset)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        S = k.size(2)
        p_drop = self.dropout if self.training else 0.0
        simple = key_padding_mask is None and (S == T or not causal)
        mask = None if simple else attention_mask(T, S, causal=causal, key_padding_mask=key_padding_mask, device=x.device)
        weights = None
        if need_weights or self.hook_pattern.has_hooks() or self.hook_scores.has_hooks():
            if mask is None and causal:
                mask = attention_mask(T, S, causal=True, key_padding_mask=None, device=x.device)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = self.hook_pattern(self.hook_scores(scores).softmax(dim=-1))
            y = F.dropout(weights, p_drop, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, is_causal=simple and causal)
        y = self.hook_z(y.transpose(1, 2)).reshape(B, T, D)
        return self.out(y), weights
