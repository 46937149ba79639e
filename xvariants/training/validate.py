"""Check a composed config before anything heavy starts.

Each problem raises :class:`~xvariants.config_errors.ConfigError` naming the field and the
allowed values, so a typo costs seconds, not a failed run an hour later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xvariants.config_errors import ConfigError, require
from xvariants.models.build import split_model_config
from xvariants.models.registry import BODIES, body_arguments
from xvariants.training.optim import validate_optim

TOKENIZERS = ("byte", "char", "word", "bpe")
BATCHING = ("ordered", "random")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


def _positive_int(value: Any, field: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, f"must be a positive integer, got {value!r}")


def validate_data(data: dict, tokenizer: dict | None) -> None:
    for key in ("batch_size", "seq_len", "eval_batch_size"):
        _positive_int(data.get(key), f"data.{key}")
    if data.get("eval_seq_len") is not None:
        _positive_int(data["eval_seq_len"], "data.eval_seq_len")
    if data.get("batching", "random") not in BATCHING:
        raise ConfigError("data.batching", f"unknown batching {data.get('batching')!r}", BATCHING)
    if data.get("batching") == "random" and data.get("batches_per_epoch") is not None:
        _positive_int(data["batches_per_epoch"], "data.batches_per_epoch")
    if tokenizer is not None:
        if tokenizer.get("name") not in TOKENIZERS:
            raise ConfigError("tokenizer.name", f"unknown tokenizer {tokenizer.get('name')!r}", TOKENIZERS)
    corpus = data.get("corpus") or {}
    if corpus.get("name") == "text":
        files = [corpus.get(k) for k in ("train_file", "valid_file", "test_file") if corpus.get(k)]
        paths = files or [corpus.get("path")]
        for field, p in zip(("data.corpus.path",) if not files else ("data.corpus.train_file", "data.corpus.valid_file", "data.corpus.test_file"), paths):
            require(p is not None and Path(str(p)).exists(), field, f"no such file or folder: {p}")


def validate_model(model: dict, data: dict) -> None:
    name, lm_kwargs, body_kwargs = split_model_config(model)
    params = body_arguments(name)  # raises for an unknown body
    for key in body_kwargs:
        if key not in params:
            raise ConfigError(f"model.{key}", f"not an argument of the {name!r} body", sorted(params))
    d_model, n_heads = body_kwargs.get("d_model"), body_kwargs.get("n_heads")
    _positive_int(d_model, "model.d_model")
    if n_heads is not None:
        _positive_int(n_heads, "model.n_heads")
        require(d_model % n_heads == 0, "model.n_heads", f"d_model={d_model} is not divisible by n_heads={n_heads}", "divisors of d_model")
    for key in ("n_layers", "d_ff"):
        if body_kwargs.get(key) is not None:
            _positive_int(body_kwargs[key], f"model.{key}")
    for key in ("dropout", "attn_dropout", "emb_dropout"):
        value = body_kwargs.get(key, lm_kwargs.get(key))
        if value is not None:
            require(0.0 <= value < 1.0, f"model.{key}", f"must be in [0, 1), got {value}")
    positions = lm_kwargs.get("positions")
    if positions not in (None, "learned", "sinusoidal", "none"):
        raise ConfigError("model.positions", f"unknown kind {positions!r}", ["learned", "sinusoidal", "none"])
    if positions == "learned":
        longest = max(data.get("seq_len", 0), data.get("eval_seq_len") or 0)
        require(
            lm_kwargs.get("max_len", 1024) >= longest,
            "model.max_len",
            f"learned positions cover {lm_kwargs.get('max_len')} tokens but data sequences are {longest} long",
        )
    body_cls = BODIES[name]
    if getattr(body_cls, "stateful", False) and data.get("batching") == "random":
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
