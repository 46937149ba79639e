"""Transformer-XL body (Dai et al. 2019): relative positional attention + segment-level
recurrent memory, faithful to the original PyTorch code (kimiyoung/transformer-xl,
``MemTransformerLM`` with ``attn_type=0``).

Per segment ``x`` ``[B, T, D]`` (the scaled, dropped-out token embeddings) and memory
``mems`` (``n_layers + 1`` tensors ``[B, M, D]``, see :mod:`xvariants.layers.memory`)::

    R     = dropout(sinusoid(distances M+T-1 ... 0, clamped at clamp_len))
    h_0   = x
    h_l   = XLLayer_l(h_{l-1}, memory = mems[l-1], R)            l = 1..n_layers
    out   = dropout(h_L)
    mems' = [cat(mems[i], h_i)[-mem_len:] for i in 0..n_layers]  (no gradient)

``XLLayer`` (post-LN, the default): ``o = LN(h + drop(RelAttn(h, mem)))``,
``h' = LN(o + drop(W2 drop(relu(W1 o + b1)) + b2))``. Pre-LN (``norm_first=True``): the
LayerNorm is applied to memory and segment before the projections,
``o = h + drop(RelAttn(LN(h), LN(mem)))``, ``h' = o + drop(FF(LN(o)))``; like the original
there is no final LayerNorm unless ``final_norm=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from xvariants.config_errors import config_scope, require
from xvariants.layers.attention import DecodingCache
from xvariants.layers.block import TransformerBlock
from xvariants.layers.hooks import HookPoint
from xvariants.layers.memory import SegmentMemory
from xvariants.layers.relative_attention import RelativeMultiHeadAttention
from xvariants.models.contract import AuxOutput, BodyOutput, State
from xvariants.models.memory_body import SegmentMemoryBody
from xvariants.models.registry import register_body


def init_transformer_xl(module: nn.Module, std: float = 0.02) -> None:
    """The original ``weights_init`` (``pytorch/train.py``, ``--init normal``):
    Linear weights and Embeddings ~ N(0, std), biases 0, LayerNorm weight ~ N(1, std) (not
    exactly 1), LayerNorm bias 0, ``r_w_bias`` / ``r_r_bias`` ~ N(0, std)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.split(".")[-1] in ("r_w_bias", "r_r_bias"):
            nn.init.normal_(p, 0.0, std)


