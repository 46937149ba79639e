"""The body side of segment memory, shared by the xl and universal_xl bodies: a body holds one
:class:`~xvariants.layers.memory.SegmentMemory` as ``self.memory`` and exposes its lengths and
caches, naming errors by their config field (``model.mem_len``): the memory names its own
arguments, the body is where the config starts.
"""

from __future__ import annotations

import contextlib

import torch

from xvariants.config_errors import config_scope
from xvariants.layers.memory import Segment, SegmentMemory
from xvariants.models.contract import Body


def _length(name: str, doc: str) -> property:
    def get(self):
        return getattr(self.memory, name)

    def set(self, value):
        with config_scope("model."):
            setattr(self.memory, name, value)

    return property(get, set, doc=doc)


class SegmentMemoryBody(Body):
    """A body whose context is a :class:`~xvariants.layers.memory.SegmentMemory`
    (``self.memory``): its lengths, changeable after construction, with errors named by
    their config field (``model.mem_len``), and its evaluation caches."""

    stateful = True
    memory: SegmentMemory

    mem_len = _length("mem_len", "positions kept in memory (0 = none)")
    clamp_len = _length("clamp_len", "relative distances above it use R[clamp_len]; -1 = off")
    same_length = _length("same_length", "every query attends to mem_len keys")

    def set_eval_lengths(
        self, mem_len: int | None = None, clamp_len: int | None = None, same_length: bool | None = None
    ) -> None:
        """Change memory length, clamp length and/or ``same_length`` (None = keep); on a bad
        value nothing changes."""
        with config_scope("model."):
            self.memory.set_lengths(mem_len, clamp_len, same_length)

    @contextlib.contextmanager
    def lengths(self, mem_len: int | None = None, clamp_len: int | None = None, same_length: bool | None = None):
        """``with body.lengths(mem_len=2100, clamp_len=820): ...`` restores the old lengths on exit."""
        with contextlib.ExitStack() as restore:
            with config_scope("model."):
                restore.enter_context(self.memory.lengths(mem_len, clamp_len, same_length))
            yield self

    def clamp_unused(self, seg_len: int) -> bool:
        """See :meth:`SegmentMemory.clamp_unused <xvariants.layers.memory.SegmentMemory.clamp_unused>`."""
        return self.memory.clamp_unused(seg_len)

    @property
    def memory_kv_cache(self) -> bool:
        """Without gradients keep the memory's keys/values (and ``W_R R``) between calls;
        False = the original's cost (see :class:`~xvariants.layers.memory.SegmentMemory`)."""
        return self.memory.reuse

    @memory_kv_cache.setter
    def memory_kv_cache(self, value: bool) -> None:
        self.memory.reuse = bool(value)

    @property
    def _kv_cache(self):
        """The memory's key/value cache, None while none is kept (tests look at it)."""
        return self.memory.kv_cache

    def clear_memory_kv(self) -> None:
        """Drop the cached memory keys/values (they are rebuilt from the memory on the next
        call). Only needed after editing weights through ``.data``, which PyTorch's version
        counters cannot see; optimizer steps and ``load_state_dict`` are detected."""
        self.memory.clear_kv()

    def begin_segment(self, state, h: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs) -> Segment:
        """:meth:`SegmentMemory.begin <xvariants.layers.memory.SegmentMemory.begin>` for this
        body's forward, its errors named by config field."""
        with config_scope("model."):
            return self.memory.begin(state, h, padding_mask, **kwargs)

    def init_state(self, batch_size: int, device: torch.device) -> list[torch.Tensor]:
        """Empty memories: one ``[batch_size, 0, d_model]`` tensor per memory entry."""
        return self.memory.init_state(batch_size, device, next(self.parameters()).dtype)
