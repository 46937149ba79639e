"""The Universal Transformer paper's algorithmic tasks, generated on the fly: copy, reverse and
integer addition (tensor2tensor's ``algorithmic_{identity,reverse,addition}_decimal40``).

Framed for a decoder-only language model: one sequence is ``input SEP answer EOS``; the model
reads ``sequence[:-1]`` and is scored (``target != -100``) only where it predicts the answer and
the final EOS. Lengths are *input* lengths: training uses ``1..40``, the test split longer
inputs (``41..400`` by default; t2t's dev set spans ``1..400``). Addition follows t2t: decimal
digits, least significant digit first (so the carry runs left to right), the most significant
digit of each operand non-zero; the input ``a + b`` has ``len(a) + 1 + len(b)`` symbols.

Batches are dicts ``{"input": [B, T], "target": [B, T], "padding_mask": [B, T] (True = pad),
"index": int}``, right-padded, every batch generated from ``(seed, split, epoch, index)`` alone,
so a resumed run sees exactly the batches it would have seen.

Accuracies are teacher-forced (argmax at every scored position, as t2t's ``accuracy`` and
``accuracy_per_sequence`` metrics): :func:`char_accuracy`, :func:`sequence_accuracy`.
"""

from __future__ import annotations

from xvariants.config_errors import DataError

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xvariants.config_errors import ConfigError, require
from xvariants.constants import IGNORE_INDEX
from xvariants.data.batching import EpochSampler, OrderedSampler
from xvariants.data.tokenizers import CharTokenizer

TASKS = ("copy", "reverse", "addition")
PAD, EOS, SEP, PLUS = "_", ".", "=", "+"
DIGITS = "0123456789"
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def make_tokenizer() -> CharTokenizer:
    """The tasks' vocabulary as a char tokenizer (``to_dict``/``decode``; restorable with
    ``tokenizer_from_dict``): digits, ``+``, ``=`` (separator), ``.`` (end), ``_`` (padding)."""
    return CharTokenizer(list(PAD + EOS + SEP + PLUS + DIGITS))


def longest_sequence(task: str, max_len: int) -> int:
    """Model input length (``len(sequence) - 1``) of the longest example with input length ``max_len``."""
    if task == "addition":
        # a + b with len(a) + len(b) = max_len - 1: the sum has at most max(len) + 1 <= max_len - 1 digits
        return max_len + 1 + max(1, max_len - 1)
    return 2 * max_len + 1


