"""What the ``python -m xvariants.interpret`` commands share: ``key=value`` options checked
against each command's own set (an unknown one gets a did-you-mean), typed values with one
message naming the option, and the model of a checkpoint with its tokenizer."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

from xvariants.errors import UsageError


def parse_options(args: Iterable[str], known: set[str], command: str) -> dict[str, str]:
    """``key=value`` arguments -> dict; a leading ``+`` (Hydra habit) is dropped.

    :param args: the arguments after the command name.
    :param known: the options ``command`` accepts.
    :param command: named in the message for an unknown option.
    """
    opts: dict[str, str] = {}
    for a in args:
        a = a.lstrip("+")
        if "=" not in a:
            raise UsageError(f"arguments are key=value, got {a!r}")
        k, v = a.split("=", 1)
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (options of {command}: {', '.join(sorted(known))})"
            raise UsageError(f"unknown option {k!r}{hint}")
        opts[k] = v
    return opts


def one_source(opts: dict) -> None:
    """Exactly one model: ``ckpt_path=`` or ``hf_model=``."""
    if ("ckpt_path" in opts) == ("hf_model" in opts):
        raise UsageError("give exactly one of ckpt_path=... or hf_model=...")


def as_bool(v: str, key: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{key}: expected true or false, got {v!r}")


def as_number(opts: dict, key: str, default: float) -> float:
    """A finite float (``nan``/``inf`` refused: no threshold or scale means anything with them)."""
    try:
        value = float(opts.get(key, default))
    except ValueError:
        raise UsageError(f"{key}: expected a number, got {opts[key]!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{key}: expected a finite number, got {opts[key]!r}")
    return value


def as_int(opts: dict, key: str, default: int | None, minimum: int = 1) -> int | None:
    """An integer >= ``minimum`` (``default`` when the option is absent)."""
    if key not in opts:
        return default
    text = opts[key].strip()
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UsageError(f"{key}: expected an integer >= {minimum}, got {opts[key]!r}")
    return value


def load_checkpoint_model(ckpt_path: str):
    """``(model, tokenizer, hyper-parameters)`` rebuilt from an xvariants checkpoint (weights_only load)."""
    from xvariants.data.tokenizers import tokenizer_from_dict
    from xvariants.loading import load_model

    model, hparams = load_model(ckpt_path)
    state = hparams.get("tokenizer_state")
    if not state:
        raise UsageError(f"{ckpt_path} stores no tokenizer; cannot encode text for it")
    return model.eval(), tokenizer_from_dict(state), hparams
