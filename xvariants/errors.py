"""One error path for every entry point: ``train.py``, ``eval.py`` and ``python -m xvariants.interpret``.

A user error -- a bad setting, data that cannot be used, a checkpoint that cannot be loaded,
a path that cannot be read or written, a bad command-line value -- ends as one message,
``error: <what is wrong, naming the field or the path>``, and exit status 2, without a
traceback. Anything else is a bug and keeps its traceback. ``XVARIANTS_DEBUG=1`` (or Hydra's
own ``HYDRA_FULL_ERROR=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: exit status of every user error
USER_ERROR_EXIT = 2


class UsageError(ValueError):
    """A command-line option of the interpret CLI is missing, unknown or has a bad value."""


def debug_requested() -> bool:
    """True when the user asked for tracebacks (``XVARIANTS_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``)."""
    flag = os.environ.get("XVARIANTS_DEBUG")
    if flag is not None:
        return flag not in ("", "0")
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _oserror_message(exc: OSError) -> str:
    """``<reason>: <path>``, the way the shell says it (``No space left on device: runs/last.ckpt``)."""
    if exc.strerror is None:
        return str(exc)  # raised with a message of ours (e.g. "corpus file not found: ...")
    message = exc.strerror
    if exc.filename is not None:
        message += f": {os.fsdecode(exc.filename)}"
    if exc.filename2 is not None:
        message += f" -> {os.fsdecode(exc.filename2)}"
    return message


def describe(exc: BaseException) -> str | None:
    """The message for a user error, or None when ``exc`` is not one (a bug: keep its traceback)."""
    from hydra.errors import CompactHydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    from xvariants.config_errors import ConfigError, DataError
    from xvariants.loading import CheckpointError

    if isinstance(exc, (ConfigError, DataError, CheckpointError, UsageError)):
        return str(exc)
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        inner = describe(exc.__cause__)
        if inner is not None:
            return inner
    if isinstance(exc, CompactHydraException):  # before OSError: Hydra's missing-config error is one
        cause = exc.__cause__
        extra = f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else ""
        return f"{exc}{extra}"
    if isinstance(exc, OmegaConfBaseException):
        lines = str(exc).splitlines()
        key = getattr(exc, "full_key", None)
        return lines[0] + (f" (at {key})" if key and key not in lines[0] else "")
    if isinstance(exc, OSError):
        return _oserror_message(exc)
    return None


def report(exc: BaseException) -> int:
    """Print ``exc`` as one ``error:`` message and return the exit status, or re-raise it when it
    is a bug or tracebacks were asked for."""
    message = None if debug_requested() else describe(exc)
    if message is None:
        raise exc
    print(f"error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside a task function: a user error exits with :func:`report`'s status before Hydra adds
    its own "Error executing job" line; anything else goes on to Hydra (and its traceback)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - report() re-raises whatever is not a user error
        raise SystemExit(report(exc)) from None


def run_hydra_entry(hydra_main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function so that the user errors Hydra meets before the task
    (unknown config or override, unwritable run folder) end through :func:`report` too.

    Hydra prints its own partial traceback for errors and exits 1, unless ``HYDRA_FULL_ERROR=1``
    makes it re-raise them: we set it for the call, and record in ``XVARIANTS_DEBUG`` whether the
    user wanted tracebacks, for the processes this one starts (DDP ranks inherit the variables).
    """
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", "XVARIANTS_DEBUG")}
    os.environ["XVARIANTS_DEBUG"] = "1" if debug_requested() else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra_main()
    except Exception as exc:  # noqa: BLE001 - report() re-raises whatever is not a user error
        status = report(exc)
        raise SystemExit(status) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