class SyntheticTask:
    """One algorithmic task: draws ``(input symbols, answer symbols)`` of a given input length.

    :param name: ``copy``, ``reverse`` or ``addition``.
    """

    def __init__(self, name: str):
        require(name in TASKS, "data.task", f"unknown task {name!r}", TASKS)
        self.name = name
        self.tokenizer = make_tokenizer()
        ids = {c: int(self.tokenizer.encode(c)[0]) for c in PAD + EOS + SEP + PLUS + DIGITS}
        self.pad_id, self.eos_id, self.sep_id, self.plus_id = ids[PAD], ids[EOS], ids[SEP], ids[PLUS]
        self.digit_ids = np.array([ids[d] for d in DIGITS], dtype=np.int64)
        self.min_length = 3 if name == "addition" else 1

    def example(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Input and answer digits (values 0..9, PLUS as -1) for an input of ``length`` symbols."""
        if self.name in ("copy", "reverse"):
            x = rng.integers(0, 10, size=length)
            return x, (x.copy() if self.name == "copy" else x[::-1].copy())
        l1 = int(rng.integers(1, length - 1))  # 1 .. length - 2
        l2 = length - 1 - l1
        a, b = self._number(rng, l1), self._number(rng, l2)
        total = _from_digits(a) + _from_digits(b)
        return np.concatenate([a, [-1], b]), _to_digits(total)

    @staticmethod
    def _number(rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` little-endian digits whose most significant one is non-zero (unless n == 1)."""
        d = rng.integers(0, 10, size=n)
        if n > 1:
            d[-1] = rng.integers(1, 10)
        return d

    def encode(self, digits: np.ndarray) -> np.ndarray:
        return np.where(digits < 0, self.plus_id, self.digit_ids[np.maximum(digits, 0)])

    def batch(self, rng: np.random.Generator, batch_size: int, min_len: int, max_len: int) -> dict[str, torch.Tensor]:
        """A right-padded batch with input lengths uniform in ``[min_len, max_len]``."""
        lo = max(min_len, self.min_length)
        seqs, n_prompt = [], []
        for length in rng.integers(lo, max_len + 1, size=batch_size):
            x, y = self.example(rng, int(length))
            seq = np.concatenate([self.encode(x), [self.sep_id], self.encode(y), [self.eos_id]])
            seqs.append(seq)
            n_prompt.append(len(x))
        T = max(len(s) for s in seqs) - 1
        inp = np.full((batch_size, T), self.pad_id, dtype=np.int64)
        tgt = np.full((batch_size, T), IGNORE_INDEX, dtype=np.int64)
        pad = np.ones((batch_size, T), dtype=bool)
        for i, (seq, n) in enumerate(zip(seqs, n_prompt)):
            m = len(seq) - 1
            inp[i, :m] = seq[:-1]
            tgt[i, n:m] = seq[n + 1 :]  # position of SEP predicts the first answer symbol ... last predicts EOS
            pad[i, :m] = False
        return {"input": torch.from_numpy(inp), "target": torch.from_numpy(tgt), "padding_mask": torch.from_numpy(pad)}

    def decode_answer(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in (self.pad_id,)])


def _from_digits(d: np.ndarray) -> int:
    return int("".join(str(int(v)) for v in d[::-1]))


def _to_digits(n: int) -> np.ndarray:
    return np.array([int(c) for c in str(n)[::-1]], dtype=np.int64)


class SyntheticBatches(Dataset):
    """Whole batches addressed by ``index`` (val/test) or ``(epoch, index)`` (train)."""

    def __init__(self, task: SyntheticTask, batch_size: int, min_len: int, max_len: int, seed: int, split: str, rank: int = 0):
        self.task, self.batch_size, self.min_len, self.max_len = task, batch_size, min_len, max_len
        self.seed, self.split, self.rank = seed, split, rank

    def __getitem__(self, address) -> dict[str, Any]:
        epoch, index = address if isinstance(address, tuple) else (0, address)
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], self.rank, epoch, index])
        batch = self.task.batch(rng, self.batch_size, self.min_len, self.max_len)
        batch["index"] = int(index)
        return batch


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """Teacher-forced counts: correct/total scored symbols and correct/total sequences
    (a sequence counts when it has scored positions; it is correct when all of them are)."""
    scored = targets != IGNORE_INDEX
    hit = (logits.argmax(-1) == targets) & scored
    rows = scored.any(-1)
    return {
        "chars_correct": int(hit.sum()),
        "chars": int(scored.sum()),
        "seqs_correct": int(((hit | ~scored).all(-1) & rows).sum()),
        "seqs": int(rows.sum()),
    }


def char_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of scored symbols (answer + EOS) whose argmax is right."""
    c = accuracy_counts(logits, targets)
    return c["chars_correct"] / max(c["chars"], 1)


def sequence_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of sequences whose every scored symbol is right."""
    c = accuracy_counts(logits, targets)
    return c["seqs_correct"] / max(c["seqs"], 1)


