"""Check a composed config before anything heavy starts.

Each problem raises :class:`~xvariants.config_errors.ConfigError` naming the field and the
allowed values, so a typo costs seconds, not a failed run an hour later.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from xvariants.config_errors import ConfigError, config_scope, require
from xvariants.data.datamodule import BATCHING
from xvariants.data.tokenizers import TOKENIZER_NAMES
from xvariants.loading import build_datamodule
from xvariants.models.build import ADAPTIVE_KEYS, split_model_config
from xvariants.models.lm import LanguageModel
from xvariants.models.registry import BODIES, build_body
from xvariants.training.optim import validate_optim

#: what ``max_len`` is when the model config does not set it
_LM_MAX_LEN = inspect.signature(LanguageModel).parameters["max_len"].default
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


def validate_data(data: dict, tokenizer: dict | None) -> None:
    """What must hold before the corpus is read; then the datamodule is constructed (which reads
    nothing yet) so that its own checks of sizes, counts and options run before the model's."""
    if data.get("batching", "random") not in BATCHING:
        raise ConfigError("data.batching", f"unknown batching {data.get('batching')!r}", BATCHING)
    if tokenizer is not None:
        if tokenizer.get("name") not in TOKENIZER_NAMES:
            raise ConfigError("tokenizer.name", f"unknown tokenizer {tokenizer.get('name')!r}", TOKENIZER_NAMES)
    corpus = data.get("corpus") or {}
    if corpus.get("name") == "text":
        files = [corpus.get(k) for k in ("train_file", "valid_file", "test_file") if corpus.get(k)]
        paths = files or [corpus.get("path")]
        for field, p in zip(("data.corpus.path",) if not files else ("data.corpus.train_file", "data.corpus.valid_file", "data.corpus.test_file"), paths):
            require(p is not None and Path(str(p)).exists(), field, f"no such file or folder: {p}")
    build_datamodule(data)


def validate_model(model: dict, data: dict) -> None:
    """Build the model on the meta device (shapes only, no memory), so that the checks its
    constructors make run before data preparation; then the rules that involve ``data``.
    The adaptive embedding/softmax options need the vocabulary: they are checked when the
    model is built for real."""
    name, lm_kwargs, body_kwargs = split_model_config(model)
    with torch.device("meta"), config_scope("model."):
        body = build_body(name, **body_kwargs)
        LanguageModel(body, 1, **{k: v for k, v in lm_kwargs.items() if k not in ADAPTIVE_KEYS})
    if lm_kwargs.get("positions") == "learned":
        longest = max(data.get("seq_len", 0), data.get("eval_seq_len") or 0)
        max_len = lm_kwargs.get("max_len", _LM_MAX_LEN)
        require(
            max_len >= longest,
            "model.max_len",
            f"learned positions cover {lm_kwargs.get('max_len')} tokens but data sequences are {longest} long",
        )
    if getattr(BODIES[name], "stateful", False) and data.get("batching") == "random":
        raise ConfigError(
            "data.batching",
            f"the {name!r} body carries memory across batches, which needs consecutive text",
            ["ordered"],
        )


def validate_trainer(trainer: dict) -> None:
    max_steps = trainer.get("max_steps", -1)
    require(isinstance(max_steps, int) and (max_steps > 0 or max_steps == -1), "trainer.max_steps", f"must be > 0 or -1, got {max_steps}")
    if trainer.get("precision") is not None:
        require(str(trainer["precision"]) in PRECISIONS, "trainer.precision", f"unknown precision {trainer['precision']!r}", PRECISIONS)
    require(trainer.get("use_distributed_sampler", False) is False, "trainer.use_distributed_sampler",
            "must be false: the datamodule gives each rank its own streams", ["false"])


def validate_train_config(cfg: dict) -> None:
    """Validate the plain-dict form of the composed ``train.yaml``."""
    for group in ("data", "model", "trainer", "optim"):
        require(isinstance(cfg.get(group), dict), group, "missing config group")
    validate_data(cfg["data"], cfg.get("tokenizer"))
    validate_model(cfg["model"], cfg["data"])
    validate_trainer(cfg["trainer"])
    validate_optim(cfg["optim"])
