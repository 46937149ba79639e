"""Body registry: configs name a body, the registry builds it from plain keyword arguments.

Adding a variant = one module that decorates its body class with ``@register_body("name")``
(imported in ``xvariants/models/__init__.py``) + one ``configs/model/<name>.yaml``.
"""

from __future__ import annotations

import inspect

from xvariants.config_errors import ConfigError, config_scope

BODIES: dict[str, type] = {}


def register_body(name: str):
    """Class decorator that makes a body buildable by name."""

    def deco(cls):
        if name in BODIES and BODIES[name] is not cls:
            raise ValueError(f"body name {name!r} is already registered by {BODIES[name].__qualname__}")
        BODIES[name] = cls
        cls.registry_name = name
        return cls

    return deco


def body_arguments(name: str) -> dict[str, inspect.Parameter]:
    """Constructor parameters of a registered body (its config keys)."""
    if name not in BODIES:
        raise ConfigError("model.body", f"unknown body {name!r}", sorted(BODIES))
    params = inspect.signature(BODIES[name].__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def build_body(name: str, **kwargs):
    """Build body ``name``; unknown or missing arguments fail with the field name, and so do
    the errors its layers raise (they name their own argument: ``model.`` is added here)."""
    params = body_arguments(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", f"not an argument of the {name!r} body", sorted(params))
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"model.{missing[0]}", f"required by the {name!r} body but not set")
    with config_scope("model."):
        return BODIES[name](**kwargs)