class SyntheticDataModule(L.LightningDataModule):
    """Copy / reverse / addition for :class:`~xvariants.training.module.LMTask`.

    :param task: ``copy``, ``reverse`` or ``addition``.
    :param batch_size: training batch size. :param eval_batch_size: val/test batch size.
    :param train_min_len, train_max_len: input lengths of training (and validation) examples.
    :param test_min_len, test_max_len: input lengths of the test split (longer: generalisation).
    :param batches_per_epoch: training batches per epoch (each epoch draws fresh examples).
    :param val_batches, test_batches: fixed validation / test sets, in batches.
    :param seed: seeds every batch together with its split, epoch and index.
    :param seq_len, eval_seq_len: optional; when given they must cover the longest training /
        test sequence (configs pass them so learned positions can be sized from them).
    :param tokenizer_state: a checkpoint's tokenizer, checked against this task's.
    """

    unit = "char"

    def __init__(
        self,
        task: str,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        train_min_len: int = 1,
        train_max_len: int = 40,
        test_min_len: int = 41,
        test_max_len: int = 400,
        batches_per_epoch: int = 1000,
        val_batches: int = 8,
        test_batches: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        seq_len: int | None = None,
        eval_seq_len: int | None = None,
        tokenizer_state: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.task = SyntheticTask(task)
        for name, value in (
            ("batch_size", batch_size),
            ("train_min_len", train_min_len),
            ("train_max_len", train_max_len),
            ("test_min_len", test_min_len),
            ("test_max_len", test_max_len),
            ("batches_per_epoch", batches_per_epoch),
            ("val_batches", val_batches),
            ("test_batches", test_batches),
        ):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"data.{name}", f"must be a positive integer, got {value!r}")
        require(train_min_len <= train_max_len, "data.train_min_len", f"must be <= train_max_len={train_max_len}, got {train_min_len}")
        require(test_min_len <= test_max_len, "data.test_min_len", f"must be <= test_max_len={test_max_len}, got {test_min_len}")
        if task == "addition":
            require(train_max_len >= 3, "data.train_max_len", "addition needs inputs of at least 3 symbols (a+b)")
            require(test_max_len >= 3, "data.test_max_len", "addition needs inputs of at least 3 symbols (a+b)")
        require(isinstance(num_workers, int) and num_workers >= 0, "data.num_workers", f"must be >= 0, got {num_workers!r}")
        if seq_len is not None:
            need = longest_sequence(task, train_max_len)
            require(seq_len >= need, "data.seq_len", f"the longest {task} training sequence has {need} tokens, got {seq_len}")
        if eval_seq_len is not None:
            need = longest_sequence(task, max(test_max_len, train_max_len))
            require(eval_seq_len >= need, "data.eval_seq_len", f"the longest {task} test sequence has {need} tokens, got {eval_seq_len}")
        self.tokenizer = self.task.tokenizer
        if tokenizer_state is not None and dict(tokenizer_state) != self.tokenizer.to_dict():
            raise ConfigError("data.tokenizer_state", "the checkpoint's tokenizer is not this task's vocabulary")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_lengths = (train_min_len, train_max_len)
        self.test_lengths = (test_min_len, test_max_len)
        self.batches_per_epoch, self.val_batches, self.test_batches = batches_per_epoch, val_batches, test_batches
        self.seed, self.num_workers = seed, num_workers
        self.resume_batch = 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "name": f"synthetic_{self.task.name}",
            "task": self.task.name,
            "train_lengths": list(self.train_lengths),
            "test_lengths": list(self.test_lengths),
            "format": "input SEP answer EOS; scored on answer + EOS; addition little-endian",
            "seed": self.seed,
        }

    def setup(self, stage: str | None = None) -> None:  # everything is generated on demand
        return None

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _loader(self, dataset: Dataset, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def dataset(self, split: str) -> SyntheticBatches:
        lo, hi = self.test_lengths if split == "test" else self.train_lengths
        size = self.batch_size if split == "train" else self.eval_batch_size
        return SyntheticBatches(self.task, size, lo, hi, self.seed, split, self._rank())

    def train_dataloader(self) -> DataLoader:
        start, self.resume_batch = self.resume_batch, 0
        return self._loader(self.dataset("train"), EpochSampler(self.batches_per_epoch, start=start))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("valid"), OrderedSampler(self.val_batches))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), OrderedSampler(self.test_batches))

    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("tokenizer")
        if saved is not None and saved != self.tokenizer.to_dict():
            raise DataError("the checkpoint's tokenizer is not this synthetic task's vocabulary")
