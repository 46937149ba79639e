"""Frozen keys and values of halted positions (``halted_update="freeze"``) for a
:class:`~xvariants.layers.block.TransformerBlock` with :class:`MultiHeadAttention`.

Under "freeze" a halted position's state is copied forward, and the keys/values it shows the
positions still running are computed once, from its final state plus the timing signal of the
step after it halted, and reused at every later step. Three consumers:

* :class:`StepKV`: the duck-typed KV cache of a dense step that merges the frozen keys/values;
* :class:`SparseFreezeStep`: a ``step_fn`` for :func:`~xvariants.layers.halting.loop.run_steps`
  that computes only what changes (keys/values of the positions whose state changed, queries,
  attention output, feed-forward and halting input of the running positions);
* :func:`extend_frozen_cache`: appends one decoding call's keys/values to every step's cache.
"""

from __future__ import annotations

import torch
from torch import nn

from xvariants.layers.attention import DecodingCache, KVCache
from xvariants.layers.halting.loop import SparseStep, StepResult
from xvariants.layers.steps import StepSignal


class StepKV:
    """Duck-typed KV cache for one dense step: keys/values of positions in ``refresh`` come
    from this step, the others keep the frozen values of earlier steps. With ``past`` (this
    step's decoding cache) the attention also sees the earlier tokens' keys/values; ``k`` /
    ``v`` keep only this call's positions."""

    def __init__(
        self,
        frozen: tuple[torch.Tensor, torch.Tensor] | None,
        refresh: torch.Tensor | None,
        past: KVCache | None = None,
    ):
        self.frozen, self.refresh, self.past = frozen, refresh, past
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is not None:
            m = self.refresh[:, None, :, None]  # [B, 1, T, 1] against [B, H, T, Dh]
            k, v = torch.where(m, k, self.frozen[0].to(k.dtype)), torch.where(m, v, self.frozen[1].to(v.dtype))
        self.k, self.v = k, v
        if self.past is not None and self.past.k is not None:
            return torch.cat([self.past.k, k], dim=2), torch.cat([self.past.v, v], dim=2)
        return k, v


