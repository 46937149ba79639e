"""T3: compare two models on the same input (before/after fine-tuning, vanilla vs UT, ...)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xvariants.interpret.flow import TraceGraph, trace
from xvariants.interpret.record import AttentionRecord


@dataclass
class Comparison:
    """Shared and exclusive edges of two traces, and per-head differences.

    Edges are keyed ``(level, src, dst)``; per-head edges ``(level, head, src, dst)``.
    ``head_diff`` = ``a.head_importance() - b.head_importance()`` over the layers and heads the
    two models share; ``attention_diff[l, h]`` = mean absolute difference of the two attention
    matrices of layer ``l + 1``, head ``h`` (where their shapes agree, else NaN).
    """

    a: TraceGraph
    b: TraceGraph
    shared: set[tuple[int, int, int]]
    only_a: set[tuple[int, int, int]]
    only_b: set[tuple[int, int, int]]
    shared_heads: set[tuple[int, int, int, int]]
    only_a_heads: set[tuple[int, int, int, int]]
    only_b_heads: set[tuple[int, int, int, int]]
    head_diff: np.ndarray
    attention_diff: np.ndarray

    @property
    def jaccard(self) -> float:
        union = len(self.shared) + len(self.only_a) + len(self.only_b)
        return len(self.shared) / union if union else 1.0

    def most_changed_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """``(layer, head, mean |dA|)`` of the heads whose attention changed most (1-based layers)."""
        d = np.nan_to_num(self.attention_diff, nan=-1.0)
        order = np.argsort(-d, axis=None)[:k]
        return [(int(i // d.shape[1]) + 1, int(i % d.shape[1]), float(d.flat[i])) for i in order if d.flat[i] >= 0]

    def summary(self) -> dict:
        return {
            "models": [self.a.record.name, self.b.record.name],
            "shared_edges": len(self.shared),
            "only_a_edges": len(self.only_a),
            "only_b_edges": len(self.only_b),
            "jaccard": round(self.jaccard, 4),
            "shared_head_edges": len(self.shared_heads),
            "only_a_head_edges": len(self.only_a_heads),
            "only_b_head_edges": len(self.only_b_heads),
            "most_changed_heads": self.most_changed_heads(),
        }


def attention_difference(a: AttentionRecord, b: AttentionRecord) -> np.ndarray:
    """``[L, H]`` mean |A_a - A_b| per layer and head over the shared layers/heads (NaN where
    the shapes differ, e.g. another memory length)."""
    L = min(a.n_layers, b.n_layers)
    H = min(a.n_heads(), b.n_heads())
    out = np.full((L, H), np.nan)
    for l in range(L):
        x, y = a.attn[l], b.attn[l]
        if x.shape[1:] != y.shape[1:]:
            continue
        h = min(x.shape[0], y.shape[0], H)
        out[l, :h] = np.abs(x[:h] - y[:h]).mean(axis=(1, 2))
    return out


def compare(
    a: AttentionRecord | TraceGraph, b: AttentionRecord | TraceGraph, tau: float = 0.1, start: int | None = None, **trace_kw
) -> Comparison:
    """Compare two models' traces on the same tokens (records are traced with the same
    ``tau``/``start``/options; traces are used as given)."""
    ta = a if isinstance(a, TraceGraph) else trace(a, tau, start, **trace_kw)
    tb = b if isinstance(b, TraceGraph) else trace(b, tau, start, **trace_kw)
    if ta.record.n_tokens != tb.record.n_tokens:
        raise ValueError(
            f"the two models saw different inputs ({ta.record.n_tokens} vs {tb.record.n_tokens} tokens): "
            "compare them on the same tokens"
        )
    ea, eb = ta.edge_keys(), tb.edge_keys()
    ha, hb = ta.head_edge_keys(), tb.head_edge_keys()
    ia, ib = ta.head_importance(), tb.head_importance()
    L, H = min(ia.shape[0], ib.shape[0]), min(ia.shape[1], ib.shape[1])
    return Comparison(
        ta, tb, ea & eb, ea - eb, eb - ea, ha & hb, ha - hb, hb - ha,
        ia[:L, :H] - ib[:L, :H], attention_difference(ta.record, tb.record),
    )
