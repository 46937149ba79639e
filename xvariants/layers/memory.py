"""Segment-level recurrent memory of Transformer-XL: the memory itself, its update
(``_update_mems`` of the original code) and :class:`SegmentMemory`, the one object through
which a body with segment memory (xl, universal_xl) sets up and updates every segment.

A memory is a plain ``list`` of ``n_tensors`` tensors ``[B, M, D]`` (batch-first): entry ``i``
holds the inputs of layer (or depth step) ``i`` for the ``M`` most recent positions; in the xl
body entry 0 is the embedding output and the last entry (output of the top layer) is stored as
the original does but never read. All entries share ``M`` (0 for an empty memory). Tensors
never carry an autograd graph (gradient stopped, as the paper's ``SG``), so a memory can be
carried across any number of training steps, saved in a checkpoint
(``torch.load(weights_only=True)`` reads it) and passed back in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.layers.hooks import HookPoint
from xvariants.layers.memory_kv import MemoryKV, MemoryKVCache
from xvariants.layers.relative_attention import relative_positions, xl_attention_mask


def check_mem_len(mem_len: int, field: str = "mem_len") -> int:
    """``mem_len`` must be an int >= 0 (0 = no memory)."""
    require(
        isinstance(mem_len, int) and not isinstance(mem_len, bool) and mem_len >= 0,
        field,
        f"must be an integer >= 0 (0 = no memory), got {mem_len!r}",
    )
    return mem_len


def init_memory(
    n_tensors: int, batch_size: int, d_model: int, *, device=None, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """``n_tensors`` empty memories ``[batch_size, 0, d_model]``."""
    return [torch.empty(batch_size, 0, d_model, device=device, dtype=dtype) for _ in range(n_tensors)]


def memory_length(mems: list[torch.Tensor] | None) -> int:
    """Number of cached positions (0 for None or an empty memory)."""
    return 0 if not mems else mems[0].size(1)


def validate_memory(
    mems,
    *,
    n_tensors: int,
    batch_size: int,
    d_model: int,
) -> list[torch.Tensor] | None:
    """Check a memory passed back in; returns it as a list (None stays None).

    Raises ``ValueError`` with one clear message when it cannot belong to these streams and
    this model: not a list/tuple of tensors, wrong number of tensors (another depth),
    wrong width (another model), another batch size, or entries of different lengths.
    """
    if mems is None:
        return None
    if isinstance(mems, torch.Tensor) or not isinstance(mems, (list, tuple)):
        raise ValueError(
            f"Transformer-XL memory must be a list of {n_tensors} tensors [B, M, D] (the `state` this body "
            f"returned), got {type(mems).__name__}"
        )
    if len(mems) != n_tensors:
        raise ValueError(
            f"memory has {len(mems)} tensors but this model keeps {n_tensors} (n_layers + 1): "
            "it comes from a model of another depth"
        )
    lengths = set()
    for i, m in enumerate(mems):
        if not isinstance(m, torch.Tensor) or m.dim() != 3:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"memory entry {i} must be a tensor [B, M, D], got {shape}")
        if m.size(2) != d_model:
            raise ValueError(
                f"memory entry {i} has width {m.size(2)} but this model has d_model={d_model}: "
                "it comes from another model"
            )
        if m.size(0) != batch_size:
            raise ValueError(
                f"memory holds {m.size(0)} streams but the batch has {batch_size}: memory belongs to the "
                "streams it was computed on; start new streams with state=None (or init_state)"
            )
        lengths.add(m.size(1))
    if len(lengths) > 1:
        raise ValueError(f"memory entries have different lengths {sorted(lengths)}; it was not produced by this body")
    return list(mems)


def truncate_memory(mems: list[torch.Tensor] | None, mem_len: int) -> list[torch.Tensor] | None:
    """Keep the most recent ``mem_len`` positions of every entry (views, no copy)."""
    if mems is None or memory_length(mems) <= mem_len:
        return mems
    return [m[:, m.size(1) - mem_len :] for m in mems]


@torch.no_grad()
def update_memory(
    mems: list[torch.Tensor] | None,
    hids: list[torch.Tensor],
    mem_len: int,
) -> list[torch.Tensor]:
    """New memory: ``cat([mems[i], hids[i]])`` along time, the most recent ``mem_len`` kept,
    detached (no autograd graph). ``hids`` are the layer inputs of the current segment
    (``n_layers + 1`` tensors ``[B, T, D]``). ``ext_len`` of the original is 0 here (every
    released script uses 0), so ``end = m_len + T`` and ``beg = max(0, end - mem_len)``.
    """
    out = []
    for i, h in enumerate(hids):
        h = h.detach()
        if mem_len == 0:
            out.append(h[:, :0])
            continue
        if mems is not None and mems[i].size(1) > 0:
            keep = max(0, mem_len - h.size(1))  # positions of the old memory that survive
            old = mems[i][:, mems[i].size(1) - min(keep, mems[i].size(1)) :]
            cat = torch.cat([old.to(h.dtype), h], dim=1) if old.size(1) else h
        else:
            cat = h
        beg = max(0, cat.size(1) - mem_len)
        # a slice is copied so the memory does not keep the whole segment's buffer alive
        out.append(cat[:, beg:].clone() if beg > 0 else cat)
    return out


def check_eval_segment(tgt_len: int, stream_len: int, *, field: str = "eval.seq_len") -> None:
    """An evaluation segment must fit in each stream of the split (one clear message)."""
    require(
        tgt_len <= stream_len,
        field,
        f"segment length {tgt_len} is longer than each evaluation stream ({stream_len} tokens): "
        "lower the segment length or the evaluation batch size",
    )


@dataclass(eq=False)
class Segment:
    """One segment set up against the memory by :meth:`SegmentMemory.begin`.

    :param mems: the memory entries in use (at most ``mem_len`` positions, on the segment's
        device and dtype), or None.
    :param allowed: ``[1 or B, 1, T, M + T]``, True where a query may attend a key.
    :param r: relative positions ``[M + T, D]`` (before the body's dropout).
    :param kv: per-layer memory key/value stores (evaluation only), or None.
    :param reuse_kv: ``kv`` hold the keys/values of ``mems`` under the current weights.
    :param owner: the module whose weights the keys/values are computed with.
    """

    mems: list[torch.Tensor] | None
    allowed: torch.Tensor
    r: torch.Tensor
    kv: list[MemoryKV] | None = None
    reuse_kv: bool = False
    owner: nn.Module | None = field(default=None, repr=False)

    def attention_args(self, i: int) -> dict:
        """The memory keyword arguments of layer ``i``'s relative attention."""
        return dict(
            mem=None if self.mems is None else self.mems[i],
            allowed=self.allowed,
            kv_memory=None if self.kv is None else self.kv[i],
            reuse_kv=self.reuse_kv,
        )


SAME_LENGTH_NEEDS_MEMORY = "needs mem_len >= 1 (every query sees exactly mem_len keys; with 0 it would see none)"


class SegmentMemory:
    """The segment memory of one body: its lengths, the setup of each segment against the
    memory passed in (validation, truncation, attention mask with padding, relative positions)
    and the new memory after it, plus the evaluation-time caches.

    Lengths are validated on every assignment and changeable after construction (evaluation
    usually keeps a longer memory than training: the paper's enwik8 trains with 512 and
    evaluates with 2100 / 820); the weights do not depend on them.

    Without gradients (evaluation, generation) it keeps ``R`` between calls and, for the first
    ``kv_layers`` entries, the memory's keys/values (:class:`MemoryKVCache`), instead of
    projecting the whole memory again every segment as the original does. Exact: they are used
    only when the same memory object comes back, the weights are unchanged and no hook of the
    owning module listens. ``reuse = False`` gives the original's cost.

    :param n_tensors: memory entries (``n_layers + 1`` for xl, the depth steps for universal_xl).
    :param d_model: width of the entries and of the relative positions.
    :param mem_len: positions kept per entry (0 = no memory).
    :param clamp_len: relative distances above it use ``R[clamp_len]``; -1 = off.
    :param same_length: every query attends to the same number of keys (``mem_len``).
    :param kv_layers: leading entries whose keys/values may be cached between calls (0 = none).
    """

    def __init__(
        self,
        n_tensors: int,
        d_model: int,
        *,
        mem_len: int,
        clamp_len: int = -1,
        same_length: bool = False,
        kv_layers: int = 0,
    ):
        self.n_tensors, self.d_model, self.kv_layers = n_tensors, d_model, kv_layers
        self._mem_len, self._clamp_len, self._same_length = 0, -1, False
        self.set_lengths(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        self.reuse = True
        self._kv: MemoryKVCache | None = None
        self._r: tuple | None = None
        self._hook_points: list[HookPoint] | None = None

    def __getstate__(self) -> dict:
        # weak references, derived tensors and the owner's modules: never pickled or copied
        return dict(self.__dict__, _kv=None, _r=None, _hook_points=None)

    # ------------------------------------------------------------------ lengths
    @property
    def mem_len(self) -> int:
        return self._mem_len

    @mem_len.setter
    def mem_len(self, value: int) -> None:
        self._mem_len = check_mem_len(value)

    @property
    def clamp_len(self) -> int:
        return self._clamp_len

    @clamp_len.setter
    def clamp_len(self, value: int | None) -> None:
        value = -1 if value is None else value
        require(
            isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value >= 1),
            "clamp_len",
            f"must be -1 (off) or an integer >= 1, got {value!r}",
        )
        self._clamp_len = value

    @property
    def same_length(self) -> bool:
        return self._same_length

    @same_length.setter
    def same_length(self, value: bool) -> None:
        self._same_length = bool(value)

    def set_lengths(
        self, mem_len: int | None = None, clamp_len: int | None = None, same_length: bool | None = None
    ) -> None:
        """Change memory length, clamp length and/or ``same_length`` (None = keep); on a bad
        value nothing changes."""
        old = (self._mem_len, self._clamp_len, self._same_length)
        try:
            if mem_len is not None:
                self.mem_len = mem_len
            if clamp_len is not None:
                self.clamp_len = clamp_len
            if same_length is not None:
                self.same_length = same_length
            require(not self.same_length or self.mem_len >= 1, "same_length", SAME_LENGTH_NEEDS_MEMORY)
        except Exception:
            self._mem_len, self._clamp_len, self._same_length = old
            raise

    @contextlib.contextmanager
    def lengths(self, mem_len: int | None = None, clamp_len: int | None = None, same_length: bool | None = None):
        """``with memory.lengths(mem_len=2100, clamp_len=820): ...`` restores the old lengths on exit."""
        old = (self._mem_len, self._clamp_len, self._same_length)
        try:
            self.set_lengths(mem_len, clamp_len, same_length)
            yield self
        finally:
            self._mem_len, self._clamp_len, self._same_length = old

    # ------------------------------------------------------------------ segments
    def clamp_unused(self, seg_len: int) -> bool:
        """``clamp_len`` is on, but no distance in a ``seg_len`` segment after ``mem_len`` memory
        reaches it: in a training config a mistake (refused by :meth:`begin`); evaluation turns
        the clamp off for such a short last segment, which gives the same result."""
        return self.clamp_len > 0 and self.clamp_len >= self.mem_len + seg_len

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Empty memories: ``n_tensors`` tensors ``[batch_size, 0, d_model]``."""
        return init_memory(self.n_tensors, batch_size, self.d_model, device=device, dtype=dtype)

    def begin(
        self,
        state,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        kv_owner: nn.Module | None = None,
    ) -> Segment:
        """Set up segment ``x`` ``[B, T, D]`` against ``state`` (the memory returned for the
        previous segment of the same streams, or None).

        :param padding_mask: ``[B, T]`` True at padded positions of the segment (memory
            positions are taken as real); each position still attends to itself.
        :param kv_owner: the module whose parameters and hook points decide whether cached
            memory keys/values may be used; None = no key/value cache.
        """
        B, T, _ = x.shape
        require(not self.same_length or self.mem_len >= 1, "same_length", SAME_LENGTH_NEEDS_MEMORY)
        if self.clamp_unused(T):
            raise ConfigError(
                "clamp_len",
                f"clamp_len={self.clamp_len} never clamps: the longest distance with mem_len={self.mem_len} and "
                f"segment length {T} is {self.mem_len + T - 1}",
                f"-1 (off) or 1..{self.mem_len + T - 1}",
            )
        mems = validate_memory(state, n_tensors=self.n_tensors, batch_size=B, d_model=self.d_model)
        mems = truncate_memory(mems, self.mem_len)
        if mems is not None:
            mems = [m.to(device=x.device, dtype=x.dtype) for m in mems]
        M = memory_length(mems)
        allowed = xl_attention_mask(T, M, same_length=self.same_length, mem_len=self.mem_len, device=x.device)
        allowed = allowed[None, None]
        if padding_mask is not None:
            if padding_mask.shape != (B, T):
                raise ValueError(
                    f"padding_mask must be [B, T] = {(B, T)} (the segment), got {tuple(padding_mask.shape)}"
                )
            pad = torch.cat([padding_mask.new_zeros(B, M), padding_mask], dim=1).bool()
            self_key = torch.arange(M + T, device=x.device)[None, :] == (torch.arange(T, device=x.device)[:, None] + M)
            allowed = (allowed & ~pad[:, None, None, :]) | self_key
        kv, reuse_kv = self._kv_stores(state, mems, B, kv_owner)
        return Segment(mems, allowed, self._positions(M + T, x), kv, reuse_kv, kv_owner)

    def update(self, segment: Segment, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The new memory from the segment's per-entry inputs (``n_tensors`` tensors ``[B, T, D]``)."""
        new_state = update_memory(segment.mems, inputs, self.mem_len)
        if segment.kv is not None:
            self._kv.remember(new_state[: self.kv_layers], segment.owner)
        return new_state

    @property
    def kv_cache(self) -> MemoryKVCache | None:
        """The cached memory keys/values, None while none is kept."""
        return self._kv

    def clear_kv(self) -> None:
        """Drop the cached memory keys/values (rebuilt from the memory on the next call)."""
        self._kv = None

    def _caching(self) -> bool:
        return self.reuse and not torch.is_grad_enabled()

    def _hooked(self, owner: nn.Module) -> bool:
        """Whether a hook listens anywhere in ``owner`` (it may edit keys: recompute everything)."""
        if self._hook_points is None:
            self._hook_points = [m for m in owner.modules() if isinstance(m, HookPoint)]
        return any(h.has_hooks() for h in self._hook_points)

    def _kv_stores(self, state, mems, batch_size: int, owner: nn.Module | None) -> tuple[list[MemoryKV] | None, bool]:
        """(per-layer key/value stores, whether they hold the keys/values of ``mems``)."""
        if owner is None or self.kv_layers == 0 or self.mem_len == 0 or not self._caching() or self._hooked(owner):
            self._kv = None
            return None, False
        if self._kv is None:
            self._kv = MemoryKVCache(self.kv_layers)
            return self._kv.layers, False
        if mems is None or state is None:
            return self._kv.layers, False
        entries = list(state)[: self.kv_layers]
        return self._kv.layers, self._kv.holds(entries, memory_length(mems), batch_size, owner)

    def _positions(self, S: int, x: torch.Tensor) -> torch.Tensor:
        """R for ``S`` keys; without gradients the same tensor is returned for the same
        (S, clamp_len, dtype, device), so each layer can reuse its ``W_R R``."""
        if not self._caching():
            return relative_positions(S, self.d_model, self.clamp_len, device=x.device, dtype=x.dtype)
        key = (S, self.clamp_len, x.dtype, x.device)
        c = self._r
        if c is None or c[0] != key or c[1]._version != c[2]:  # (a hook may have edited it in place)
            r = relative_positions(S, self.d_model, self.clamp_len, device=x.device, dtype=x.dtype)
            c = self._r = (key, r, r._version)
        return c[1]
