"""LMDataModule: setup before any trainer, loaders of dict batches, resume offset, argument checks."""

from __future__ import annotations

import io

import lightning as L
import numpy as np
import pytest
import torch

from xvariants.data import cache
from xvariants.data import datamodule as dm_module
from xvariants.data.datamodule import LMDataModule
from xvariants.data.tokenizers import CharTokenizer

TEXT = "".join(f"line {i}: the cat sat on the mat, {i * 7 % 13} times.\n" for i in range(400))


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _module(corpus_file, tmp_path, **overrides) -> LMDataModule:
    args = dict(
        corpus={"name": "text", "path": str(corpus_file)},
        tokenizer={"name": "char"},
        batch_size=4,
        seq_len=16,
        eval_batch_size=2,
        cache_dir=str(tmp_path / "cache"),
        seed=3,
    )
    args.update(overrides)
    return LMDataModule(**args)


def test_setup_without_trainer_exposes_tokenizer_and_tokens(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path)
    dm.setup("fit")
    assert dm.trainer is None
    assert dm.vocab_size == len(set(TEXT[: int(len(TEXT) * 0.9)])) + 1
    assert dm.unit == "char"
    assert dm.meta["tokenizer"] == "char" and dm.meta["source"] == "text"
    assert dm.meta["tokens"]["train"] == len(dm.tokens("train")) == int(len(TEXT) * 0.9)
    assert dm.tokenizer.decode(dm.tokens("valid")) == TEXT[int(len(TEXT) * 0.9) : int(len(TEXT) * 0.95)]
    with pytest.raises(ValueError, match="split"):
        dm.tokens("dev")


def test_setup_is_idempotent_and_second_module_uses_the_cache(corpus_file, tmp_path, monkeypatch):
    dm = _module(corpus_file, tmp_path)
    dm.setup("fit")
    train = np.array(dm.tokens("train"))

    def refuse(**kwargs):
        raise AssertionError("setup ran twice")

    monkeypatch.setattr(dm_module, "load_corpus", refuse)
    dm.setup("validate")  # no second load
    monkeypatch.undo()

    def no_work(*args, **kwargs):
        raise AssertionError("the tokenizer and tokens should come from the cache")

    monkeypatch.setattr(cache, "build_tokenizer", no_work)
    monkeypatch.setattr(CharTokenizer, "encode", no_work)
    second = _module(corpus_file, tmp_path)
    second.setup("fit")
    assert np.array_equal(second.tokens("train"), train)


def test_loaders_yield_promised_batches(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path, eval_seq_len=32)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    first = train[0]
    assert set(first) == {"input", "target", "index"}
    assert first["input"].shape == (4, 16) and first["input"].dtype == torch.int64
    assert torch.equal(first["target"][:, :-1], first["input"][:, 1:])
    assert torch.equal(train[1]["input"][:, 0], first["target"][:, -1])  # streams continue
    assert [b["index"] for b in train] == list(range(len(train)))
    valid = next(iter(dm.val_dataloader()))
    assert valid["input"].shape == (2, 32)
    test = next(iter(dm.test_dataloader()))
    assert test["input"].shape == (2, 32)


def test_resume_batch_skips_into_the_first_epoch_only(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path)
    dm.resume_batch = 5
    loader = dm.train_dataloader()
    assert dm.resume_batch == 0  # consumed
    assert [b["index"] for b in loader][0] == 5
    assert [b["index"] for b in loader][0] == 0


def test_random_batching_is_deterministic_per_epoch(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path, batching="random", batches_per_epoch=6)
    loader = dm.train_dataloader()
    assert len(loader) == 6
    loader.sampler.set_epoch(2)
    epoch2 = [b["input"] for b in loader]
    dm.resume_batch = 4
    resumed = dm.train_dataloader()
    resumed.sampler.set_epoch(2)
    tail = [b["input"] for b in resumed]
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(tail, epoch2[4:]))
    loader.sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))["input"], epoch2[0])


def test_default_batches_per_epoch_covers_the_split_once(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path, batching="random")
    assert len(dm.train_dataloader()) == len(dm.tokens("train")) // (4 * 16)


def test_rank_comes_from_the_trainer_when_attached(corpus_file, tmp_path):
    class FakeTrainer:
        global_rank, world_size = 1, 2

    dm = _module(corpus_file, tmp_path)
    whole = _module(corpus_file, tmp_path, batch_size=8)
    dm.trainer = FakeTrainer()
    assert dm.rank_and_world_size() == (1, 2)
    mine = next(iter(dm.train_dataloader()))["input"]
    assert torch.equal(mine, next(iter(whole.train_dataloader()))["input"][4:])


def test_tokenizer_state_restores_and_checkpoints_carry_it(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path)
    state = dm.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    other_text = tmp_path / "other.txt"
    other_text.write_text("completely different letters: XYZ\n" * 300)
    restored = _module(other_text, tmp_path, tokenizer_state=saved["tokenizer"])
    assert restored.tokenizer is None
    assert restored.vocab_size == dm.vocab_size
    assert restored.tokenizer.to_dict() == dm.tokenizer.to_dict()

    fresh = _module(other_text, tmp_path)
    fresh.setup()
    with pytest.raises(ValueError, match="tokenizer_state"):
        fresh.load_state_dict(saved)
    with pytest.raises(ValueError, match="data.tokenizer.name is 'word'"):
        _module(corpus_file, tmp_path, tokenizer={"name": "word"}, tokenizer_state=saved["tokenizer"]).setup()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_len": 0}, "data.seq_len"),
        ({"batch_size": -2}, "data.batch_size"),
        ({"eval_batch_size": 0}, "data.eval_batch_size"),
        ({"eval_seq_len": 0}, "data.eval_seq_len"),
        ({"batching": "shuffled"}, "data.batching must be one of ordered, random"),
        ({"batches_per_epoch": 0}, "data.batches_per_epoch"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"corpus": {"name": "imagenet"}}, "data.corpus.name must be one of stdlib, text"),
        ({"corpus": {"path": "x"}}, "data.corpus.name is required"),
        ({"tokenizer": {"name": "unigram"}}, "data.tokenizer.name must be one of byte, char, word, bpe"),
        ({"tokenizer": {"name": "char", "vocab_size": 3}}, "data.tokenizer.vocab_size"),
    ],
)
def test_arguments_are_checked_up_front(corpus_file, tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _module(corpus_file, tmp_path, **overrides)


class _TinyLM(L.LightningModule):
    """Just enough model to drive Lightning's loops over the data module."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["index"], batch["input"].clone()))
        logits = self.embed(batch["input"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())

    def validation_step(self, batch, batch_idx):
        logits = self.embed(batch["input"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())
        self.log("val_loss", loss, batch_size=batch["input"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_runs_on_the_data_module(corpus_file, tmp_path):
    dm = _module(corpus_file, tmp_path, batching="random", batches_per_epoch=3)
    dm.setup("fit")  # before the model exists, to size it
    model = _TinyLM(dm.vocab_size)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert [(epoch, index) for epoch, index, _ in model.seen] == [(e, i) for e in (0, 1) for i in range(3)]
    # Lightning called set_epoch on our sampler: each batch is the one addressed by its epoch.
    windows = trainer.train_dataloader.dataset
    assert all(torch.equal(x, windows[(epoch, index)]["input"]) for epoch, index, x in model.seen)
    assert "val_loss" in trainer.callback_metrics
