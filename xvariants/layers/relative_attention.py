"""Relative multi-head attention of Transformer-XL (Dai et al. 2019, Sec. 3.3).

For query ``i`` (the ``i``-th of ``q_len`` current positions, absolute key index
``m_len + i``) and key ``j`` of the ``k_len = m_len + q_len`` keys (memory first)::

    score[i, j] = ((q_i + u) . k_j  +  (q_i + v) . W_R R[m_len + i - j]) / sqrt(d_head)
                   \\__ content (a)+(c) __/   \\______ position (b)+(d) ______/

``R`` is the parameter-free sinusoid of the distance (all sines, then all cosines), built
for the distances ``k_len-1 ... 0`` in that order; ``W_R`` (``r_net``) is per layer; ``u``
(``r_w_bias``) and ``v`` (``r_r_bias``) are learned, shared by all layers (original PyTorch
code) or owned by each layer (``own_biases=True``, TF ``untie_r``). The position term is
computed as one matmul against the ``k_len`` distances and re-indexed by :func:`rel_shift`,
the pad-and-reshape trick of the original code (paper App. B).

Efficient path: the (rel-shifted, scaled, masked) position term is handed to
``F.scaled_dot_product_attention`` as an additive float ``attn_mask`` with query ``q + u``,
so the content term, softmax, dropout and value product run in one call (PyTorch's fused
kernel when no gradient flows into the mask, i.e. in evaluation; its math path in training).
The content scores and probabilities are materialised only when asked for
(``need_weights``) or when a hook listens on ``hook_content_score`` or ``hook_pattern``.
Without gradients, ``W_R R`` is reused across calls for the same ``R`` and weights, and
:class:`~xvariants.layers.memory_kv.MemoryKV` keeps the memory's keys/values so each segment
projects only itself.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.config_errors import ConfigError, check_positive_int, check_probability
from xvariants.layers.hooks import HookPoint
from xvariants.layers.positions import sinusoid_table

if TYPE_CHECKING:
    from xvariants.layers.memory_kv import MemoryKV


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Re-index scores computed against distances ``k_len-1 ... 0`` into key order.

    ``x`` is ``[..., q_len, k_len]`` where column ``c`` holds the score for distance
    ``k_len - 1 - c``. Returns ``out`` of the same shape with
    ``out[..., i, j] = x[..., i, j + q_len - 1 - i]``: the score for distance
    ``m_len + i - j`` (``m_len = k_len - q_len``), valid wherever ``j <= m_len + i``.
    Entries with ``j > m_len + i`` (the future) hold garbage (the zero pad or a wrapped
    row) and must be masked, as the causal mask always does.

    Same trick as the original ``_rel_shift``: prepend a zero column, read the buffer as
    ``[k_len + 1, q_len]``, drop its first row, read it back as ``[q_len, k_len]``; done
    here as one strided view of the padded buffer (no second copy).
    """
    return _shift_padded(F.pad(x, (1, 0)))


def _shift_padded(padded: torch.Tensor) -> torch.Tensor:
    """:func:`rel_shift` of ``x`` given ``padded = [0 | x]`` (``[..., q_len, k_len + 1]``,
    contiguous): the rows of the flat buffer read with stride ``k_len`` after skipping ``q_len``."""
    *lead, q_len, k_pad = padded.shape
    if not padded.is_contiguous():
        padded = padded.contiguous()
    k_len = k_pad - 1
    lead_strides = padded.stride()[:-2]
    return padded.as_strided((*lead, q_len, k_len), (*lead_strides, k_len, 1), padded.storage_offset() + q_len)


