"""Arguments of the causal traces (:mod:`.causal_trace`, :mod:`.causal_memory`), checked with
one message each naming the argument, and the error a fact the model does not know raises."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.interpret.hooks import unwrap_model
from xvariants.interpret.patching import KIND_POINTS, TraceSites
from xvariants.modes import eval_modes

KINDS = tuple(KIND_POINTS)


class WrongPrediction(ValueError):
    """The clean model does not predict the expected answer (the fact is skipped)."""

    def __init__(self, expected: int, predicted: int, p_expected: float):
        self.expected, self.predicted, self.p_expected = expected, predicted, p_expected
        super().__init__(f"answer: the model predicts token {predicted}, not the expected {expected} (p={p_expected:.3g})")


def check_prompt(model: nn.Module, tokens: torch.Tensor, subject_range) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(tokens [T], (start, end))``: a non-empty prompt within the model's context and a
    non-empty subject range inside it."""
    if not (isinstance(tokens, torch.Tensor) and tokens.dtype == torch.long and tokens.numel() > 0
            and (tokens.dim() == 1 or (tokens.dim() == 2 and tokens.size(0) == 1))):
        raise ConfigError("tokens", f"must be a non-empty LongTensor [T], got {getattr(tokens, 'shape', type(tokens))}")
    tokens = tokens.reshape(-1)
    T = tokens.numel()
    limit = getattr(unwrap_model(model), "max_context", None)
    require(limit is None or T <= limit, "tokens", f"the prompt has {T} tokens, longer than the model's context of {limit}")
    try:
        start, end = (int(i) for i in subject_range)
    except (TypeError, ValueError):
        raise ConfigError("subject_range", f"must be a (start, end) pair of token indices, got {subject_range!r}") from None
    require(0 <= start < end <= T, "subject_range",
            f"{(start, end)} is empty or outside the prompt's {T} tokens (need 0 <= start < end <= {T})")
    return tokens, (start, end)


def noise_std(noise, sigma: float | None) -> float:
    """The absolute noise std: ``noise`` itself, or N x ``sigma`` for ``noise="sN"``."""
    if isinstance(noise, str):
        m = re.fullmatch(r"s(\d+(?:\.\d*)?)", noise)
        require(m is not None, "noise", f"unknown noise {noise!r}", ["a number (absolute)", "'sN' (N x sigma)"])
        require(sigma is not None and sigma > 0, "sigma", f"noise={noise!r} needs sigma (embedding_std), got {sigma!r}")
        return float(m.group(1)) * float(sigma)
    require(isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise >= 0,
            "noise", f"must be >= 0 or 'sN', got {noise!r}")
    return float(noise)


def check_samples(samples) -> None:
    require(isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1, "samples", f"must be >= 1, got {samples!r}")


def check_kinds(kinds: Sequence[str] | None, sites: TraceSites) -> tuple[str, ...]:
    """Known kinds the model has hook points for (None: all it has)."""
    if kinds is None:
        return tuple(k for k in KINDS if k in sites.names)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for k in kinds:
        require(k in KINDS, "kinds", f"unknown kind {k!r}", KINDS)
        require(k in sites.names, "kinds", f"this model has no {KIND_POINTS[k]} hook points for kind {k!r}", sorted(sites.names))
    return kinds


#: eval mode for a trace, then each submodule's own previous mode (the name the tracing code uses)
EvalMode = eval_modes
