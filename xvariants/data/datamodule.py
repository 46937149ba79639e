"""The Lightning data module: corpus -> tokenizer -> cached ids -> batch loaders."""

from __future__ import annotations

from xvariants.config_errors import DataError, config_scope, require

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from .batching import EpochSampler, OrderedSampler, OrderedStreams, RandomWindows
from .cache import build_tokenizer_cached, encode_cached, text_digest
from .corpora import check_corpus_name, load_corpus
from .tokenizers import Tokenizer, check_tokenizer_options, tokenizer_from_dict

SPLITS = ("train", "valid", "test")
#: key of ``meta`` holding the sha256 of each split's text (the token cache's ``text_sha256``)
CORPUS_FINGERPRINT = "text_sha256"
BATCHING = ("ordered", "random")


def _positive(value: Any, field: str) -> int:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, f"must be a positive integer, got {value!r}")
    return value


class LMDataModule(L.LightningDataModule):
    """Language-modelling data for every model variant.

    ``setup`` loads the corpus, trains (or restores) the tokenizer and caches
    the ids of the three splits; it works before any Trainer exists, so the
    model can be sized from ``vocab_size`` first. Loaders build their datasets
    on each call, for the rank of the moment: the trainer's when attached,
    else torch.distributed's, else rank 0 of 1.

    Training batches are ordered streams (recurrent memory carries over) or
    random windows (``batching="random"``, ``batches_per_epoch`` per epoch;
    by default as many as cover the train split once); validation and test batches are
    always ordered streams of ``eval_batch_size x eval_seq_len``. Each rank
    reads its own streams, so the Trainer MUST be built with
    ``use_distributed_sampler=False``: a DistributedSampler would split the
    batch addresses again and break stream continuity.

    Resuming mid-epoch: set ``resume_batch`` to the number of batches already
    trained in the current epoch before ``train_dataloader`` is called; its
    first epoch then starts there. The value is consumed (reset to 0) when the
    loader is built. ``state_dict`` stores the tokenizer in checkpoints.
    """

    def __init__(
        self,
        corpus: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
        batch_size: int,
        seq_len: int,
        eval_batch_size: int,
        eval_seq_len: int | None = None,
        batching: str = "ordered",
        batches_per_epoch: int | None = None,
        cache_dir: str = ".cache/xvariants",
        seed: int = 0,
        num_workers: int = 0,
        tokenizer_state: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        corpus, tokenizer = dict(corpus), dict(tokenizer)
        if "name" not in corpus:
            raise DataError("data.corpus.name is required")
        check_corpus_name(corpus["name"], "data.corpus.name")
        if "split" in corpus and corpus["split"] is not None:
            corpus["split"] = tuple(corpus["split"])
        if "name" not in tokenizer:
            raise DataError("data.tokenizer.name is required")
        tokenizer_name = tokenizer.pop("name")
        check_tokenizer_options(tokenizer_name, tokenizer, "data.tokenizer")
        if batching not in BATCHING:
            raise DataError(f"data.batching must be one of {', '.join(BATCHING)}; got {batching!r}")
        if batches_per_epoch is not None:
            _positive(batches_per_epoch, "data.batches_per_epoch")
        require(isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0,
                "data.num_workers", f"must be an integer >= 0, got {num_workers!r}")

        self.corpus_config = corpus
        self.tokenizer_name = tokenizer_name
        self.tokenizer_options = tokenizer
        self.batch_size = _positive(batch_size, "data.batch_size")
        self.seq_len = _positive(seq_len, "data.seq_len")
        self.eval_batch_size = _positive(eval_batch_size, "data.eval_batch_size")
        self.eval_seq_len = self.seq_len if eval_seq_len is None else _positive(eval_seq_len, "data.eval_seq_len")
        self.batching = batching
        self.batches_per_epoch = batches_per_epoch
        self.cache_dir = str(cache_dir)
        self.seed = int(seed)
        self.num_workers = num_workers
        self.tokenizer_state = dict(tokenizer_state) if tokenizer_state is not None else None
        self.resume_batch = 0

        self.tokenizer: Tokenizer | None = None
        self.meta: dict[str, Any] = {}
        self._tokens: dict[str, np.ndarray] = {}

    # ----- preparation -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download, train the tokenizer and fill the caches (Lightning runs it on one rank per node)."""
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Make ``tokenizer``, ``vocab_size``, ``unit``, ``meta`` and ``tokens()`` available.

        Idempotent: calls after the first return at once. Needs no trainer.
        ``meta[CORPUS_FINGERPRINT]`` holds the sha256 of each split's text: checkpoints carry
        it, and a resume on another corpus is refused by it (``xvariants.training.run``).
        """
        self._prepare()

    def _prepare(self) -> None:
        if self.tokenizer is not None:
            return
        with config_scope("data."):  # the corpus names its own options (corpus.n_subjects)
            corpus = load_corpus(**self.corpus_config)
        digests = {split: text_digest(corpus.split(split)) for split in SPLITS}
        tokenizer = self._restore_or_build_tokenizer(corpus.train, digests["train"])
        tokens = {}
        for split in SPLITS:
            tokens[split] = encode_cached(corpus.split(split), tokenizer, self.cache_dir, digest=digests[split])
        self.meta = {
            **corpus.meta,
            "corpus": corpus.name,
            CORPUS_FINGERPRINT: digests,
            "tokenizer": tokenizer.to_dict()["name"],
            "vocab_size": tokenizer.vocab_size,
            "unit": tokenizer.unit,
            "tokens": {split: int(len(tokens[split])) for split in SPLITS},
        }
        self._tokens = tokens
        self.tokenizer = tokenizer

    def _restore_or_build_tokenizer(self, train_text: str, digest: str) -> Tokenizer:
        if self.tokenizer_state is None:
            return build_tokenizer_cached(
                self.tokenizer_name, train_text, self.cache_dir, digest=digest, **self.tokenizer_options
            )
        restored = tokenizer_from_dict(self.tokenizer_state)
        if restored.to_dict()["name"] != self.tokenizer_name:
            raise DataError(
                f"data.tokenizer.name is {self.tokenizer_name!r} but the saved tokenizer_state "
                f"is a {restored.to_dict()['name']!r} tokenizer; make them agree"
            )
        return restored

    def _ready_tokenizer(self) -> Tokenizer:
        self._prepare()
        assert self.tokenizer is not None
        return self.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._ready_tokenizer().vocab_size

    @property
    def unit(self) -> str:
        """The unit bits are reported in: byte, char, word or bpe."""
        return self._ready_tokenizer().unit

    def tokens(self, split: str) -> np.ndarray:
        """The ids of ``split`` ("train", "valid" or "test"), a read-only memmap."""
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        self._prepare()
        return self._tokens[split]

    # ----- loaders -----------------------------------------------------------------------

    def rank_and_world_size(self) -> tuple[int, int]:
        """The trainer's rank when attached, else torch.distributed's, else (0, 1)."""
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, dataset: Any, sampler: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run (which restores that RNG) would see different dropout masks
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self.rank_and_world_size()
        tokens = self.tokens("train")
        start, self.resume_batch = self.resume_batch, 0
        if self.batching == "ordered":
            streams = OrderedStreams(tokens, self.batch_size, self.seq_len, rank, world_size, split="train")
            return self._loader(streams, OrderedSampler(len(streams), start=start))
        per_epoch = self.batches_per_epoch or max(1, len(tokens) // (self.batch_size * self.seq_len * world_size))
        windows = RandomWindows(
            tokens, self.batch_size, self.seq_len, per_epoch, self.seed, rank, world_size, split="train"
        )
        return self._loader(windows, EpochSampler(per_epoch, start=start))

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world_size = self.rank_and_world_size()
        streams = OrderedStreams(
            self.tokens(split), self.eval_batch_size, self.eval_seq_len, rank, world_size, split=split
        )
        return self._loader(streams, OrderedSampler(len(streams)))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ----- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the tokenizer, so a checkpoint can always be decoded."""
        return {"tokenizer": self._ready_tokenizer().to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt the checkpoint's tokenizer, refusing one that differs from a tokenizer already in use."""
        saved = state_dict.get("tokenizer")
        if saved is None:
            return
        if self.tokenizer is not None and self.tokenizer.to_dict() != saved:
            raise DataError(
                "the checkpoint's tokenizer differs from the one this data module built; "
                "pass the checkpoint's tokenizer as data.tokenizer_state (see LMDataModule.state_dict)"
            )
        self.tokenizer_state = dict(saved)
