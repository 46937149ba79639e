"""Datasets whose items are whole batches, and the samplers that address them.

A ``DataLoader(dataset, batch_size=None, sampler=sampler)`` yields each item as
it is: ``{"input": LongTensor[B, T], "target": LongTensor[B, T], "index": int}``,
where ``target`` is ``input`` shifted one token along the stream. Building
whole batches in the dataset (rather than collating single sequences) is what
lets ordered streams continue from batch to batch, and lets a batch be found
again from its address alone when a run resumes.

Ranks are explicit arguments: under DDP every rank builds its own dataset and
reads only its own share, so no ``DistributedSampler`` must be wrapped around
these samplers.
"""

from __future__ import annotations

from xvariants.config_errors import DataError

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

Batch = dict[str, Any]


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must lie in [0, world_size={world_size}), got {rank}")


class _PicklableTokens:
    """Mixin: pickle a whole-file token memmap as its file name, not its contents.

    DataLoader workers started by spawn/forkserver receive the dataset pickled;
    reopening the cache file there keeps a 100M-token split from being copied
    into every worker.
    """

    tokens: np.ndarray

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        tokens = state.pop("tokens")
        filename = getattr(tokens, "filename", None)
        if (
            isinstance(tokens, np.memmap)
            and filename
            and tokens.offset == 0
            and tokens.ndim == 1
            and os.path.getsize(filename) == tokens.nbytes
        ):
            state["_tokens_file"] = (filename, tokens.dtype.str, tokens.shape[0])
        else:
            state["tokens"] = np.asarray(tokens)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        file = state.pop("_tokens_file", None)
        if file is not None:
            filename, dtype, length = file
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(length,))
        self.__dict__.update(state)


class OrderedStreams(_PicklableTokens, Dataset):
    """Contiguous streams read in order, like Transformer-XL's ``LMOrderedIterator``.

    The tokens are cut into ``world_size * batch_size`` equal contiguous streams
    (the remainder, fewer than that many tokens, is dropped). Rank ``r`` owns
    streams ``r*B .. (r+1)*B - 1``. Batch ``i`` holds positions
    ``[i*T, i*T + T)`` of each of its streams as input and the next position of
    each as target, so row ``b`` of batch ``i+1`` continues row ``b`` of batch
    ``i`` exactly, and a recurrent model may carry its memory across batches.
    The last batch is kept even when shorter than ``T``, so every position of a
    stream but its first is a target exactly once.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        split: str = "tokens",
    ):
        _check_positive(batch_size, "batch_size")
        _check_positive(seq_len, "seq_len")
        _check_rank(rank, world_size)
        streams = world_size * batch_size
        stream_len = len(tokens) // streams
        if stream_len < 2:
            raise DataError(
                f"the {split} split has {len(tokens)} tokens, too few for one batch: batch_size={batch_size} "
                f"x world_size={world_size} streams need at least {2 * streams} tokens "
                f"(seq_len={seq_len}); use a smaller batch size or a larger split"
            )
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.stream_len = stream_len

    @property
    def streams(self) -> np.ndarray:
        """This rank's ``[batch_size, stream_len]`` view of the tokens (no copy)."""
        n = self.world_size * self.batch_size * self.stream_len
        all_streams = self.tokens[:n].reshape(self.world_size * self.batch_size, self.stream_len)
        return all_streams[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return -(-(self.stream_len - 1) // self.seq_len)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        start = index * self.seq_len
        end = min(start + self.seq_len, self.stream_len - 1)
        window = torch.from_numpy(np.asarray(self.streams[:, start : end + 1], dtype=np.int64))
        return {"input": window[:, :-1], "target": window[:, 1:], "index": index}


class RandomWindows(_PicklableTokens, Dataset):
    """Windows of ``seq_len + 1`` tokens at random offsets, for models that keep no state.

    Item ``(epoch, i)`` draws its ``batch_size`` offsets from a generator
    seeded with ``(seed, epoch, i, rank)``, so the same address always gives
    the same batch (a resumed run sees what the interrupted one would have),
    epochs and ranks differ, and nothing depends on the order items are read.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        batches_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        split: str = "tokens",
    ):
        _check_positive(batch_size, "batch_size")
        _check_positive(seq_len, "seq_len")
        _check_positive(batches_per_epoch, "batches_per_epoch")
        _check_rank(rank, world_size)
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"the {split} split has {len(tokens)} tokens, too few for one window of seq_len={seq_len} "
                f"(+1 for the target; batch_size={batch_size})"
            )
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def offsets(self, epoch: int, index: int) -> np.ndarray:
        """Start positions of the windows of batch ``(epoch, index)``."""
        seed = np.random.SeedSequence([self.seed, epoch, index, self.rank])
        rng = np.random.Generator(np.random.PCG64(seed))
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def __getitem__(self, address: tuple[int, int] | int) -> Batch:
        # a plain index means epoch 0: Lightning swaps in a SequentialSampler for overfit_batches
        epoch, index = (0, address) if isinstance(address, int) else address
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches per epoch")
        positions = self.offsets(epoch, index)[:, None] + np.arange(self.seq_len + 1)
        window = torch.from_numpy(np.asarray(self.tokens[positions], dtype=np.int64))
        return {"input": window[:, :-1], "target": window[:, 1:], "index": index}


class _ResumableSampler(Sampler):
    """Yields batch addresses ``0 .. num_batches - 1``, the first time from ``start`` on.

    ``start`` (set at construction or with ``set_start``) skips the batches an
    interrupted run already trained on; it applies to the next iteration only,
    then resets to 0. ``len()`` is always the full epoch: with Lightning's
    restored progress counter that is where a resumed epoch ends.
    ``set_epoch`` is what Lightning calls on ``dataloader.sampler`` each epoch.
    """

    def __init__(self, num_batches: int, start: int = 0):
        _check_positive(num_batches, "num_batches")
        self.num_batches = num_batches
        self.epoch = 0
        self.set_start(start)

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_batches:
            raise DataError(f"start must lie in [0, {self.num_batches}], got {start}")
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _indices(self) -> range:
        start, self.start = self.start, 0
        return range(start, self.num_batches)


class OrderedSampler(_ResumableSampler):
    """Batch indices in order, for ``OrderedStreams``."""

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())


class EpochSampler(_ResumableSampler):
    """``(epoch, index)`` addresses for ``RandomWindows``; the epoch comes from ``set_epoch``."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in self._indices())
