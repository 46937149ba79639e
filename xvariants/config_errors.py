"""One exception type for bad configuration, so every entry point reports it the same way."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""

    def __init__(self, field: str, problem: str, allowed: Iterable | str | None = None):
        self.field, self.problem, self.allowed = field, problem, allowed
        msg = f"{field}: {problem}"
        if allowed is not None:
            if not isinstance(allowed, str):
                allowed = ", ".join(str(a) for a in allowed)
            msg += f" (allowed: {allowed})"
        super().__init__(msg)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` (e.g. ``"model."``) put before its field."""
        err = ConfigError(prefix + self.field, self.problem, self.allowed)
        err.__cause__ = self.__cause__
        return err


@contextlib.contextmanager
def config_scope(prefix: str) -> Iterator[None]:
    """Errors raised inside name fields from where the user set them: a layer names its own
    argument (``mem_len``) and the config boundary adds the group (``model.mem_len``).
    Fields that already carry the prefix are left as they are."""
    try:
        yield
    except ConfigError as err:
        if err.field.startswith(prefix):
            raise
        raise err.under(prefix) from None


def require(condition: bool, field: str, problem: str, allowed: Iterable | str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, problem, allowed)


def check_positive_int(value, field: str) -> int:
    """``value`` must be an int > 0 (bools refused)."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field,
        f"must be a positive integer, got {value!r}",
    )
    return value


def check_probability(value, field: str) -> float:
    """A dropout rate: a number in [0, 1)."""
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0,
        field,
        f"must be in [0, 1), got {value!r}",
    )
    return float(value)


class DataError(ValueError):
    """The data a run points at cannot be used (bad data option, empty or corrupt corpus,
    checksum mismatch, split too short). The message names the field or the file."""
