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

import weakref

import torch
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.layers.attention import DecodingCache
from xvariants.layers.feedforward import FeedForward
from xvariants.layers.hooks import HookPoint
from xvariants.layers.memory import (
    SegmentLengths,
    init_memory,
    memory_length,
    truncate_memory,
    update_memory,
    validate_memory,
)
from xvariants.layers.relative_attention import (
    MemoryKV,
    RelativeMultiHeadAttention,
    relative_positions,
    xl_attention_mask,
)
from xvariants.models.contract import AuxOutput, Body, BodyOutput, State
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


class XLLayer(nn.Module):
    """One Transformer-XL layer (``RelPartialLearnableDecoderLayer``): relative attention
    over memory + segment, then the ReLU feed-forward; post-LN or pre-LN."""

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
        super().__init__()
        self.norm_first = norm_first
        self.attn = RelativeMultiHeadAttention(d_model, n_heads, d_head, dropout=attn_dropout, own_biases=own_biases)
        self.ln1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.mlp = FeedForward(d_model, d_ff, activation="relu", dropout=dropout, bias=True)
        self.ln2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        *,
        mem: torch.Tensor | None,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        allowed: torch.Tensor,
        need_weights: bool = False,
        kv_memory: MemoryKV | None = None,
        reuse_kv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.hook_resid_pre(x)
        kw = dict(u=u, v=v, allowed=allowed, need_weights=need_weights, kv_memory=kv_memory, reuse_kv=reuse_kv)
        if self.norm_first:
            # LN(cat(mem, x)) == cat(LN(mem), LN(x)): LayerNorm is per position
            # (with cached memory keys/values the memory is not read again, only its length)
            mem_in = None if mem is None else (mem if reuse_kv else self.ln1(mem))
            a, w = self.attn(self.ln1(x), r, mem=mem_in, **kw)
            x = self.hook_resid_mid(x + self.hook_attn_out(self.drop(a)))
            x = x + self.hook_mlp_out(self.drop(self.mlp(self.ln2(x))))
        else:
            a, w = self.attn(x, r, mem=mem, **kw)
            x = self.hook_resid_mid(self.ln1(x + self.hook_attn_out(self.drop(a))))
            x = self.ln2(x + self.hook_mlp_out(self.drop(self.mlp(x))))
        return self.hook_resid_post(x), w


