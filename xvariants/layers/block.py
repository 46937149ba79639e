"""The transformer cell every body reuses: attention + feed-forward, pre-LN or post-LN."""

from __future__ import annotations

import torch
from torch import nn

from xvariants.layers.attention import KVCache, MultiHeadAttention
from xvariants.layers.feedforward import FeedForward
from xvariants.layers.hooks import HookPoint
from xvariants.layers.rotary import RotaryEmbedding


class TransformerBlock(nn.Module):
    """One attention sublayer and one feed-forward sublayer with residual connections.

    Pre-LN (``norm_first=True``, GPT-2): ``x + drop(attn(LN(x)))`` then ``x + drop(ffn(LN(x)))``;
    stable without warm-up tricks, and the body adds a final LayerNorm.
    Post-LN (original Transformer): ``LN(x + drop(attn(x)))`` then ``LN(x + drop(ffn(x)))``.

    :param d_model: model width.
    :param n_heads: attention heads.
    :param d_ff: feed-forward hidden width.
    :param dropout: dropout on each sublayer's output before the residual add.
    :param attn_dropout: dropout on attention probabilities.
    :param ffn_dropout: dropout on the feed-forward hidden activation.
    :param norm_first: pre-LN when True, post-LN when False.
    :param activation: feed-forward activation (``gelu``, ``relu``, ``silu``).
    :param bias: biases in linear maps.
    :param layer_norm_eps: LayerNorm epsilon.
    :param rotary: rotary position embedding for queries and keys (may be shared by blocks).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
        norm_first: bool = True,
        activation: str = "gelu",
        bias: bool = True,
        layer_norm_eps: float = 1e-5,
        rotary: RotaryEmbedding | None = None,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.ln1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=attn_dropout, bias=bias, rotary=rotary)
        self.ln2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.mlp = FeedForward(d_model, d_ff, activation=activation, dropout=ffn_dropout, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``[B, T, D]`` -> ``(x [B, T, D], attention weights or None)``."""
        x = self.hook_resid_pre(x)
        a_in = self.ln1(x) if self.norm_first else x
        a, weights = self.attn(
            a_in, causal=causal, key_padding_mask=key_padding_mask, kv_cache=kv_cache, need_weights=need_weights
        )
        x = x + self.hook_attn_out(self.drop(a))
        x = self.hook_resid_mid(x if self.norm_first else self.ln1(x))
        m = self.mlp(self.ln2(x) if self.norm_first else x)
        x = x + self.hook_mlp_out(self.drop(m))
        return self.hook_resid_post(x if self.norm_first else self.ln2(x)), weights