def relative_positions(k_len: int, d_model: int, clamp_len: int = -1, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``R``: sinusoids of the distances ``k_len-1, ..., 0`` (sines then cosines), ``[k_len, d_model]``.

    Distances above ``clamp_len`` use ``R[clamp_len]`` when ``clamp_len > 0``.
    """
    pos = torch.arange(k_len - 1, -1, -1.0, device=device)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    return sinusoid_table(pos, d_model).to(dtype)


def xl_attention_mask(
    q_len: int,
    m_len: int,
    *,
    same_length: bool = False,
    mem_len: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean ``[q_len, m_len + q_len]``, True where query ``i`` may attend key ``j``.

    Default: ``j <= m_len + i`` (all the memory and the causal part of the segment).
    ``same_length`` (the PyTorch original's rule): ``mask_len = k_len - mem_len``; keys
    ``j <= i - shift`` are also hidden, ``shift = q_len - mask_len`` if ``mask_len > 0`` else
    ``q_len``. In steady state (``m_len == mem_len``) every query sees exactly ``mem_len`` keys
    (itself and the ``mem_len - 1`` before it); while memory fills, at most ``mem_len``.
    """
    k_len = m_len + q_len
    ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    masked = torch.triu(ones, diagonal=1 + m_len)
    if same_length:
        mask_len = k_len - mem_len
        shift = q_len - mask_len if mask_len > 0 else q_len
        masked = masked | torch.tril(ones, diagonal=-shift)
    return ~masked


class RelativeMultiHeadAttention(nn.Module):
    """Transformer-XL relative multi-head attention (``RelPartialLearnableMultiHeadAttn``).

    Attention only (no residual, no LayerNorm): the caller adds those. Projections have no
    biases, as in the original: ``qkv`` (``qkv_net``, ``d_model -> 3 * n_heads * d_head``),
    ``r_net`` (``W_R``, ``d_model -> n_heads * d_head``) and ``out`` (``o_net``).

    :param d_model: model width.
    :param n_heads: number of heads.
    :param d_head: width per head (default ``d_model // n_heads``; need not divide d_model).
    :param dropout: dropout on the attention probabilities (``dropatt``).
    :param own_biases: give this layer its own ``r_w_bias`` (u) and ``r_r_bias`` (v);
        otherwise the caller passes shared ones to :meth:`forward`.

    ``forward(x, r, mem=..., u=..., v=..., allowed=..., need_weights=...)``:
    ``x`` ``[B, T, D]`` current segment; ``mem`` ``[B, M, D]`` memory (keys ``0..M-1``,
    no gradient expected); ``r`` ``[M + T, D]`` from :func:`relative_positions`;
    ``allowed`` bool ``[T, M + T]`` or ``[B, 1, T, M + T]`` (True = may attend), default
    :func:`xl_attention_mask` without ``same_length``. Returns ``(out [B, T, D],
    probabilities [B, H, T, M + T] or None)``.

    Hook points: ``hook_mem`` (the memory actually used: its length tells which keys are
    memory), ``hook_q/k/v`` (``[B, H, *, Dh]``; k and v cover memory + segment),
    ``hook_r`` (projected positions ``[H, M + T, Dh]``), ``hook_position_score`` (the
    rel-shifted position term ``[B, H, T, M + T]``, scaled by ``1/sqrt(d_head)``, before
    masking; future entries are garbage), ``hook_content_score`` (the scaled content term,
    same layout; their sum is the pre-mask attention logit), ``hook_pattern``
    (probabilities) and ``hook_z`` (per-head outputs).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int | None = None,
        dropout: float = 0.0,
        own_biases: bool = False,
    ):
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        check_probability(dropout, "attn_dropout")
        if d_head is None:
            if d_model % n_heads:
                raise ConfigError(
                    "n_heads", f"d_model={d_model} is not divisible by n_heads={n_heads}; set d_head", "divisors of d_model"
                )
            d_head = d_model // n_heads
        check_positive_int(d_head, "d_head")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_head
        self.dropout = dropout
        inner = n_heads * d_head
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(d_model, inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)
        if own_biases:
            self.r_w_bias = nn.Parameter(torch.zeros(n_heads, d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(n_heads, d_head))
            nn.init.normal_(self.r_w_bias, std=0.02)
            nn.init.normal_(self.r_r_bias, std=0.02)
        else:
            self.r_w_bias = self.r_r_bias = None
        self.hook_mem = HookPoint()
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_r = HookPoint()
        self.hook_content_score = HookPoint()
        self.hook_position_score = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self._rk_cache: tuple | None = None  # (weakref to r, weight key, W_R r) without gradients

    def _project_positions(self, r: torch.Tensor) -> torch.Tensor:
        """``W_R r``; without gradients the result for the same ``r`` object and unchanged
        weights is reused (the body passes the same R every segment in evaluation)."""
        if torch.is_grad_enabled() or self.hook_r.has_hooks():
            if self._rk_cache is not None:
                self._rk_cache = None
            return self.r_net(r)
        w = self.r_net.weight
        key = (w.data_ptr(), w._version, w.dtype, r._version)
        c = self._rk_cache
        if c is not None and c[0]() is r and c[1] == key:
            return c[2]
        rk = self.r_net(r)
        self._rk_cache = (weakref.ref(r), key, rk)
        return rk

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_rk_cache"] = None
        return state

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        *,
        mem: torch.Tensor | None = None,
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
        need_weights: bool = False,
        kv_memory: MemoryKV | None = None,
        reuse_kv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See the class docstring. For evaluation with long memories (no gradients):
        ``kv_memory`` keeps the keys/values of memory + segment after the call; with
        ``reuse_kv=True`` its last ``M`` positions must be the keys/values of ``mem`` under the
        current weights, and ``mem`` is not projected again (only its length is read)."""
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.d_head
        inner = H * Dh
        u = self.r_w_bias if u is None else u
        v = self.r_r_bias if v is None else v
        if u is None or v is None:
            raise ValueError("this attention layer has no own u/v biases (own_biases=False): pass shared u and v")
        if mem is not None and mem.size(1) > 0:
            mem = self.hook_mem(mem)
            M = mem.size(1)
            # q only for the segment; k, v for memory + segment (same weights as qkv_net on cat)
            w = self.qkv.weight
            q = F.linear(x, w[:inner]).view(B, T, H, Dh).transpose(1, 2)
            if kv_memory is not None and reuse_kv:
                k_new, v_new = F.linear(x, w[inner:]).view(B, T, 2, H, Dh).permute(2, 0, 3, 1, 4)
                k, val = kv_memory.append(M, k_new, v_new)
            else:
                kv = F.linear(torch.cat([mem.to(x.dtype), x], dim=1), w[inner:])
                k, val = kv.view(B, M + T, 2, H, Dh).permute(2, 0, 3, 1, 4)
                if kv_memory is not None:
                    kv_memory.reset(k, val)
        else:
            M = 0
            q, k, val = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
            if kv_memory is not None:
                kv_memory.reset(k, val)
        S = M + T
        if r.shape != (S, self.d_model):
            raise ValueError(f"relative positions must be [{S}, {self.d_model}] (memory {M} + segment {T}), got {tuple(r.shape)}")
        q = self.hook_q(q)  # [B, H, T, Dh]
        k, val = self.hook_k(k), self.hook_v(val)  # [B, H, S, Dh]
        rk = self.hook_r(self._project_positions(r).view(S, H, Dh).transpose(0, 1))  # [H, S, Dh]
        scale = 1.0 / math.sqrt(Dh)
        # Position term (b)+(d) against the distances k_len-1..0, re-indexed by the rel-shift.
        # One matmul per head over all B*T queries (W_R R is shared by the batch) writes the
        # padded buffer directly: a zero row prepended to W_R R gives the shift's zero column
        # (q . 0 = 0). The shift is then a strided view of that buffer (see rel_shift), and
        # 1/sqrt(d_head) is folded into q + v.
        rk_pad = F.pad(rk, (0, 0, 1, 0)).transpose(-2, -1)  # [H, Dh, S + 1]
        qv = ((q + v[:, None, :].to(q.dtype)) * scale).transpose(0, 1).reshape(H, B * T, Dh)
        buf = torch.matmul(qv, rk_pad.to(qv.dtype))  # [H, B*T, S + 1]: block (h, b) = [0 | x] of rel_shift
        bd = buf.as_strided((B, H, T, S), (T * (S + 1), B * T * (S + 1), S, 1), buf.storage_offset() + T)
        bd = self.hook_position_score(bd)  # [B, H, T, S]
        if allowed is None:
            allowed = xl_attention_mask(T, M, device=x.device)
        # additive mask (0 / -inf): much cheaper than a broadcast masked_fill
        neg = torch.zeros(allowed.shape, dtype=bd.dtype, device=bd.device).masked_fill_(~allowed, float("-inf"))
        p_drop = self.dropout if self.training else 0.0
        qu = q + u[:, None, :].to(q.dtype)
        weights = None
        if need_weights or self.hook_pattern.has_hooks() or self.hook_content_score.has_hooks():
            ac = self.hook_content_score((qu * scale) @ k.transpose(-2, -1))
            weights = self.hook_pattern((ac + bd + neg).softmax(dim=-1))
            y = F.dropout(weights, p_drop, self.training) @ val
        else:
            if bd.requires_grad or self.hook_position_score.has_hooks():
                bias = bd + neg
            else:  # without autograd, add the mask in place: bd is a view of this call's own buffer
                bias = bd.add_(neg)
            y = F.scaled_dot_product_attention(qu, k, val, attn_mask=bias, dropout_p=p_drop, scale=scale)
        y = self.hook_z(y.transpose(1, 2)).reshape(B, T, inner)
        return self.out(y), weights
