"""Check a composed config before anything heavy starts.

Each problem raises :class:`~xvariants.config_errors.ConfigError` naming the field and the
allowed values, so a typo costs seconds, not a failed run an hour later.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

import torch

from xvariants.config_errors import ConfigError, config_scope, require
from xvariants.data.datamodule import BATCHING
from xvariants.data.tokenizers import TOKENIZER_NAMES
from xvariants.loading import build_datamodule
from xvariants.models.build import ADAPTIVE_KEYS, split_model_config
from xvariants.models.lm import LanguageModel
from xvariants.models.registry import BODIES, body_arguments, build_body
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
        validate_text_corpus(corpus)
    build_datamodule(data)


def validate_text_corpus(corpus: dict) -> None:
    """The ``text`` corpus reads ``path`` (a file or folder) or explicit split files, not both;
    each must exist and be a regular file (or, for ``path``, a folder)."""
    files = {k: corpus.get(k) for k in ("train_file", "valid_file", "test_file") if corpus.get(k) is not None}
    path = corpus.get("path")
    if path is not None and files:
        raise ConfigError("data.corpus.path", f"given together with data.corpus.{next(iter(files))}; "
                          "give either path (split by position) or train_file/valid_file[/test_file]")
    if path is None and not files:
        raise ConfigError("data.corpus.path", "missing: give a file or folder (data.corpus.path=...) "
                          "or data.corpus.train_file=... and data.corpus.valid_file=...")
    if files:
        for key in ("train_file", "valid_file"):
            require(key in files, f"data.corpus.{key}", "missing: explicit files need train_file and valid_file")
    for key, p in ([("path", path)] if path is not None else list(files.items())):
        field, where = f"data.corpus.{key}", Path(str(p))
        require(where.exists(), field, f"no such file or folder: {p}")
        require(where.is_file() or (key == "path" and where.is_dir()), field,
                f"not a regular file{' or folder' if key == 'path' else ''}: {p}")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits a constructor annotation; kinds we do not check (containers,
    modules, callables) always fit: their owners check them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(h) for h in typing.get_args(hint))
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _init_hints(target: Any) -> dict[str, Any]:
    """The annotations of ``target``'s constructor, each resolved on its own (as
    ``typing.get_type_hints`` would) so that one unresolvable name skips only its argument."""
    fn = target.__init__ if isinstance(target, type) else target
    namespace = vars(sys.modules[fn.__module__]) if fn.__module__ in sys.modules else {}
    hints = {}
    for name, hint in getattr(fn, "__annotations__", {}).items():
        if isinstance(hint, str):
            try:
                hint = eval(hint, namespace)  # noqa: S307 - annotations of our own constructors
            except Exception:  # noqa: BLE001 - a name only imported for type checkers
                continue
        hints[name] = hint
    return hints


def check_types(values: dict, hints: dict[str, Any], prefix: str) -> None:
    """Refuse a value of the wrong type (``optim.lr=abc``) before any rule compares it."""
    for key, value in values.items():
        if key in hints and not _accepts(hints[key], value):
            raise ConfigError(prefix + key, f"must be {_hint_name(hints[key])}, got {value!r}")


#: settings read outside any annotated constructor
TOP_LEVEL_TYPES = {"seed": int, "sample_tokens": int, "resume_on_new_data": bool}
OPTIM_TYPES = {"lr": float, "weight_decay": float, "warmup_steps": int, "min_lr_ratio": float, "eps": float, "schedule": str}


def validate_types(cfg: dict) -> None:
    """Types first, so that every later rule compares values of the right kind: the top level,
    ``optim``, ``data`` (its datamodule's constructor) and ``model`` (its body's and the language
    model's constructors)."""
    check_types(cfg, TOP_LEVEL_TYPES, "")
    check_types(cfg["optim"], OPTIM_TYPES, "optim.")
    target = cfg["data"].get("_target_")
    if isinstance(target, str):
        try:
            from hydra.utils import get_class

            check_types(cfg["data"], _init_hints(get_class(target)), "data.")
        except (ImportError, ValueError):
            pass  # an unknown target is reported when the datamodule is built
    name, lm_kwargs, body_kwargs = split_model_config(cfg["model"])
    if name in BODIES and set(body_kwargs) <= set(body_arguments(name)):  # else build_body names the stranger
        check_types(body_kwargs, _init_hints(BODIES[name]), "model.")
    check_types({k: v for k, v in lm_kwargs.items() if k not in ADAPTIVE_KEYS}, _init_hints(LanguageModel), "model.")


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
    validate_types(cfg)
    validate_data(cfg["data"], cfg.get("tokenizer"))
    validate_model(cfg["model"], cfg["data"])
    validate_trainer(cfg["trainer"])
    validate_optim(cfg["optim"])
