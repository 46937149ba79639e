"""Synthetic algorithmic tasks (xvariants/data/synthetic.py): answers are right, only the
answer is scored, padding is marked, lengths and seeds behave, the data module and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.data.synthetic import (
    IGNORE_INDEX,
    TASKS,
    SyntheticDataModule,
    SyntheticTask,
    accuracy_counts,
    char_accuracy,
    longest_sequence,
    sequence_accuracy,
)
from xvariants.data.tokenizers import tokenizer_from_dict


def _split(task: SyntheticTask, batch, i):
    """(prompt text, scored answer text) of row i, checking the layout on the way."""
    inp, tgt, pad = batch["input"][i], batch["target"][i], batch["padding_mask"][i]
    assert torch.equal(pad, inp == task.pad_id)  # padding is marked exactly where pad tokens are
    assert torch.all(tgt[pad] == IGNORE_INDEX)
    scored = (tgt != IGNORE_INDEX).nonzero().squeeze(1)
    start = int(scored[0])
    assert torch.equal(scored, torch.arange(start, start + len(scored)))  # one contiguous span
    assert inp[start] == task.sep_id  # scoring starts where the separator predicts the first answer symbol
    assert torch.equal(inp[start + 1 : start + len(scored)], tgt[start : start + len(scored) - 1])  # teacher forcing
    assert tgt[scored[-1]] == task.eos_id
    dec = task.tokenizer.decode
    return dec(inp[:start]), dec(tgt[scored[:-1]])


@pytest.mark.parametrize("name", TASKS)
def test_answers_are_correct_and_only_answers_are_scored(name):
    task = SyntheticTask(name)
    batch = task.batch(np.random.default_rng(0), 64, 1, 40)
    for i in range(64):
        prompt, answer = _split(task, batch, i)
        assert 1 <= len(prompt) <= 40
        if name == "copy":
            assert answer == prompt
        elif name == "reverse":
            assert answer == prompt[::-1]
        else:
            a, b = prompt.split("+")
            assert int(answer[::-1]) == int(a[::-1]) + int(b[::-1])  # little-endian digits
            assert (len(a) == 1 or a[-1] != "0") and (len(b) == 1 or b[-1] != "0")
            assert answer[-1] != "0" or answer == "0"


@pytest.mark.parametrize("name", TASKS)
def test_lengths_and_longest_sequence(name):
    task = SyntheticTask(name)
    batch = task.batch(np.random.default_rng(1), 200, 41, 400)
    lengths = [len(_split(task, batch, i)[0]) for i in range(200)]
    assert min(lengths) >= 41 and max(lengths) <= 400 and max(lengths) > 300
    assert batch["input"].size(1) <= longest_sequence(name, 400)
    short = task.batch(np.random.default_rng(2), 8, 5, 5)
    assert all(len(_split(task, short, i)[0]) == 5 for i in range(8))


def test_batches_are_seeded_by_address():
    dm = SyntheticDataModule("reverse", batch_size=4, seed=3)
    ds = dm.dataset("train")
    assert torch.equal(ds[(0, 5)]["input"], ds[(0, 5)]["input"])
    assert not torch.equal(ds[(0, 5)]["input"], ds[(1, 5)]["input"])  # fresh examples each epoch
    assert ds[(0, 5)]["index"] == 5
    other = SyntheticDataModule("reverse", batch_size=4, seed=4).dataset("train")
    assert not torch.equal(ds[(0, 5)]["input"], other[(0, 5)]["input"])
    assert not torch.equal(dm.dataset("valid")[0]["input"], dm.dataset("test")[0]["input"])


def test_datamodule_contract():
    dm = SyntheticDataModule("addition", batch_size=8, eval_batch_size=4, batches_per_epoch=5, val_batches=2, test_batches=3)
    dm.setup("fit")
    assert dm.unit == "char" and dm.vocab_size == 15 and dm.meta["task"] == "addition"
    assert tokenizer_from_dict(dm.tokenizer.to_dict()).to_dict() == dm.tokenizer.to_dict()
    train = list(dm.train_dataloader())
    assert len(train) == 5 and [b["index"] for b in train] == list(range(5))
    assert set(train[0]) == {"input", "target", "padding_mask", "index"}
    assert train[0]["padding_mask"].dtype == torch.bool and train[0]["input"].dtype == torch.long
    val, test = list(dm.val_dataloader()), list(dm.test_dataloader())
    assert len(val) == 2 and len(test) == 3 and val[0]["input"].size(0) == 4
    assert (val[0]["target"] != IGNORE_INDEX).sum(1).max() <= 40
    assert (~test[0]["padding_mask"]).sum(1).min() > 41  # test inputs are longer than training ones
    dm.resume_batch = 3
    assert [b["index"] for b in dm.train_dataloader()] == [3, 4]
    assert [b["index"] for b in dm.train_dataloader()] == list(range(5))
    dm.load_state_dict(dm.state_dict())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"task": "sort"}, "data.task"),
        ({"task": "copy", "train_min_len": 50}, "data.train_min_len"),
        ({"task": "copy", "batch_size": 0}, "data.batch_size"),
        ({"task": "copy", "seq_len": 40}, "data.seq_len"),
        ({"task": "addition", "eval_seq_len": 400}, "data.eval_seq_len"),
        ({"task": "addition", "train_max_len": 2}, "data.train_max_len"),
        ({"task": "copy", "tokenizer_state": {"name": "byte"}}, "data.tokenizer_state"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError) as err:
        SyntheticDataModule(**kwargs)
    assert err.value.field == field


def test_accuracies():
    targets = torch.tensor([[IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, IGNORE_INDEX, 5, 1], [IGNORE_INDEX] * 4])
    logits = torch.nn.functional.one_hot(targets.clamp(min=0), 8).float()
    assert char_accuracy(logits, targets) == 1.0 and sequence_accuracy(logits, targets) == 1.0
    logits[0, 2] = torch.nn.functional.one_hot(torch.tensor(6), 8).float()  # one wrong symbol in row 0
    logits[1, 0] = torch.nn.functional.one_hot(torch.tensor(6), 8).float()  # unscored: no effect
    assert char_accuracy(logits, targets) == pytest.approx(4 / 5)
    assert sequence_accuracy(logits, targets) == 0.5  # the empty row 2 does not count
    assert accuracy_counts(logits, targets) == {"chars_correct": 4, "chars": 5, "seqs_correct": 1, "seqs": 2}


def test_language_model_trains_on_a_batch():
    from xvariants.models import build_language_model

    dm = SyntheticDataModule("copy", batch_size=8, train_max_len=6)
    lm = build_language_model(
        {"body": "universal", "d_model": 32, "n_heads": 2, "act": True, "max_steps": 3, "dropout": 0.0}, dm.vocab_size
    )
    batch = dm.dataset("train")[(0, 0)]
    out = lm(batch["input"], batch["target"], padding_mask=batch["padding_mask"])
    assert out.n_tokens == int((batch["target"] != IGNORE_INDEX).sum())
    assert torch.all(out.aux.maps["n_updates"][batch["padding_mask"]] == 0)
    (out.loss + out.aux.total_loss()).backward()
