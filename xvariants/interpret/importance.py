"""T2: attention rollout and attention (max-)flow (Abnar & Zuidema 2020), head importance.

Both methods work on the residual-augmented attention of each layer,
``Â_l = 0.5 * mean_h(A_l) + 0.5 * [0 | I]`` (the identity covers current positions only, so
Transformer-XL memory keys get no residual share), with two variant-specific rules:

* a UT position halted at step ``l`` (state copied) has the row ``e_q`` (pure identity);
* memory keys of layer ``l`` are leaves ``(l - 1, -j)``: their mass is not traced further,
  and :attr:`Attribution.memory_share` reports how much of it exits into memory.

Leaves are the ``T`` input tokens followed by the memory positions of every layer (layer 1
first). :func:`rollout` multiplies the matrices; :func:`attention_flow` solves max-flow
problems on the same layered graph with a small Dinic solver (no dependency).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from xvariants.interpret.record import AttentionRecord


@dataclass
class Attribution:
    """Rows = queried positions (all of the last level for rollout, the chosen sources for
    max-flow), columns = leaves (inputs, then memory).

    :param matrix: ``[n_rows, n_leaves]``; rows sum to 1 (max-flow rows are normalised).
    :param rows: token positions of the rows.
    :param leaves: ``(level, pos)`` per column: ``(0, t)`` inputs, ``(l - 1, -j)`` memory.
    :param labels: column labels.
    :param raw: unnormalised max-flow values (None for rollout).
    """

    matrix: np.ndarray
    rows: list[int]
    leaves: list[tuple[int, int]]
    labels: list[str]
    method: str
    raw: np.ndarray | None = None

    @property
    def n_inputs(self) -> int:
        return sum(1 for lv, p in self.leaves if lv == 0 and p >= 0)

    def row(self, pos: int) -> np.ndarray:
        return self.matrix[self.rows.index(pos)]

    def token_scores(self, pos: int) -> np.ndarray:
        """Attribution of position ``pos`` to the input tokens (``[T]``)."""
        return self.row(pos)[: self.n_inputs]

    def memory_share(self, pos: int | None = None) -> float | np.ndarray:
        """Share of the mass that goes into memory leaves (per row, or for row ``pos``)."""
        share = self.matrix[:, self.n_inputs :].sum(axis=1)
        return share if pos is None else float(share[self.rows.index(pos)])

    def memory_share_by_layer(self, pos: int) -> dict[int, float]:
        """``{layer: share}`` of row ``pos`` exiting into each layer's memory."""
        out: dict[int, float] = {}
        r = self.row(pos)
        for j, (lv, p) in enumerate(self.leaves):
            if p < 0:
                out[lv + 1] = out.get(lv + 1, 0.0) + float(r[j])
        return out

    def top(self, pos: int, k: int = 5) -> list[tuple[str, float]]:
        r = self.row(pos)
        order = np.argsort(-r)[:k]
        return [(self.labels[j], float(r[j])) for j in order]


def _leaves(rec: AttentionRecord) -> tuple[list[tuple[int, int]], list[str], list[int]]:
    leaves = [(0, t) for t in range(rec.n_tokens)]
    labels = list(rec.tokens)
    offsets = []
    for layer in range(1, rec.n_layers + 1):
        M = rec.n_memory(layer)
        offsets.append(len(leaves))
        for j in range(M):
            leaves.append((layer - 1, j - M))
            labels.append(f"{rec.memory_label(j, layer)}@{layer - 1}")
    return leaves, labels, offsets


def augmented(rec: AttentionRecord, layer: int, heads=None, residual: bool = True) -> np.ndarray:
    """``Â_l`` ``[T, M + T]`` with the residual, halted-row and memory rules of the module doc."""
    A = rec.merged(layer, heads)
    T, S = A.shape
    M = S - T
    eye = np.zeros((T, S))
    eye[np.arange(T), M + np.arange(T)] = 1.0
    out = 0.5 * A + 0.5 * eye if residual else A.copy()
    for q in range(T):
        if rec.copies(layer, q):
            out[q] = eye[q]
    return out


def rollout(rec: AttentionRecord, heads=None, residual: bool = True) -> Attribution:
    """Attention rollout ``J_L = Â_L ... Â_1`` extended with memory leaves; rows = positions
    of the last level. With ``residual=False`` it is the plain product of the attention."""
    leaves, labels, offsets = _leaves(rec)
    T = rec.n_tokens
    J = np.zeros((T, len(leaves)))
    J[np.arange(T), np.arange(T)] = 1.0
    for layer in range(1, rec.n_layers + 1):
        Ahat = augmented(rec, layer, heads, residual)
        M = Ahat.shape[1] - T
        new = Ahat[:, M:] @ J
        if M:
            o = offsets[layer - 1]
            new[:, o : o + M] += Ahat[:, :M]
        J = new
    return Attribution(J, list(range(T)), leaves, labels, "rollout")


