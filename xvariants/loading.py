"""Rebuild what a run saved or a config names, for training, evaluation and interpretation
alike (they import this module, never each other): checkpoints loaded without unpickling code
and saved atomically, the model a checkpoint describes, the datamodule of a data config, the
callbacks/loggers of a config group."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvariants.atomic import ATOMIC_TEMP_NAME, remove_stale_temp_files, write_atomic  # noqa: F401 (re-exported)
from xvariants.models.build import build_language_model
from xvariants.models.lm import LanguageModel

#: keys of a Lightning checkpoint that xvariants reads
STATE_DICT = "state_dict"
HYPER_PARAMETERS = "hyper_parameters"
#: where the training module keeps its :class:`~xvariants.models.lm.LanguageModel`
MODEL_PREFIX = "model."


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unsafe, corrupt, or not an xvariants checkpoint."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`~xvariants.atomic.write_atomic`: an interrupted save leaves
    the previous checkpoint intact; disk full reads ``No space left on device: <path>``."""
    write_atomic(path, lambda f: torch.save(obj, f))


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with messages a user can act on.

    A file that needs arbitrary unpickling (a pickle payload, custom classes) is refused
    before any of its code runs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, expected a .ckpt file: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects that only full unpickling could restore "
            f"(possibly code); xvariants loads checkpoints with weights_only=True. Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any other parse failure: the file is not a checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(ckpt, dict) or STATE_DICT not in ckpt:
        raise CheckpointError(f"{path} is not an xvariants/Lightning checkpoint (no state_dict)")
    return ckpt


def checkpoint_hparams(ckpt: dict, path: str | os.PathLike) -> dict:
    """The hyper-parameters an xvariants training run stored (model config, vocabulary, data...)."""
    hp = ckpt.get(HYPER_PARAMETERS) or {}
    if "model" not in hp or "vocab_size" not in hp:
        raise CheckpointError(f"{path} was not written by xvariants (no model config in its hyper-parameters)")
    return dict(hp)


def load_weights(module: nn.Module, state_dict: dict, path: str | os.PathLike, prefix: str = "") -> None:
    """Load ``state_dict`` into ``module``, which holds the entries under ``prefix``; any missing
    or extra entry is an error naming the first of them (with the checkpoint's key names)."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    expected = module.state_dict()
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in own.items()
             if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k, stored, built = wrong[0]
        raise CheckpointError(
            f"{path}: weights do not match the model its stored settings describe ({len(wrong)} tensors "
            f"differ in shape, first {prefix}{k}: {list(stored)} in the file, {list(built)} from the settings)"
        )
    missing, unexpected = module.load_state_dict(own, strict=False)
    missing = [prefix + k for k in missing]
    unexpected = [prefix + k for k in unexpected] + [k for k in state_dict if not k.startswith(prefix)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model it describes (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


#: model settings in the order that best says what a model is: which body, then what sets the
#: shapes of its weights; a "different model" message names these first
MODEL_IDENTITY_KEYS = (
    "body", "d_model", "n_layers", "n_heads", "d_head", "d_ff", "num_steps", "max_steps", "act", "rotary",
    "positions", "max_len", "tie_embeddings", "untie_r", "adaptive_cutoffs", "d_embed", "div_val", "tie_projs",
)


def model_differences(stored: dict, config: dict, shown: int = 3) -> str:
    """The model settings that differ between a checkpoint and a config, most telling first
    (:data:`MODEL_IDENTITY_KEYS`, then the rest by name), the first ``shown`` with both values
    and the others by name only, so the message stays short."""

    def rank(key: str) -> tuple[int, str]:
        return (MODEL_IDENTITY_KEYS.index(key) if key in MODEL_IDENTITY_KEYS else len(MODEL_IDENTITY_KEYS), key)

    def value(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 30 else text[:27] + "..."

    keys = sorted((k for k in set(stored) | set(config) if stored.get(k) != config.get(k)), key=rank)
    parts = [f"model.{k}: checkpoint {value(stored.get(k))} vs config {value(config.get(k))}" for k in keys[:shown]]
    rest = keys[shown:]
    if rest:
        names = ", ".join(f"model.{k}" for k in rest[:6]) + (", ..." if len(rest) > 6 else "")
        parts.append(f"and {len(rest)} more: {names}")
    return "; ".join(parts)


def load_model(path: str | os.PathLike) -> tuple[LanguageModel, dict]:
    """``(LanguageModel, hyper-parameters)`` of a training checkpoint, without Lightning or Hydra."""
    ckpt = safe_load(path)
    hp = checkpoint_hparams(ckpt, path)
    model = build_language_model(dict(hp["model"]), hp["vocab_size"])
    load_weights(model, ckpt[STATE_DICT], path, prefix=MODEL_PREFIX)
    return model, hp


def build_datamodule(data: dict, tokenizer_state: dict | None = None):
    """Instantiate a data config (``_target_``), restoring a checkpoint's tokenizer when given.
    The datamodule checks its own arguments; their errors come out as raised (naming the
    field), not wrapped in Hydra's ``InstantiationException``."""
    import hydra
    from hydra.errors import InstantiationException

    from xvariants.config_errors import ConfigError, DataError

    data = dict(data)
    if tokenizer_state is not None:
        data["tokenizer_state"] = tokenizer_state
    try:
        return hydra.utils.instantiate(data, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, (ConfigError, DataError)):
            raise e.__cause__ from None
        raise


def instantiate_group(group: dict | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    import hydra

    return [hydra.utils.instantiate(conf) for conf in (group or {}).values() if isinstance(conf, dict) and "_target_" in conf]
