"""How a split is cut into streams, and what an evaluation procedure returns per target.

The split is cut into ``n_streams`` contiguous streams (the layout of
:class:`~xvariants.data.batching.OrderedStreams` and of the original Transformer-XL
``LMOrderedIterator``): stream ``b`` is ``tokens[b*L:(b+1)*L]``, the remainder (fewer than
``n_streams`` tokens) is dropped. The *targets* are stream positions ``1 .. L-1``; an
:class:`EvalResult` holds one NLL, context position and count per target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xvariants.config_errors import ConfigError, require

# --------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    """Per-target results of one procedure on ``[n_streams, L]`` streams.

    ``nll``, ``position`` and ``count`` are ``[n_streams, L-1]``: column ``t-1`` is the target
    at stream position ``t``.
    """

    procedure: str
    attention_length: int
    nll: np.ndarray
    position: np.ndarray
    count: np.ndarray
    seconds: float
    window: int | None = None
    stride: int | None = None
    tgt_len: int | None = None
    mem_len: int | None = None
    clamp_len: int | None = None
    forwards: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.count.sum())

    @property
    def loss(self) -> float:
        """Mean NLL per scored token (nats)."""
        return float(self.nll.astype(np.float64).sum() / max(self.n_tokens, 1))

    @property
    def ppl(self) -> float:
        return float(math.exp(min(self.loss, 700.0)))

    @property
    def bits(self) -> float:
        return self.loss / math.log(2)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)

    @property
    def mean_context(self) -> float:
        """Mean number of tokens each prediction attended to directly (position + 1)."""
        return float(self.position.astype(np.float64).mean() + 1.0)

    def describe(self) -> str:
        if self.procedure == "sliding":
            return f"sliding window {self.window}, stride {self.stride}"
        clamp = "" if self.clamp_len in (None, -1) else f", clamp {self.clamp_len}"
        return f"segments {self.tgt_len} + memory {self.mem_len}{clamp}"


# --------------------------------------------------------------------------- streams
def make_streams(tokens: np.ndarray | torch.Tensor, n_streams: int, *, split: str = "test") -> torch.Tensor:
    """``[n_streams, L]`` int64 view of ``tokens`` cut into contiguous streams (remainder dropped)."""
    require(isinstance(n_streams, int) and n_streams >= 1, "eval.streams", f"must be an integer >= 1, got {n_streams!r}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64)) if not isinstance(tokens, torch.Tensor) else tokens.long()
    L = int(tokens.numel()) // n_streams
    require(
        L >= 2,
        "eval.streams",
        f"the {split} split has {tokens.numel()} tokens, too few for {n_streams} streams of at least 2 tokens",
    )
    return tokens[: n_streams * L].reshape(n_streams, L).contiguous()


def check_attention_length(attention_length: int, streams: torch.Tensor, *, split: str = "test",
                           field_name: str = "eval.attention_lengths") -> None:
    """An attention length must fit in every stream (targets 1..L-1)."""
    B, L = streams.shape
    require(
        isinstance(attention_length, int) and not isinstance(attention_length, bool) and attention_length >= 1,
        field_name,
        f"must be integers >= 1, got {attention_length!r}",
    )
    if attention_length > L - 1:
        raise ConfigError(
            field_name,
            f"attention length {attention_length} is longer than the {split} split allows: it is cut into "
            f"{B} streams (eval.streams) of {L} tokens, so at most {L - 1} tokens of context exist; "
            f"lower the attention length or eval.streams",
            f"1..{L - 1}",
        )


def sliding_plan(n_targets: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Windows over one stream with ``n_targets`` targets: ``(start, first_scored)`` pairs.

    Window ``(s, f)`` reads inputs ``s .. s+W-1`` and scores its offsets ``f .. W-1`` (targets
    ``s+f+1 .. s+W``). Every target ``1 .. n_targets`` is scored by exactly one window.
    """
    if window > n_targets:
        raise ValueError(f"window {window} is longer than the {n_targets} targets of the stream")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    plan = [(0, 0)]
    end = window  # last target scored so far
    while end < n_targets:
        new_end = min(end + stride, n_targets)
        start = new_end - window
        plan.append((start, end - start))
        end = new_end
    return plan


def position_profile(result: EvalResult, n_bins: int = 24, min_count: int | None = None) -> list[dict[str, Any]]:
    """Mean NLL per (log-spaced) bin of position inside the attended window.

    Bins with fewer than ``min_count`` tokens are left out (default: 0.2% of the scored tokens,
    at least 20): early positions are only reached at the start of each stream, too few to mean
    much, unless the stride equals the window."""
    pos = result.position.reshape(-1).astype(np.int64)
    nll = result.nll.reshape(-1)
    if min_count is None:
        min_count = max(20, pos.size // 500)
    top = max(int(pos.max()) + 1, 2)
    edges = np.unique(np.round(np.geomspace(1, top + 1, n_bins + 1)).astype(np.int64)) - 1
    edges[0], edges[-1] = 0, top
    rows = []
    which = np.searchsorted(edges, pos, side="right") - 1
    for k in range(len(edges) - 1):
        sel = which == k
        n = int(sel.sum())
        if n < min_count:
            continue
        rows.append({"lo": int(edges[k]), "hi": int(edges[k + 1]) - 1, "count": n,
                     "position": float(pos[sel].mean()), "loss": float(nll[sel].mean())})
    return rows
