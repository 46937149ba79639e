"""Keys and values of a Transformer-XL memory kept between calls (evaluation, generation), so
each segment projects only its own positions instead of the whole memory again as the
original code does. :class:`MemoryKV` is one layer's buffer (used by
:class:`~xvariants.layers.relative_attention.RelativeMultiHeadAttention`);
:class:`MemoryKVCache` holds one per layer together with what they were computed from, which
:class:`~xvariants.layers.memory.SegmentMemory` checks before they are used.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class MemoryKV:
    """Keys and values ``[B, H, S, Dh]`` of one layer's memory, kept between calls (no
    gradients) so a segment projects only its own positions, not the whole memory again.

    The buffer has spare room after the used positions: appending a segment writes only the
    new positions, and the most recent ones are moved to the front only when the room runs
    out (every few segments), instead of concatenating the whole memory every call.
    """

    def __init__(self, spare_segments: int = 8):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.start = self.end = 0
        self.spare_segments = spare_segments

    def __len__(self) -> int:
        return self.end - self.start

    def _alloc(self, like: torch.Tensor, capacity: int) -> None:
        B, H, _, Dh = like.shape
        self.k = like.new_empty(B, H, capacity, Dh)
        self.v = like.new_empty(B, H, capacity, Dh)

    def reset(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Forget everything; keep ``k``, ``v`` (all their positions)."""
        S = k.size(2)
        capacity = S + self.spare_segments * max(1, S // 8)
        if self.k is None or self.k.shape[:2] != k.shape[:2] or self.k.size(2) < capacity or self.k.dtype != k.dtype \
                or self.k.device != k.device or self.k.size(3) != k.size(3):
            self._alloc(k, capacity)
        self.k[:, :, :S].copy_(k)
        self.v[:, :, :S].copy_(v)
        self.start, self.end = 0, S

    def append(self, m: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the last ``m`` kept positions followed by ``k_new``/``v_new``
        (views into the buffer)."""
        if self.k is None or m > len(self) or self.k.shape[:2] != k_new.shape[:2]:
            raise ValueError(f"memory keys/values hold {len(self)} positions, {m} requested")
        T = k_new.size(2)
        capacity = self.k.size(2)
        if self.end + T > capacity:
            need = m + T + self.spare_segments * T
            old_k, old_v = self.k[:, :, self.end - m : self.end], self.v[:, :, self.end - m : self.end]
            if need > capacity or self.end - m < m:  # grow, or the move would overlap itself
                self._alloc(k_new, max(need, capacity))
            self.k[:, :, :m].copy_(old_k)
            self.v[:, :, :m].copy_(old_v)
            self.end = m
        self.start = self.end - m
        self.k[:, :, self.end : self.end + T].copy_(k_new)
        self.v[:, :, self.end : self.end + T].copy_(v_new)
        self.end += T
        return self.k[:, :, self.start : self.end], self.v[:, :, self.start : self.end]

    def keep_last(self, n: int) -> None:
        """Only the last ``n`` positions stay valid (the new memory)."""
        self.start = self.end - min(n, len(self))


class MemoryKVCache:
    """One :class:`MemoryKV` per layer and what their keys/values were computed from: the
    memory tensors (weak references and in-place version counters) and the weights of the
    owning module (storage and version counter of every parameter). They stand for a memory
    passed back in only while all of these still match, so a stale cache is never read."""

    def __init__(self, n_layers: int):
        self.layers = [MemoryKV() for _ in range(n_layers)]
        self.refs: list[weakref.ref] = []
        self.versions: list[int] = []
        self.params: tuple | None = None

    def holds(self, entries: list[torch.Tensor], m_len: int, batch_size: int, owner: nn.Module) -> bool:
        """Whether the stores hold the keys/values of memory ``entries`` (``m_len`` positions
        used) under the current weights of ``owner``."""
        return (
            len(self.refs) == len(entries)
            and all(ref() is s and s._version == ver for ref, ver, s in zip(self.refs, self.versions, entries))
            and self.params == _parameter_key(owner)
            and all(kv.k is not None and kv.k.size(0) == batch_size and len(kv) >= m_len for kv in self.layers)
        )

    def remember(self, entries: list[torch.Tensor], owner: nn.Module) -> None:
        """After a call: the stores now stand for the new memory ``entries``."""
        for kv, s in zip(self.layers, entries):
            kv.keep_last(s.size(1))
        self.refs = [weakref.ref(s) for s in entries]
        self.versions = [s._version for s in entries]
        self.params = _parameter_key(owner)


def _parameter_key(module: nn.Module) -> tuple:
    # optimizer steps and load_state_dict bump a parameter's version (or replace its storage)
    return tuple((p.data_ptr(), p._version) for p in module.parameters())
