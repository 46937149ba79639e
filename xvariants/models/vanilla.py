"""Vanilla Transformer body: a stack of independent blocks (encoder or causal decoder)."""

from __future__ import annotations

import torch
from torch import nn

from xvariants.config_errors import check_positive_int, config_scope, require
from xvariants.layers.attention import DecodingCache, KVCache
from xvariants.layers.block import TransformerBlock
from xvariants.layers.init import init_gpt2
from xvariants.layers.rotary import RotaryEmbedding
from xvariants.models.contract import AuxOutput, Body, BodyOutput, State
from xvariants.models.registry import register_body


@register_body("vanilla")
class VanillaBody(Body):
    """``n_layers`` transformer blocks with their own weights.

    :param d_model: model width.
    :param n_layers: number of blocks.
    :param n_heads: attention heads per block.
    :param d_ff: feed-forward width (default ``4 * d_model``).
    :param dropout: residual dropout.
    :param attn_dropout: attention-probability dropout (default: ``dropout``).
    :param causal: decoder (True) or bidirectional encoder (False).
    :param norm_first: pre-LN (True, with a final LayerNorm) or post-LN (False).
    :param activation: feed-forward activation.
    :param bias: biases in linear maps and LayerNorms.
    :param init_std: std of the GPT-2 initialisation.
    :param rotary: rotary positions on queries and keys in every block (usually with the
        model's ``positions: none``; the two can also be combined).
    :param rotary_base: RoPE wavelength base. :param rotary_fraction: share of each head's
        channels that is rotated.
    """

    @config_scope("model.")
    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float | None = None,
        causal: bool = True,
        norm_first: bool = True,
        activation: str = "gelu",
        bias: bool = True,
        init_std: float = 0.02,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        rotary_fraction: float = 1.0,
    ):
        super().__init__()
        check_positive_int(n_layers, "n_layers")
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        require(0.0 <= dropout < 1.0, "model.dropout", f"must be in [0, 1), got {dropout}")
        require(rotary_base > 1.0, "model.rotary_base", f"must be > 1, got {rotary_base}")
        require(0.0 < rotary_fraction <= 1.0, "model.rotary_fraction", f"must be in (0, 1], got {rotary_fraction}")
        require(
            not rotary or int(d_model // n_heads * rotary_fraction) >= 2,
            "model.rotary_fraction",
            f"rotates no channel pair of a {d_model // n_heads}-wide head",
        )
        self.d_model, self.causal = d_model, causal
        # one rotary module (it holds only its frequencies) shared by every block
        rope = RotaryEmbedding(d_model // n_heads, base=rotary_base, fraction=rotary_fraction) if rotary else None
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d_model,
                n_heads,
                4 * d_model if d_ff is None else d_ff,
                dropout=dropout,
                attn_dropout=dropout if attn_dropout is None else attn_dropout,
                norm_first=norm_first,
                activation=activation,
                bias=bias,
                rotary=rope,
            )
            for _ in range(n_layers)
        )
        # Pre-LN leaves the residual stream unnormalised; post-LN blocks end in a LayerNorm already.
        self.ln_f = nn.LayerNorm(d_model, bias=bias) if norm_first else nn.Identity()
        init_gpt2(self, n_layers, std=init_std)

    def forward(
        self,
        h: torch.Tensor,
        state: State | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
        return_attention: bool = False,
    ) -> BodyOutput:
        if state is not None:
            raise ValueError("the vanilla body is stateless: pass state=None (use the xl body for segment memory)")
        if cache is not None and not self.causal:
            raise ValueError("a bidirectional vanilla body has no decoding cache: pass cache=None")
        attentions = [] if return_attention else None
        for i, block in enumerate(self.blocks):
            h, w = block(
                h,
                causal=self.causal,
                key_padding_mask=padding_mask,
                kv_cache=None if cache is None else cache.layers[i],
                need_weights=return_attention,
            )
            if attentions is not None:
                attentions.append(w)
        return BodyOutput(self.ln_f(h), None, AuxOutput(attentions=attentions))

    def run_block(self, i: int, h: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Block ``i`` alone on ``h`` ``[B, T, D]``; ``kv_cache`` holds the keys/values of the
        positions before ``h``'s (causal tracing resumes a forward at a layer with it:
        :mod:`xvariants.interpret.resume`)."""
        return self.blocks[i](h, causal=self.causal, kv_cache=kv_cache)[0]

    def new_cache(self) -> DecodingCache | None:
        # a bidirectional body's earlier positions change with every new token: nothing to cache
        return DecodingCache(len(self.blocks)) if self.causal else None