class SparseFreezeStep:
    """``step_fn`` of an ACT loop under "freeze" that works only where something changes.

    While every position runs a step is one plain block call (its keys/values captured). After
    that, per step: keys/values for the positions whose state changed at the previous step,
    queries, attention output, feed-forward and halting input for the running positions
    (packed per row, finished rows dropped). Same results as dense steps with :class:`StepKV`
    (tested); no hook point inside the block fires, so callers use it only when none listens.

    :param block: the shared block (``ln1``, ``attn``, ``ln2``, ``mlp``, ``drop``, ``norm_first``).
    :param signal: the timing signals of this forward pass.
    :param padding_mask: ``[B, T]`` True at padding, or None.
    :param causal: causal attention.
    :param x: the initial states ``[B, T, D]`` (shape, dtype and device of the buffers).
    """

    def __init__(
        self, block: nn.Module, signal: StepSignal, padding_mask: torch.Tensor | None, causal: bool, x: torch.Tensor
    ):
        B, T, D = x.shape
        self.block, self.signal, self.padding_mask, self.causal = block, signal, padding_mask, causal
        self.kvbuf = x.new_zeros(B, T, 2 * D)  # keys | values of every position, as last computed
        # keys/values of the last all-running step, merged into kvbuf only if a sparse step follows
        self.dense_kv = None
        # positions whose keys/values are due: every real one at the first step
        real = torch.ones(B, T, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask.bool()
        self.refresh = real
        self.kpos = torch.arange(T, device=x.device)[None, None, :]
        self.project_q, self.project_kv = block.attn.split_projections()
        self.owned: torch.Tensor | None = None  # the states of the last sparse step, ours to update in place

    def __call__(self, x: torch.Tensor, n: int, running: torch.Tensor) -> StepResult:
        blk, sig = self.block, self.signal
        attn = blk.attn
        if bool(running.all()):  # nothing halted yet: one plain block call, keys/values captured
            z = x if sig.empty else x + sig.at(n, slice(None), slice(None))
            kv = StepKV(None, None)
            new, _ = blk(z, causal=self.causal, kv_cache=kv)
            self.dense_kv, self.refresh = (kv.k, kv.v), running
            return z, new
        B, T, D = x.shape
        pre = blk.norm_first
        if x is not self.owned:  # the caller's input or a block output autograd saved: work on a copy
            x = self.owned = x.clone()
        if torch.is_grad_enabled():
            put = lambda t, i, v: t.index_put(i, v)  # noqa: E731
        else:
            put = lambda t, i, v: t.index_put_(i, v)  # noqa: E731
        if self.dense_kv is not None:
            self.kvbuf = torch.cat([t.transpose(1, 2).reshape(B, T, D) for t in self.dense_kv], dim=-1)
            self.dense_kv = None
        # 1. keys/values of the positions whose state changed at the previous step
        rb, rt = self.refresh.nonzero(as_tuple=True)
        zr = x[rb, rt] + sig.at(n, rb, rt)
        ar = blk.ln1(zr) if pre else zr
        self.kvbuf = put(self.kvbuf, (rb, rt), self.project_kv(ar).to(self.kvbuf.dtype))
        # 2. queries of the running positions, packed per row: [Ba, Q]
        row_any = running.any(1)
        every_row = bool(row_any.all())
        rows = torch.arange(B, device=x.device) if every_row else row_any.nonzero().squeeze(1)
        run = running if every_row else running[rows]
        counts = run.sum(1)
        Q = int(counts.max())
        order = torch.argsort((~run).to(torch.uint8), dim=1, stable=True)[:, :Q]  # running positions first
        valid = torch.arange(Q, device=x.device)[None, :] < counts[:, None]
        Ba = rows.numel()
        qb = rows[:, None].expand(Ba, Q)
        # inputs, LayerNorm and query projection on the running positions only (flat), then
        # placed into the packed [Ba, Q] layout attention needs (empty slots stay zero)
        slots = valid.nonzero(as_tuple=True)
        index = (qb[slots], order[slots])
        zf = x[index] + sig.at(n, *index)  # [N, D]
        qf = self.project_q(blk.ln1(zf) if pre else zf)
        q = attn.split_heads(qf.new_zeros(Ba, Q, D).index_put(slots, qf))
        kv = self.kvbuf if every_row else self.kvbuf[rows]
        k, v = attn.split_heads(kv[..., :D]), attn.split_heads(kv[..., D:])
        kpos, qpos = self.kpos, order[:, :, None]
        allowed = (kpos <= qpos) if self.causal else None
        if self.padding_mask is not None:
            keep = ~(self.padding_mask if every_row else self.padding_mask[rows])[:, None, :]
            allowed = keep if allowed is None else allowed & keep
            allowed = allowed | (kpos == qpos)  # a query always sees itself
        af = attn.out(attn.attend(q, k, v, None if allowed is None else allowed[:, None])[slots])
        # 3. residuals and feed-forward of the running positions (flat)
        if pre:
            x1 = zf + blk.drop(af)
            x2 = x1 + blk.drop(blk.mlp(blk.ln2(x1)))
        else:
            x1 = blk.ln1(zf + blk.drop(af))
            x2 = blk.ln2(x1 + blk.drop(blk.mlp(x1)))
        self.refresh = running
        return SparseStep(index, zf, x2, x)


@torch.no_grad()
def extend_frozen_cache(
    cache: DecodingCache,
    step_kv: list[tuple[torch.Tensor, torch.Tensor]],
    last_running: torch.Tensor,
    state: torch.Tensor,
    signal: StepSignal,
    block: nn.Module,
) -> None:
    """Append one decoding call's keys/values to every step's cache. ``step_kv[n]`` holds what
    the call's tokens exposed at step ``n`` of the steps the loop ran; later steps store each
    token's frozen keys/values: for a token that halted at the last step run (``last_running``),
    computed now from its final ``state`` plus the next step's signal (what a later, longer-
    running token will attend to), for the others the frozen values it already had."""
    ran, n_steps = len(step_kv), len(cache.layers)
    for n in range(ran):
        cache.layers[n].append(*step_kv[n])
    if ran == n_steps:
        return
    z = signal(state, ran)
    a = block.ln1(z) if block.norm_first else z
    attn = block.attn
    k, v = attn.split_projections()[1](a).view(*a.shape[:2], 2, attn.n_heads, attn.d_head).unbind(2)
    m = last_running[:, None, :, None]
    k = torch.where(m, k.transpose(1, 2), step_kv[-1][0])
    v = torch.where(m, v.transpose(1, 2), step_kv[-1][1])
    for n in range(ran, n_steps):
        cache.layers[n].append(k, v)