class XLLayer(TransformerBlock):
    """One Transformer-XL layer (``RelPartialLearnableDecoderLayer``): a
    :class:`TransformerBlock` with relative attention over memory + segment and the ReLU
    feed-forward (dropout on its hidden activation too); post-LN or pre-LN.

    Called as ``layer(x, r, mem=..., u=..., v=..., allowed=..., need_weights=...,
    kv_memory=..., reuse_kv=...)`` (see :class:`RelativeMultiHeadAttention`).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_ff: int,
        *,
        dropout: float,
        attn_dropout: float,
        norm_first: bool,
        own_biases: bool,
        layer_norm_eps: float = 1e-5,
    ):
        attention = RelativeMultiHeadAttention(d_model, n_heads, d_head, dropout=attn_dropout, own_biases=own_biases)
        super().__init__(
            d_model, n_heads, d_ff, dropout=dropout, ffn_dropout=dropout, norm_first=norm_first, activation="relu",
            layer_norm_eps=layer_norm_eps, attention=attention,
        )
        # the module order of this layer before it was a TransformerBlock (attn, ln1, mlp, ln2):
        # parameters() follows it, and with it the init draws and optimizer states in checkpoints
        for name in ("ln1", "mlp", "ln2", "drop", *(k for k in self._modules if k.startswith("hook_"))):
            self._modules[name] = self._modules.pop(name)


@register_body("xl")
class XLBody(SegmentMemoryBody):
    """Transformer-XL: ``n_layers`` relative-attention layers with segment memory.

    State: a ``list`` of ``n_layers + 1`` tensors ``[B, M, D]`` (layer inputs of the ``M``
    most recent positions, entry 0 = embedding output), detached. Pass the returned state
    back with the next segment of the same streams; ``None`` starts fresh.

    :param d_model: model width (also the width of the relative sinusoids).
    :param n_layers: number of layers.
    :param n_heads: attention heads.
    :param mem_len: positions kept in memory per layer (0 = no memory). Changeable after
        construction (evaluation uses a longer memory): assign ``body.mem_len`` or call
        :meth:`set_eval_lengths`.
    :param d_head: width per head (default ``d_model // n_heads``).
    :param d_ff: feed-forward width (``d_inner``; default ``4 * d_model``).
    :param dropout: dropout on R, attention output, FF hidden and output, body output
        (the embedding dropout is the LM's ``emb_dropout``; set it equal for the original).
    :param attn_dropout: dropout on attention probabilities (``dropatt``).
    :param clamp_len: distances above it use R[clamp_len]; -1 = off (training default).
    :param same_length: every query attends to the same number of keys (``mem_len``).
    :param norm_first: pre-LN (True) or post-LN (False, the original default).
    :param untie_r: each layer owns its u/v (TF ``untie_r``, HF); False shares one pair
        across layers (original PyTorch code).
    :param final_norm: LayerNorm on the output (pre-LN only makes sense; the original has none).
    :param init_std: std of the N(0, std) init (LayerNorm weights ~ N(1, std)).
    :param layer_norm_eps: LayerNorm epsilon.
    """

    owns_positions = True

    @config_scope("model.")
    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mem_len: int,
        d_head: int | None = None,
        d_ff: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        clamp_len: int = -1,
        same_length: bool = False,
        norm_first: bool = False,
        untie_r: bool = False,
        final_norm: bool = False,
        init_std: float = 0.02,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        require(isinstance(n_layers, int) and n_layers >= 1, "n_layers", f"must be >= 1, got {n_layers}")
        require(isinstance(d_model, int) and d_model >= 2 and d_model % 2 == 0, "d_model",
                f"must be an even integer >= 2 (sines and cosines of the distances), got {d_model}")
        require(isinstance(n_heads, int) and n_heads >= 1, "n_heads", f"must be >= 1, got {n_heads}")
        if d_head is None:
            require(d_model % n_heads == 0, "n_heads",
                    f"d_model={d_model} is not divisible by n_heads={n_heads} (or set model.d_head)", "divisors of d_model")
            d_head = d_model // n_heads
        require(isinstance(d_head, int) and d_head >= 1, "d_head", f"must be >= 1, got {d_head}")
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            require(0.0 <= p < 1.0, name, f"must be in [0, 1), got {p}")
        require(init_std > 0, "init_std", f"must be > 0, got {init_std}")
        self.d_model, self.causal = d_model, True
        self.n_layers, self.n_heads, self.d_head = n_layers, n_heads, d_head
        self.untie_r, self.norm_first = untie_r, norm_first
        self.memory = SegmentMemory(
            n_layers + 1, d_model, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length, kv_layers=n_layers
        )
        self.drop = nn.Dropout(dropout)
        if untie_r:
            self.r_w_bias = self.r_r_bias = None
        else:
            self.r_w_bias = nn.Parameter(torch.zeros(n_heads, d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(n_heads, d_head))
        self.blocks = nn.ModuleList(
            XLLayer(
                d_model, n_heads, d_head, 4 * d_model if d_ff is None else d_ff,
                dropout=dropout, attn_dropout=attn_dropout, norm_first=norm_first, own_biases=untie_r,
                layer_norm_eps=layer_norm_eps,
            )
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else nn.Identity()
        self.hook_pos = HookPoint()  # R after dropout, [M + T, D]
        init_transformer_xl(self, init_std)

    def extra_repr(self) -> str:
        return (f"mem_len={self.mem_len}, clamp_len={self.clamp_len}, same_length={self.same_length}, "
                f"norm_first={self.norm_first}, untie_r={self.untie_r}")

    def new_cache(self) -> DecodingCache | None:
        return None  # context is carried by the memory (state), see LanguageModel.generate

    def forward(
        self,
        h: torch.Tensor,
        state: State | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
        return_attention: bool = False,
    ) -> BodyOutput:
        """:param h: ``[B, T, D]`` embeddings of the current segment.
        :param state: memory from the previous segment of the same streams (or None).
        :param padding_mask: ``[B, T]`` True at padded positions of the segment (memory
            positions are taken as real); each position still attends to itself.
        """
        if cache is not None:
            raise ValueError("the xl body carries context in its memory (`state`), not in a decoding cache: pass cache=None")
        if h.dim() != 3 or h.size(-1) != self.d_model:
            raise ValueError(f"xl body expects hidden states [B, T, {self.d_model}], got {tuple(h.shape)}")
        seg = self.begin_segment(state, h, padding_mask, kv_owner=self)
        r = self.hook_pos(self.drop(seg.r))
        attentions = [] if return_attention else None
        hids = [h]
        x = h
        for i, block in enumerate(self.blocks):
            x, w = block(x, r, u=self.r_w_bias, v=self.r_r_bias, need_weights=return_attention, **seg.attention_args(i))
            hids.append(x)
            if attentions is not None:
                attentions.append(w)
        new_state = self.memory.update(seg, hids)
        return BodyOutput(self.drop(self.ln_f(x)), new_state, AuxOutput(attentions=attentions))
