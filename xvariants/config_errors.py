"""One exception type for bad configuration, so every entry point reports it the same way."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""

    def __init__(self, field: str, problem: str, allowed: Iterable | str | None = None):
        self.field = field
        msg = f"{field}: {problem}"
        if allowed is not None:
            if not isinstance(allowed, str):
                allowed = ", ".join(str(a) for a in allowed)
            msg += f" (allowed: {allowed})"
        super().__init__(msg)


def require(condition: bool, field: str, problem: str, allowed: Iterable | str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, problem, allowed)


class DataError(ValueError):
    """The data a run points at cannot be used (bad data option, empty or corrupt corpus,
    checksum mismatch, split too short). The message names the field or the file."""
