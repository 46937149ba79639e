"""Attention flow on hand-built attention: rollout, threshold traces, max-flow, comparison,
UT halting and XL memory leaves; and the record taken from real xvariants models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from xvariants.interpret import AttentionRecord, attention_flow, compare, record_attention, rollout, trace
from xvariants.interpret.importance import augmented
from xvariants.models import build_language_model


def rows(rng, H, T, S=None, causal=False):
    """Random row-stochastic attention [H, T, S] (causal: key j <= query i)."""
    S = S or T
    a = rng.random((H, T, S)) ** 3
    if causal:
        a = a * (np.arange(S)[None, None, :] <= (np.arange(T)[None, :, None] + S - T))
    return a / a.sum(-1, keepdims=True)


def test_rollout_two_layers_is_the_matrix_product():
    A1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    A2 = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.0, 0.1, 0.9]])
    # two heads per layer whose mean is A1 / A2
    d = np.array([[0.1, -0.1, 0.0], [0.0, 0.05, -0.05], [0.1, 0.0, -0.1]])
    rec = AttentionRecord(list("abc"), [np.stack([A1 + d, A1 - d]), np.stack([A2 - d * 0, A2])], causal=False)
    I = np.eye(3)
    np.testing.assert_allclose(rollout(rec).matrix, (0.5 * A2 + 0.5 * I) @ (0.5 * A1 + 0.5 * I), atol=1e-12)
    np.testing.assert_allclose(rollout(rec, residual=False).matrix, A2 @ A1, atol=1e-12)
    # head selection: only head 0 of every layer
    np.testing.assert_allclose(rollout(rec, heads=[0], residual=False).matrix, A2 @ (A1 + d), atol=1e-12)


def brute_backward(rec, tau, start, merge="any", heads=None):
    """Every (layer, q, k) edge reachable from start through edges above tau, by definition."""
    L = rec.n_layers
    reach = {L: {start}}
    edges = set()
    for l in range(L, 0, -1):
        a = rec.attn[l - 1] if heads is None else rec.attn[l - 1][heads]
        w = a.max(0) if merge == "any" else a.mean(0)
        keep = (a > tau).any(0) if merge == "any" else w > tau
        reach[l - 1] = set()
        for q, k in itertools.product(range(rec.n_tokens), range(rec.n_tokens)):
            if q in reach[l] and keep[q, k]:
                edges.add((l, q, k))
                reach[l - 1].add(k)
    return edges


@pytest.mark.parametrize("merge", ["any", "mean"])
def test_threshold_trace_keeps_exactly_the_edges_above_tau(merge):
    rng = np.random.default_rng(0)
    rec = AttentionRecord(list("abcdefg"), [rows(rng, 3, 7) for _ in range(4)], causal=False)
    for tau in (0.05, 0.2, 0.4):
        g = trace(rec, tau, merge=merge)
        assert g.start == 0  # encoder: [CLS]
        assert g.edge_keys() == brute_backward(rec, tau, 0, merge)
        # every kept per-head weight is above tau, every edge weight follows the merge rule
        for e in g.edges:
            a = rec.attn[e.level - 1][:, e.src, e.dst]
            assert all(w > tau for w in e.heads.values())
            assert set(e.heads) == {h for h in range(3) if a[h] > tau}
            assert e.weight == pytest.approx(a.max() if merge == "any" else a.mean())
    # head selection
    g = trace(rec, 0.2, heads=[1])
    assert g.edge_keys() == brute_backward(rec, 0.2, 0, heads=[1])
    assert {h for e in g.edges for h in e.heads} <= {1}


def test_forward_trace_and_decoder_default_start():
    rng = np.random.default_rng(1)
    rec = AttentionRecord(list("abcdef"), [rows(rng, 2, 6, causal=True) for _ in range(3)], causal=True)
    assert trace(rec, 0.2).start == 5  # decoder: last token
    tau, src = 0.15, 1
    g = trace(rec, tau, src, direction="forward")
    reach, want = {src}, set()
    for l in range(1, 4):
        keep = (rec.attn[l - 1] > tau).any(0)
        nxt = set()
        for q, k in itertools.product(range(6), range(6)):
            if k in reach and keep[q, k]:
                want.add((l, q, k))
                nxt.add(q)
        reach = nxt
    assert g.edge_keys() == want
    assert all(e.src >= e.dst for e in g.edges)  # causal: nobody reads the future


def test_max_flow_matches_closed_forms():
    rng = np.random.default_rng(2)
    A1, A2 = rows(rng, 1, 4)[0], rows(rng, 1, 4)[0]
    one = AttentionRecord(list("abcd"), [A1[None]], causal=False)
    fl = attention_flow(one, "all")
    np.testing.assert_allclose(fl.raw, augmented(one, 1), atol=1e-9)  # one layer: the edge itself
    two = AttentionRecord(list("abcd"), [A1[None], A2[None]], causal=False)
    B1, B2 = augmented(two, 1), augmented(two, 2)
    want = np.array([[sum(min(B2[q, m], B1[m, k]) for m in range(4)) for k in range(4)] for q in range(4)])
    fl = attention_flow(two, "all")
    np.testing.assert_allclose(fl.raw, want, atol=1e-9)  # disjoint two-edge paths
    np.testing.assert_allclose(fl.matrix.sum(1), 1.0)


def test_max_flow_agrees_with_networkx():
    nx = pytest.importorskip("networkx", reason="networkx not installed (cross-check only)")
    rng = np.random.default_rng(3)
    T, L = 5, 3
    rec = AttentionRecord(list("abcde"), [rows(rng, 2, T) for _ in range(L)], causal=False)
    G = nx.DiGraph()
    for l in range(1, L + 1):
        B = augmented(rec, l)
        for q, k in itertools.product(range(T), range(T)):
            if B[q, k] > 0:
                G.add_edge((l, q), (l - 1, k), capacity=B[q, k])
    ours = attention_flow(rec, [0, 3])
    for i, q in enumerate([0, 3]):
        for k in range(T):
            assert ours.raw[i, k] == pytest.approx(nx.maximum_flow_value(G, (L, q), (0, k)), abs=1e-9)


def test_compare_shared_and_exclusive_edges():
    rng = np.random.default_rng(4)
    attn_a = [rows(rng, 2, 5) for _ in range(2)]
    attn_a[1][:, 0] = np.eye(5)[1]  # layer 2: [CLS] reads token 1 in A ...
    attn_b = [x.copy() for x in attn_a]
    attn_b[1][:, 0] = np.eye(5)[4]  # ... and token 4 in B
    a = AttentionRecord(list("abcde"), attn_a, causal=False, name="A")
    b = AttentionRecord(list("abcde"), attn_b, causal=False, name="B")
    c = compare(a, b, 0.2)
    ea, eb = trace(a, 0.2).edge_keys(), trace(b, 0.2).edge_keys()
    assert c.shared == ea & eb and c.only_a == ea - eb and c.only_b == eb - ea
    assert (2, 0, 1) in c.only_a and (2, 0, 4) in c.only_b
    assert {(2, h, 0, 1) for h in (0, 1)} <= c.only_a_heads
    assert np.isclose(c.attention_diff[0], 0).all()  # layer 1 unchanged
    assert (c.attention_diff[1] > 0).all()
    assert c.head_diff.shape == (2, 2)
    same = compare(a, a, 0.2)
    assert not same.only_a and not same.only_b and same.jaccard == 1.0


def test_universal_halted_positions_are_copies():
    T = 4
    rng = np.random.default_rng(5)
    active = [None, np.array([1, 0, 1, 1], bool), np.array([1, 0, 0, 1], bool)]
    rec = AttentionRecord(list("abcd"), [rows(rng, 2, T) for _ in range(3)], active=active, causal=False, kind="universal")
    g = trace(rec, 0.0, 1)  # tau=0 keeps every edge of active positions
    copies = {e.key for e in g.edges if e.kind == "copy"}
    assert copies == {(3, 1, 1), (2, 1, 1)}  # halted at step 2 and 3: copied down
    assert (3, 1) in g.halted_nodes() and (2, 1) in g.halted_nodes()
    J = rollout(rec).matrix
    A1 = 0.5 * rec.merged(1) + 0.5 * np.eye(T)
    np.testing.assert_allclose(J[1], A1[1])  # position 1 stopped after step 1
    B3 = augmented(rec, 3)
    np.testing.assert_allclose(B3[2], np.eye(T)[2])


def test_xl_memory_positions_are_leaves():
    T, M = 3, 2
    a = np.zeros((1, T, M + T))
    a[0] = [[0.5, 0.3, 0.2, 0, 0], [0.1, 0.1, 0.4, 0.4, 0], [0.0, 0.6, 0.2, 0.1, 0.1]]
    rec = AttentionRecord(list("xyz"), [a, a], memory_tokens=list("pq"), kind="xl")
    g = trace(rec, 0.15)  # from z
    mem_edges = {e.key for e in g.edges if e.dst < 0}
    assert (2, 2, -1) in mem_edges  # z reads memory q (the most recent) at 0.6
    assert all(e.src >= 0 for e in g.edges)  # nothing leaves a memory node
    share = g.memory_share()
    assert 0 < share["total"] < 1
    ro = rollout(rec)
    np.testing.assert_allclose(ro.matrix.sum(1), 1.0)
    # by hand: row z of layer 2 sends 0.5 * (0.0 + 0.6) = 0.3 straight into layer-2 memory
    assert ro.memory_share_by_layer(2)[2] == pytest.approx(0.3)
    assert ro.labels[T:] == ["p@0", "q@0", "p@1", "q@1"]
    fl = attention_flow(rec)
    assert 0 < fl.memory_share(2) < 1


@pytest.mark.parametrize(
    "cfg, word",
    [
        ({"body": "vanilla", "n_layers": 2}, "layer"),
        ({"body": "xl", "n_layers": 2, "mem_len": 4}, "layer"),
        ({"body": "universal", "num_steps": 2}, "step"),
        ({"body": "universal_xl", "num_steps": 2, "mem_len": 4}, "step"),
        ({"body": "universal_xl", "act": True, "max_steps": 3, "mem_len": 4}, "step"),
    ],
)
def test_record_names_levels_steps_for_every_body_that_repeats_a_layer(cfg, word):
    torch.manual_seed(0)
    m = build_language_model({"d_model": 16, "n_heads": 2, "dropout": 0.0, **cfg}, 11).eval()
    rec = record_attention(m, torch.arange(6))
    assert rec.kind == cfg["body"] and rec.layer_word == word and rec.to_dict()["layer_word"] == word


def test_record_from_models_and_influence():
    V = 29
    torch.manual_seed(0)
    m = build_language_model({"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0,
                              "max_len": 32, "causal": False}, V).eval()
    rec = record_attention(m, torch.randint(0, V, (7,)))
    assert rec.n_layers == 2 and rec.n_heads() == 4 and not rec.causal and rec.kind == "vanilla"
    np.testing.assert_allclose(rec.attn[0].sum(-1), 1.0, atol=1e-6)
    g = trace(rec, 0.1)
    infl = g.token_influence()
    assert infl.shape == (7,) and infl.sum() == pytest.approx(1.0)
    assert g.head_importance().shape == (2, 4)
