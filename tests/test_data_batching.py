"""Batch datasets and samplers: stream continuity, rank sharding, coverage, determinism, resume."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from xvariants.data.batching import EpochSampler, OrderedSampler, OrderedStreams, RandomWindows


def _stream_positions(ds: OrderedStreams, stream: int) -> np.ndarray:
    """Global token positions of local stream ``stream`` of ``ds``."""
    global_stream = ds.rank * ds.batch_size + stream
    return global_stream * ds.stream_len + np.arange(ds.stream_len)


def test_ordered_streams_continue_across_batches():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position
    ds = OrderedStreams(tokens, batch_size=4, seq_len=7)
    assert ds.stream_len == 250
    assert len(ds) == -(-249 // 7)
    previous = None
    for i in range(len(ds)):
        batch = ds[i]
        assert batch["index"] == i
        x, y = batch["input"], batch["target"]
        assert x.dtype == torch.int64 and x.shape == y.shape
        assert torch.equal(y[:, :-1], x[:, 1:])  # target is input shifted by one
        for b in range(4):
            expected = tokens[b * 250 + i * 7 : b * 250 + i * 7 + x.shape[1] + 1]
            assert x[b].tolist() == expected[:-1].tolist()
            assert y[b].tolist() == expected[1:].tolist()
            if previous is not None:  # row b of batch i continues row b of batch i-1
                assert x[b, 0].item() == previous[b, -1].item()
        previous = y
    assert ds[len(ds) - 1]["input"].shape[1] == 249 - 7 * (len(ds) - 1)  # short last batch kept


def test_every_position_is_covered_exactly_once():
    tokens = np.arange(503, dtype=np.int64)
    ds = OrderedStreams(tokens, batch_size=3, seq_len=10)
    for b in range(3):
        inputs = np.concatenate([ds[i]["input"][b].numpy() for i in range(len(ds))])
        targets = np.concatenate([ds[i]["target"][b].numpy() for i in range(len(ds))])
        positions = _stream_positions(ds, b)
        assert inputs.tolist() == positions[:-1].tolist()
        assert targets.tolist() == positions[1:].tolist()


def test_ranks_get_disjoint_streams_covering_the_whole():
    tokens = np.arange(2003, dtype=np.int64)
    batch_size, world = 3, 2
    single = OrderedStreams(tokens, batch_size * world, 16)
    ranks = [OrderedStreams(tokens, batch_size, 16, rank=r, world_size=world) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    seen = [set(np.asarray(r.streams).ravel().tolist()) for r in ranks]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(np.asarray(single.streams).ravel().tolist())
    for i in range(len(single)):
        stacked = torch.cat([r[i]["input"] for r in ranks])
        assert torch.equal(stacked, single[i]["input"])


def test_too_short_split_is_a_clear_error():
    with pytest.raises(ValueError) as info:
        OrderedStreams(np.arange(10), batch_size=8, seq_len=32, split="valid")
    message = str(info.value)
    assert "valid" in message and "10 tokens" in message and "batch_size=8" in message and "seq_len=32" in message
    with pytest.raises(ValueError, match="seq_len=64"):
        RandomWindows(np.arange(10), 2, 64, batches_per_epoch=3, seed=0)
    with pytest.raises(ValueError, match="rank"):
        OrderedStreams(np.arange(100), 2, 4, rank=2, world_size=2)


def test_random_windows_are_deterministic_per_address():
    tokens = np.arange(10_000, dtype=np.uint32)
    ds = RandomWindows(tokens, batch_size=4, seq_len=16, batches_per_epoch=5, seed=7)
    again = RandomWindows(tokens, batch_size=4, seq_len=16, batches_per_epoch=5, seed=7)
    first = ds[(0, 3)]
    assert torch.equal(first["input"], again[(0, 3)]["input"])
    assert first["index"] == 3
    assert not torch.equal(first["input"], ds[(1, 3)]["input"])  # another epoch
    assert not torch.equal(first["input"], ds[(0, 4)]["input"])  # another batch
    other_rank = RandomWindows(tokens, 4, 16, 5, seed=7, rank=1, world_size=2)
    assert not torch.equal(first["input"], other_rank[(0, 3)]["input"])
    other_seed = RandomWindows(tokens, 4, 16, 5, seed=8)
    assert not torch.equal(first["input"], other_seed[(0, 3)]["input"])
    assert torch.equal(ds[3]["input"], first["input"])  # a plain index (Lightning's overfit sampler) = epoch 0
    # Windows are contiguous slices of the stream, targets shifted by one.
    x, y = first["input"], first["target"]
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))
    assert torch.equal(y, x + 1)


def test_ordered_sampler_start_applies_to_one_epoch_only():
    sampler = OrderedSampler(6, start=4)
    assert len(sampler) == 6
    assert list(sampler) == [4, 5]
    assert list(sampler) == [0, 1, 2, 3, 4, 5]
    sampler.set_start(2)
    assert list(sampler) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="start"):
        sampler.set_start(7)


def test_epoch_sampler_addresses_follow_set_epoch():
    sampler = EpochSampler(3, start=1)
    sampler.set_epoch(5)
    assert list(sampler) == [(5, 1), (5, 2)]
    sampler.set_epoch(6)
    assert list(sampler) == [(6, 0), (6, 1), (6, 2)]


def test_dataloader_yields_batches_as_they_are():
    tokens = np.arange(400, dtype=np.uint16)
    ds = OrderedStreams(tokens, batch_size=2, seq_len=8)
    loader = DataLoader(ds, batch_size=None, sampler=OrderedSampler(len(ds), start=1))
    batches = list(loader)
    assert [b["index"] for b in batches] == list(range(1, len(ds)))
    assert batches[0]["input"].shape == (2, 8)
    windows = RandomWindows(tokens, 2, 8, batches_per_epoch=3, seed=0)
    sampler = EpochSampler(3)
    sampler.set_epoch(2)
    loaded = list(DataLoader(windows, batch_size=None, sampler=sampler))
    assert torch.equal(loaded[1]["input"], windows[(2, 1)]["input"])


def test_memmap_datasets_pickle_as_file_references(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100_000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(100_000,))
    ds = OrderedStreams(tokens, 4, 32)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the ids themselves were not pickled
    restored = pickle.loads(blob)
    assert torch.equal(restored[3]["input"], ds[3]["input"])
    # A slice is not the whole file: it is pickled by value, still correctly.
    part = RandomWindows(tokens[:5000], 2, 8, batches_per_epoch=2, seed=1)
    assert torch.equal(pickle.loads(pickle.dumps(part))[(0, 1)]["input"], part[(0, 1)]["input"])
