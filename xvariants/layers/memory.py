"""Segment-level recurrent memory of Transformer-XL (``_update_mems`` of the original code).

A memory is a plain ``list`` of ``n_layers + 1`` tensors ``[B, M, D]`` (batch-first):
entry ``i`` holds the inputs of layer ``i`` for the ``M`` most recent positions, entry 0
the embedding output; the last entry (output of the top layer) is stored as the original
does but never read. All entries share ``M`` (0 for an empty memory). Tensors never carry
an autograd graph (gradient stopped, as the paper's ``SG``), so a memory can be carried
across any number of training steps, saved in a checkpoint (``torch.load(weights_only=True)``
reads it) and passed back in.
"""

from __future__ import annotations

import contextlib

import torch

from xvariants.config_errors import require


def check_mem_len(mem_len: int, field: str = "model.mem_len") -> int:
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


class SegmentLengths:
    """Memory length, clamp length and ``same_length`` of a body with segment memory, validated
    on every assignment and changeable after construction (evaluation usually keeps a longer
    memory than training: the paper's enwik8 trains with 512 and evaluates with 2100 / 820).
    The weights do not depend on them. Mixed into the xl and universal_xl bodies.
    """

    _mem_len: int = 0
    _clamp_len: int = -1
    _same_length: bool = False

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
            "model.clamp_len",
            f"must be -1 (off) or an integer >= 1, got {value!r}",
        )
        self._clamp_len = value

    @property
    def same_length(self) -> bool:
        return self._same_length

    @same_length.setter
    def same_length(self, value: bool) -> None:
        self._same_length = bool(value)

    def set_eval_lengths(
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
            if self.same_length:
                require(
                    self.mem_len >= 1,
                    "model.same_length",
                    "needs mem_len >= 1 (every query sees exactly mem_len keys; with 0 it would see none)",
                )
        except Exception:
            self._mem_len, self._clamp_len, self._same_length = old
            raise

    @contextlib.contextmanager
    def lengths(self, mem_len: int | None = None, clamp_len: int | None = None, same_length: bool | None = None):
        """``with body.lengths(mem_len=2100, clamp_len=820): ...`` restores the old lengths on exit."""
        old = (self._mem_len, self._clamp_len, self._same_length)
        try:
            self.set_eval_lengths(mem_len, clamp_len, same_length)
            yield self
        finally:
            self._mem_len, self._clamp_len, self._same_length = old