# ---------------------------------------------------------------------- max-flow
class Dinic:
    """Max-flow on a directed graph with float capacities (Dinic's blocking flows)."""

    def __init__(self, n: int, eps: float = 1e-12):
        self.n, self.eps = n, eps
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def add_edge(self, u: int, v: int, c: float) -> None:
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(float(c))
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)

    def max_flow(self, s: int, t: int) -> float:
        """Flow value from ``s`` to ``t``. Capacities are consumed: call on a fresh copy."""
        if s == t:
            raise ValueError("source and sink must differ")
        flow = 0.0
        to, cap, adj, eps = self.to, self.cap, self.adj, self.eps
        while True:
            level = [-1] * self.n
            level[s] = 0
            dq = deque([s])
            while dq:
                u = dq.popleft()
                for e in adj[u]:
                    if cap[e] > eps and level[to[e]] < 0:
                        level[to[e]] = level[u] + 1
                        dq.append(to[e])
            if level[t] < 0:
                return flow
            it = [0] * self.n

            def dfs(u: int, f: float) -> float:
                if u == t:
                    return f
                while it[u] < len(adj[u]):
                    e = adj[u][it[u]]
                    v = to[e]
                    if cap[e] > eps and level[v] == level[u] + 1:
                        d = dfs(v, min(f, cap[e]))
                        if d > eps:
                            cap[e] -= d
                            cap[e ^ 1] += d
                            return d
                    it[u] += 1
                return 0.0

            while True:
                f = dfs(s, float("inf"))
                if f <= eps:
                    break
                flow += f

    def copy(self) -> Dinic:
        d = Dinic.__new__(Dinic)
        d.n, d.eps, d.adj, d.to, d.cap = self.n, self.eps, self.adj, self.to, list(self.cap)
        return d


def flow_network(rec: AttentionRecord, heads=None, residual: bool = True) -> tuple[Dinic, callable, list]:
    """The layered DAG: node ``(l, q)`` -> ``(l - 1, k)`` with capacity ``Â_l[q, k]``; memory
    keys go to leaf nodes. Returns the network, ``node(level, pos)`` and the leaf node ids."""
    T, L = rec.n_tokens, rec.n_layers
    leaves, _, offsets = _leaves(rec)
    n_mem = len(leaves) - T
    n = (L + 1) * T + n_mem

    def node(level: int, pos: int) -> int:
        return level * T + pos

    net = Dinic(n)
    for layer in range(1, L + 1):
        Ahat = augmented(rec, layer, heads, residual)
        M = Ahat.shape[1] - T
        for q in range(T):
            for k in np.nonzero(Ahat[q] > 0)[0].tolist():
                if k >= M:
                    net.add_edge(node(layer, q), node(layer - 1, k - M), Ahat[q, k])
                else:
                    net.add_edge(node(layer, q), (L + 1) * T + offsets[layer - 1] - T + k, Ahat[q, k])
    leaf_nodes = [node(0, t) for t in range(T)] + [(L + 1) * T + i for i in range(n_mem)]
    return net, node, leaf_nodes


def attention_flow(
    rec: AttentionRecord, sources: list[int] | int | None = None, heads=None, residual: bool = True
) -> Attribution:
    """Attention flow: for each source position ``q`` of the last level and each leaf ``v``,
    the max-flow value from ``(L, q)`` to ``v``; rows normalised to sum 1 (``raw`` keeps the
    values). ``sources`` defaults to the record's start token ([CLS] / last token); pass
    ``"all"`` for every position (``T * n_leaves`` max-flow problems)."""
    T, L = rec.n_tokens, rec.n_layers
    if sources is None:
        sources = [rec.default_start()]
    elif sources == "all":
        sources = list(range(T))
    elif isinstance(sources, int):
        sources = [sources]
    leaves, labels, _ = _leaves(rec)
    net, node, leaf_nodes = flow_network(rec, heads, residual)
    raw = np.zeros((len(sources), len(leaves)))
    for i, q in enumerate(sources):
        src = node(L, q)
        for j, v in enumerate(leaf_nodes):
            raw[i, j] = net.copy().max_flow(src, v)
    s = raw.sum(axis=1, keepdims=True)
    mat = np.divide(raw, s, out=np.zeros_like(raw), where=s > 0)
    return Attribution(mat, list(sources), leaves, labels, "maxflow", raw)


def head_importance(rec: AttentionRecord, tau: float = 0.1, start: int | None = None, **trace_kw) -> np.ndarray:
    """``[L, H]`` per-head importance from a traced flow (see :meth:`TraceGraph.head_importance`)."""
    from xvariants.interpret.flow import trace

    return trace(rec, tau, start, **trace_kw).head_importance()