@register_body("xl")
class XLBody(SegmentLengths, Body):
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

    stateful = True
    owns_positions = True

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
        require(isinstance(n_layers, int) and n_layers >= 1, "model.n_layers", f"must be >= 1, got {n_layers}")
        require(isinstance(d_model, int) and d_model >= 2 and d_model % 2 == 0, "model.d_model",
                f"must be an even integer >= 2 (sines and cosines of the distances), got {d_model}")
        require(isinstance(n_heads, int) and n_heads >= 1, "model.n_heads", f"must be >= 1, got {n_heads}")
        if d_head is None:
            require(d_model % n_heads == 0, "model.n_heads",
                    f"d_model={d_model} is not divisible by n_heads={n_heads} (or set model.d_head)", "divisors of d_model")
            d_head = d_model // n_heads
        require(isinstance(d_head, int) and d_head >= 1, "model.d_head", f"must be >= 1, got {d_head}")
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            require(0.0 <= p < 1.0, f"model.{name}", f"must be in [0, 1), got {p}")
        require(init_std > 0, "model.init_std", f"must be > 0, got {init_std}")
        self.d_model, self.causal = d_model, True
        self.n_layers, self.n_heads, self.d_head = n_layers, n_heads, d_head
        self.untie_r, self.norm_first = untie_r, norm_first
        self.set_eval_lengths(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        self.drop = nn.Dropout(dropout)
        if untie_r:
            self.r_w_bias = self.r_r_bias = None
        else:
            self.r_w_bias = nn.Parameter(torch.zeros(n_heads, d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(n_heads, d_head))
        self.blocks = nn.ModuleList(
            XLLayer(
                d_model, n_heads, d_head, d_ff or 4 * d_model,
                dropout=dropout, attn_dropout=attn_dropout, norm_first=norm_first, own_biases=untie_r,
                layer_norm_eps=layer_norm_eps,
            )
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else nn.Identity()
        self.hook_pos = HookPoint()  # R after dropout, [M + T, D]
        init_transformer_xl(self, init_std)
        #: without gradients (evaluation, generation) keep the keys/values of the memory (and
        #: W_R R) from the previous call instead of projecting the whole memory again every
        #: segment as the original does; exact, used only when the same memory object comes
        #: back, the weights are unchanged and no hook listens. False = the original's cost.
        self.memory_kv_cache = True
        self._kv_cache: dict | None = None
        self._r_cache: tuple | None = None
        self._hook_points = [m for m in self.modules() if isinstance(m, HookPoint)]

    def extra_repr(self) -> str:
        return (f"mem_len={self.mem_len}, clamp_len={self.clamp_len}, same_length={self.same_length}, "
                f"norm_first={self.norm_first}, untie_r={self.untie_r}")

    # ------------------------------------------------------- memory key/value cache
    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_kv_cache"] = None  # weak references and derived tensors: never pickled or copied
        state["_r_cache"] = None
        return state

    def clear_memory_kv(self) -> None:
        """Drop the cached memory keys/values (they are rebuilt from the memory on the next
        call). Only needed after editing weights through ``.data``, which PyTorch's version
        counters cannot see; optimizer steps and ``load_state_dict`` are detected."""
        self._kv_cache = None

    def _param_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def _kv_cache_allowed(self) -> bool:
        return self.memory_kv_cache and not torch.is_grad_enabled() and not any(h.has_hooks() for h in self._hook_points)

    def _memory_kv(self, state, mems, batch_size: int) -> tuple[list[MemoryKV] | None, bool]:
        """(per-layer key/value stores, whether they hold the keys/values of ``mems``)."""
        if not self._kv_cache_allowed() or self.mem_len == 0:
            if self._kv_cache is not None:
                self._kv_cache = None
            return None, False
        c = self._kv_cache
        if c is None or len(c["layers"]) != self.n_layers:
            c = self._kv_cache = {"layers": [MemoryKV() for _ in range(self.n_layers)], "refs": [], "versions": []}
            return c["layers"], False
        if mems is None or state is None:
            return c["layers"], False
        entries = list(state)[: self.n_layers]
        valid = (
            len(c["refs"]) == len(entries)
            and all(ref() is s and s._version == ver for ref, ver, s in zip(c["refs"], c["versions"], entries))
            and c.get("params") == self._param_key()
            and all(kv.k is not None and kv.k.size(0) == batch_size and len(kv) >= memory_length(mems) for kv in c["layers"])
        )
        return c["layers"], valid

    def _remember_kv(self, new_state: list[torch.Tensor]) -> None:
        c = self._kv_cache
        entries = new_state[: self.n_layers]
        for kv, s in zip(c["layers"], entries):
            kv.keep_last(s.size(1))
        c["refs"] = [weakref.ref(s) for s in entries]
        c["versions"] = [s._version for s in entries]
        c["params"] = self._param_key()

    def _relative_positions(self, S: int, h: torch.Tensor) -> torch.Tensor:
        """R for ``S`` keys; without gradients the same tensor is returned for the same
        (S, clamp_len, dtype, device), so each layer can reuse its ``W_R R``."""
        if torch.is_grad_enabled() or not self.memory_kv_cache:
            return relative_positions(S, self.d_model, self.clamp_len, device=h.device, dtype=h.dtype)
        key = (S, self.clamp_len, h.dtype, h.device)
        c = self._r_cache
        if c is None or c[0] != key or c[1]._version != c[2]:  # (a hook may have edited it in place)
            r = relative_positions(S, self.d_model, self.clamp_len, device=h.device, dtype=h.dtype)
            c = self._r_cache = (key, r, r._version)
        return c[1]

    # ------------------------------------------------------------------- forward
    def init_state(self, batch_size: int, device: torch.device) -> list[torch.Tensor]:
        """Empty memories: ``n_layers + 1`` tensors ``[batch_size, 0, d_model]``."""
        dtype = next(self.parameters()).dtype
        return init_memory(self.n_layers + 1, batch_size, self.d_model, device=device, dtype=dtype)

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
        B, T, D = h.shape
        if self.same_length and self.mem_len < 1:
            raise ConfigError("model.same_length", "needs mem_len >= 1")
        if self.clamp_len > 0 and self.clamp_len >= self.mem_len + T:
            raise ConfigError(
                "model.clamp_len",
                f"clamp_len={self.clamp_len} never clamps: the longest distance with mem_len={self.mem_len} and "
                f"segment length {T} is {self.mem_len + T - 1}",
                f"-1 (off) or 1..{self.mem_len + T - 1}",
            )
        mems = validate_memory(state, n_tensors=self.n_layers + 1, batch_size=B, d_model=D)
        mems = truncate_memory(mems, self.mem_len)
        if mems is not None:
            mems = [m.to(device=h.device, dtype=h.dtype) for m in mems]
        M = memory_length(mems)
        S = M + T
        allowed = xl_attention_mask(T, M, same_length=self.same_length, mem_len=self.mem_len, device=h.device)
        if padding_mask is not None:
            if padding_mask.shape != (B, T):
                raise ValueError(f"padding_mask must be [B, T] = {(B, T)} (the segment), got {tuple(padding_mask.shape)}")
            pad = torch.cat([padding_mask.new_zeros(B, M), padding_mask], dim=1).bool()
            self_key = torch.arange(S, device=h.device)[None, :] == (torch.arange(T, device=h.device)[:, None] + M)
            allowed = (allowed[None, None] & ~pad[:, None, None, :]) | self_key
        r = self.hook_pos(self.drop(self._relative_positions(S, h)))
        attentions = [] if return_attention else None
        kv_layers, reuse = self._memory_kv(state, mems, B)
        hids = [h]
        x = h
        for i, block in enumerate(self.blocks):
            x, w = block(
                x, r, mem=None if mems is None else mems[i], u=self.r_w_bias, v=self.r_r_bias,
                allowed=allowed, need_weights=return_attention,
                kv_memory=None if kv_layers is None else kv_layers[i], reuse_kv=reuse,
            )
            hids.append(x)
            if attentions is not None:
                attentions.append(w)
        new_state = update_memory(mems, hids, self.mem_len)
        if kv_layers is not None:
            self._remember_kv(new_state)
        return BodyOutput(self.drop(self.ln_f(x)), new_state, AuxOutput(attentions=attentions))
