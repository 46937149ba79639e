"""T1: threshold traces through the layered attention graph (Attention Flows, DeRose et al. 2020).

Nodes are ``(level, pos)``: level 0 = input tokens, level ``l`` = output of layer/step ``l``;
Transformer-XL memory keys of layer ``l`` are nodes ``(l - 1, pos < 0)`` (``pos = -1`` the most
recent memory position), and they are leaves. An edge ``(l, q) -> (l - 1, k)`` exists when
query ``q`` of layer ``l`` attends key ``k`` above the threshold ``tau``:

* ``merge="any"`` (default, per-head thresholding): some selected head has ``A_h[q, k] > tau``;
  the edge keeps the above-threshold heads and their weights, its weight is the largest;
* ``merge="mean"`` (heads merged first): the mean over the selected heads exceeds ``tau``.

A UT position that was halted at step ``l`` (state copied) gets a ``copy`` edge
``(l, q) -> (l - 1, q)`` of weight 1 instead of attention edges.

``direction="backward"`` starts at one node of the last level ([CLS] for encoders, the last
token for decoders) and follows edges down to the input; ``"forward"`` starts at an input
token and follows the positions that attend to it, up to the last level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xvariants.interpret.record import AttentionRecord, _head_index

MERGES = ("any", "mean")
DIRECTIONS = ("backward", "forward")


@dataclass
class Edge:
    """``(level, src) -> (level - 1, dst)``: query ``src`` of layer ``level`` reads key ``dst``
    (negative ``dst`` = memory). ``heads`` maps head -> weight of the heads that carry it."""

    level: int
    src: int
    dst: int
    weight: float
    heads: dict[int, float] = field(default_factory=dict)
    kind: str = "attn"  # "attn" or "copy" (halted UT position)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.level, self.src, self.dst)

    @property
    def upper(self) -> tuple[int, int]:
        return (self.level, self.src)

    @property
    def lower(self) -> tuple[int, int]:
        return (self.level - 1, self.dst)

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "src": self.src,
            "dst": self.dst,
            "weight": round(float(self.weight), 6),
            "heads": {str(h): round(float(w), 6) for h, w in self.heads.items()},
            "kind": self.kind,
        }


@dataclass
class TraceGraph:
    """The result of :func:`trace`: a layered stack of thresholded bipartite graphs."""

    record: AttentionRecord
    edges: list[Edge]
    start: int
    direction: str
    tau: float
    merge: str
    heads: object = None

    # ------------------------------------------------------------------ structure
    @property
    def nodes(self) -> set[tuple[int, int]]:
        n = {(self.record.n_layers, self.start)} if self.direction == "backward" else {(0, self.start)}
        for e in self.edges:
            n.add(e.upper)
            n.add(e.lower)
        return n

    def edge_keys(self, kind: str | None = "attn") -> set[tuple[int, int, int]]:
        """``{(level, src, dst)}`` (attention edges by default; ``kind=None`` = all)."""
        return {e.key for e in self.edges if kind is None or e.kind == kind}

    def head_edge_keys(self) -> set[tuple[int, int, int, int]]:
        """``{(level, head, src, dst)}``: the per-head edges."""
        return {(e.level, h, e.src, e.dst) for e in self.edges for h in e.heads}

    def memory_nodes(self) -> set[tuple[int, int]]:
        return {n for n in self.nodes if n[1] < 0}

    def halted_nodes(self) -> set[tuple[int, int]]:
        """Nodes ``(l, q)`` whose state at step ``l`` is a copy (position halted)."""
        rec = self.record
        return {(l, q) for (l, q) in self.nodes if l >= 1 and q >= 0 and not rec.is_active(l, q)}

    # ------------------------------------------------------------------ T2 from the trace
    def head_importance(self, weighted: bool = True) -> np.ndarray:
        """``[L, H]``: per layer and head, the summed above-threshold weight (or the edge count
        with ``weighted=False``) of the traced edges that head carries."""
        rec = self.record
        out = np.zeros((rec.n_layers, rec.n_heads()))
        for e in self.edges:
            for h, w in e.heads.items():
                out[e.level - 1, h] += w if weighted else 1.0
        return out

    def token_counts(self) -> np.ndarray:
        """``c[l, w]``: how many traced edges reach token ``w`` at level ``l`` (``[L + 1, T]``;
        lower ends for a backward trace, upper ends for a forward one; the start node counts 1)."""
        rec = self.record
        c = np.zeros((rec.n_layers + 1, rec.n_tokens))
        for e in self.edges:
            if e.kind != "attn":
                continue
            lvl, pos = e.lower if self.direction == "backward" else e.upper
            if pos >= 0:
                c[lvl, pos] += 1
        s_lvl = rec.n_layers if self.direction == "backward" else 0
        c[s_lvl, self.start] += 1
        return c

    def token_influence(self, alpha: float = 0.5) -> np.ndarray:
        """Token influence ``I(w)`` from the counts ``c_l(w)`` with decay ``alpha`` per level away
        from the start: ``I(w) = sum_l alpha^(d_l) c_l(w)``, ``d_l`` = levels between ``l`` and
        the start level, normalised to sum 1. (Our reading of Attention Flows §4's counts-with-
        decay influence; the paper's exact normalisation was not available to check.)"""
        c = self.token_counts()
        L = self.record.n_layers
        d = np.arange(L, -1, -1) if self.direction == "backward" else np.arange(0, L + 1)
        inf = (alpha ** d)[:, None] * c
        tot = inf.sum(axis=0)
        s = tot.sum()
        return tot / s if s > 0 else tot

    def memory_share(self) -> dict:
        """Transformer-XL: share of the traced edge weight that goes into memory leaves, per
        layer and overall (0 when there is no memory)."""
        per = np.zeros(self.record.n_layers)
        tot = np.zeros(self.record.n_layers)
        for e in self.edges:
            if e.kind != "attn":
                continue
            tot[e.level - 1] += e.weight
            if e.dst < 0:
                per[e.level - 1] += e.weight
        with np.errstate(invalid="ignore", divide="ignore"):
            by_layer = np.where(tot > 0, per / np.where(tot > 0, tot, 1), 0.0)
        total = float(per.sum() / tot.sum()) if tot.sum() > 0 else 0.0
        return {"total": total, "by_layer": by_layer.tolist()}

    def to_dict(self) -> dict:
        rec = self.record
        return {
            "model": rec.name,
            "start": self.start,
            "direction": self.direction,
            "tau": self.tau,
            "merge": self.merge,
            "n_edges": len(self.edges),
            "n_nodes": len(self.nodes),
            "edges": [e.to_dict() for e in self.edges],
            "halted_nodes": sorted(self.halted_nodes()),
            "memory_share": self.memory_share(),
        }

    def __repr__(self) -> str:
        return (
            f"TraceGraph({self.record.name!r}, {self.direction} from {self.start}, tau={self.tau}, "
            f"{len(self.edges)} edges, {len(self.nodes)} nodes)"
        )


def _layer_edges(rec: AttentionRecord, layer: int, tau: float, merge: str, heads) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Boolean ``keep [T, M+T]``, weights ``[T, M+T]`` and the selected head ids of one layer."""
    a = rec.attn[layer - 1]
    idx = _head_index(heads, a.shape[0], layer)
    if not idx:
        z = np.zeros(a.shape[1:])
        return z.astype(bool), z, idx
    sel = a[idx]
    if merge == "any":
        keep = (sel > tau).any(axis=0)
        weight = sel.max(axis=0)
    else:
        weight = sel.mean(axis=0)
        keep = weight > tau
    return keep, weight, idx


def _edge(rec, layer, q, k, M, weight, idx, tau) -> Edge:
    col = rec.attn[layer - 1][idx, q, k]
    hs = {h: float(w) for h, w in zip(idx, col) if w > tau}
    return Edge(layer, q, k - M, float(weight[q, k]), hs)


def trace(
    record: AttentionRecord,
    tau: float = 0.1,
    start: int | None = None,
    *,
    direction: str = "backward",
    heads=None,
    merge: str = "any",
) -> TraceGraph:
    """Threshold trace (T1). See the module docstring.

    :param tau: keep edges whose weight is strictly above ``tau``.
    :param start: token position to start from (default: [CLS]/position 0 for encoders and
        the last token for decoders when tracing backward; position 0 forward).
    :param heads: None (all), a list of head ids (in every layer) or ``{layer: [heads]}``.
    :param merge: ``any`` (per-head threshold, union) or ``mean`` (heads averaged, then threshold).
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    T, L = record.n_tokens, record.n_layers
    if start is None:
        start = record.default_start() if direction == "backward" else 0
    if start < 0:
        start += T
    if not 0 <= start < T:
        raise ValueError(f"start token {start} is outside the sequence (0..{T - 1})")
    edges: list[Edge] = []
    if direction == "backward":
        frontier = {start}
        for layer in range(L, 0, -1):
            keep, weight, idx = _layer_edges(record, layer, tau, merge, heads)
            M = record.n_memory(layer)
            nxt: set[int] = set()
            for q in sorted(frontier):
                if record.copies(layer, q):
                    edges.append(Edge(layer, q, q, 1.0, {}, "copy"))
                    nxt.add(q)
                    continue
                for k in np.nonzero(keep[q])[0].tolist():
                    edges.append(_edge(record, layer, q, k, M, weight, idx, tau))
                    if k >= M:
                        nxt.add(k - M)
            frontier = nxt
    else:
        frontier = {start}
        for layer in range(1, L + 1):
            keep, weight, idx = _layer_edges(record, layer, tau, merge, heads)
            M = record.n_memory(layer)
            nxt = set()
            cols = sorted(frontier)
            for q in range(T):
                if record.copies(layer, q):
                    if q in frontier:
                        edges.append(Edge(layer, q, q, 1.0, {}, "copy"))
                        nxt.add(q)
                    continue
                for k in cols:
                    if keep[q, k + M]:
                        edges.append(_edge(record, layer, q, k + M, M, weight, idx, tau))
                        nxt.add(q)
            frontier = nxt
    return TraceGraph(record, edges, start, direction, tau, merge, heads)
