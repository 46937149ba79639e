"""The transformer cell every body reuses: attention + feed-forward, pre-LN or post-LN."""

from __future__ import annotations

import torch
from torch import nn

from xvariants.layers.attention import MultiHeadAttention
from xvariants.layers.feedforward import FeedForward
from xvariants.layers.hooks import HookPoint
from xvariants.layers.rotary import RotaryEmbedding


class TransformerBlock(nn.Module):
    """One attention sublayer and one feed-forward sublayer with residual connections.

    Pre-LN (``norm_first=True``, GPT-2): ``x + drop(attn(LN(x)))`` then ``x + drop(ffn(LN(x)))``;
    stable without warm-up tricks, and the body adds a final LayerNorm.
    Post-LN (original Transformer): ``LN(x + drop(attn(x)))`` then ``LN(x + drop(ffn(x)))``.

    The attention is any module called as ``attn(x, *args, need_weights=..., **kwargs)`` that
    returns ``(out [B, T, D], weights or None)``: :class:`MultiHeadAttention` by default,
    :class:`~xvariants.layers.relative_attention.RelativeMultiHeadAttention` in Transformer-XL.

    :param d_model: model width.
    :param n_heads: attention heads (of the default attention).
    :param d_ff: feed-forward hidden width.
    :param dropout: dropout on each sublayer's output before the residual add.
    :param attn_dropout: dropout on attention probabilities (of the default attention).
    :param ffn_dropout: dropout on the feed-forward hidden activation.
    :param norm_first: pre-LN when True, post-LN when False.
    :param activation: feed-forward activation (``gelu``, ``relu``, ``silu``).
    :param bias: biases in linear maps and LayerNorms.
    :param layer_norm_eps: LayerNorm epsilon.
    :param rotary: rotary position embedding for queries and keys of the default attention
        (may be shared by blocks).
    :param attention: the attention module; None builds ``MultiHeadAttention(d_model, n_heads,
        dropout=attn_dropout, bias=bias, rotary=rotary)``.
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
        attention: nn.Module | None = None,
    ):
        super().__init__()
        if attention is not None and rotary is not None:
            raise ValueError("rotary positions belong to the default attention: build the given attention with them")
        self.norm_first = norm_first
        self.ln1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        if attention is None:
            attention = MultiHeadAttention(d_model, n_heads, dropout=attn_dropout, bias=bias, rotary=rotary)
        self.attn = attention
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
        *attn_args,
        mem: torch.Tensor | None = None,
        need_weights: bool = False,
        **attn_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``[B, T, D]`` -> ``(x [B, T, D], attention weights or None)``.

        Every other argument goes to the attention: ``causal``, ``key_padding_mask``,
        ``kv_cache`` for :class:`MultiHeadAttention`; relative positions, u/v biases,
        ``allowed`` and memory key/value stores for relative attention.

        :param mem: ``[B, M, D]`` positions the segment attends to without updating them
            (segment memory). Pre-LN normalises them with ``ln1`` as ``x``: LayerNorm is per
            position, so ``LN(cat(mem, x)) == cat(LN(mem), LN(x))``. Not when the attention is
            told to reuse the memory's cached keys/values (``reuse_kv=True``): it then reads
            only the memory's length.
        """
        x = self.hook_resid_pre(x)
        if mem is not None:
            attn_kwargs["mem"] = self.ln1(mem) if self.norm_first and not attn_kwargs.get("reuse_kv") else mem
        a_in = self.ln1(x) if self.norm_first else x
        a, weights = self.attn(a_in, *attn_args, need_weights=need_weights, **attn_kwargs)
        x = x + self.hook_attn_out(self.drop(a))
        x = self.hook_resid_mid(x if self.norm_first else self.ln1(x))
        m = self.mlp(self.ln2(x) if self.norm_first else x)
        x = x + self.hook_mlp_out(self.drop(m))
        return self.hook_resid_post(x if self.norm_first else self.ln2(x)), weights
