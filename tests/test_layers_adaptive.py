"""Adaptive input embeddings and the projected adaptive softmax, with every body."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xvariants.config_errors import ConfigError
from xvariants.layers.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax, build_adaptive
from xvariants.models import LanguageModel, build_language_model
from xvariants.models.xl import XLBody


pytestmark = pytest.mark.usefixtures("one_thread")


V, D = 30, 16
CUTOFFS = [5, 12, 20]


def _pair(div_val=2, d_embed=16, tie=True, tie_projs=None, seed=0):
    torch.manual_seed(seed)
    emb, head = build_adaptive(V, D, cutoffs=CUTOFFS, div_val=div_val, d_embed=d_embed, tie_weights=tie, tie_projs=tie_projs)
    for p in head.parameters():  # bigger weights: make every term of the softmax matter
        torch.nn.init.normal_(p, std=0.5)
    return emb.double(), head.double()


def _reference_log_probs(head: ProjectedAdaptiveLogSoftmax, h: torch.Tensor) -> torch.Tensor:
    """Written from the definition: head softmax over shortlist + cluster logits; a tail token's
    log-prob = head log-prob of its cluster (cluster i <-> head column -i) + tail log-softmax."""
    ends = head.cutoff_ends
    n_clusters = len(ends) - 2
    out = torch.empty(*h.shape[:-1], V, dtype=h.dtype)
    for c in range(n_clusters + 1):
        lo, hi = ends[c], ends[c + 1]
        if head.div_val == 1:
            w, b = head.out_layers[0].weight[lo:hi], head.out_layers[0].bias[lo:hi]
        else:
            w, b = head.out_layers[c].weight, head.out_layers[c].bias
        proj = head.out_projs[c]
        hp = h if proj is None else h @ proj
        if c == 0:
            logits = torch.cat([hp @ w.T + b, hp @ head.cluster_weight.T + head.cluster_bias], -1)
            head_lp = logits.log_softmax(-1)
            out[..., lo:hi] = head_lp[..., :hi]
        else:
            col = ends[1] + n_clusters - c  # head column -c (cluster 1 <-> the last cluster logit)
            out[..., lo:hi] = head_lp[..., col, None] + (hp @ w.T + b).log_softmax(-1)
    return out


@pytest.mark.parametrize("div_val,d_embed", [(1, 16), (1, 8), (2, 16), (4, 64)])
def test_log_probs_match_reference_and_normalise(div_val, d_embed):
    emb, head = _pair(div_val, d_embed)
    h = torch.randn(3, 7, D, dtype=torch.float64)
    lp = head.logits(h)
    assert lp.shape == (3, 7, V)
    torch.testing.assert_close(lp, _reference_log_probs(head, h).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)


@pytest.mark.parametrize("div_val", [1, 2])
def test_nll_per_token_in_order_ignoring_minus_100(div_val):
    emb, head = _pair(div_val)
    h = torch.randn(4, 9, D, dtype=torch.float64)
    targets = torch.randint(0, V, (4, 9))
    targets[0, :4] = torch.tensor([0, 7, 15, 29])  # one per cluster
    targets[1, 3] = -100
    nll = head.nll(h, targets)
    assert nll.shape == targets.shape
    ref = F.nll_loss(head.logits(h).reshape(-1, V), targets.reshape(-1), ignore_index=-100, reduction="none").view(4, 9)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    assert nll[1, 3] == 0
    # and against log_softmax of the reference distribution, per token
    direct = -_reference_log_probs(head, h).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(nll[targets != -100], direct[targets != -100].float(), rtol=1e-5, atol=1e-5)


def test_no_cutoffs_is_full_softmax_with_bias():
    torch.manual_seed(0)
    head = ProjectedAdaptiveLogSoftmax(V, D, [])
    h = torch.randn(2, 5, D)
    t = torch.randint(0, V, (2, 5))
    logits = F.linear(h, head.out_layers[0].weight, head.out_layers[0].bias)
    torch.testing.assert_close(head.logits(h), logits.log_softmax(-1))
    torch.testing.assert_close(head.nll(h, t), F.cross_entropy(logits.reshape(-1, V), t.reshape(-1), reduction="none").view(2, 5))


def test_gradients_reach_every_cluster():
    emb, head = _pair(2, tie=False)
    h = torch.randn(2, 20, D, dtype=torch.float64, requires_grad=True)
    t = torch.arange(0, 40).view(2, 20) % V
    head.nll(h, t).sum().backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in head.out_layers)
    assert head.cluster_weight.grad.abs().sum() > 0 and h.grad.abs().sum() > 0


@pytest.mark.parametrize("div_val,d_embed", [(1, 16), (1, 8), (2, 16)])
def test_adaptive_embedding_matches_definition(div_val, d_embed):
    emb, _ = _pair(div_val, d_embed)
    tokens = torch.tensor([[0, 4, 5, 11, 12, 19, 20, 29]])
    out = emb(tokens)
    assert out.shape == (1, 8, D)
    for k, tok in enumerate(tokens[0].tolist()):
        c = sum(tok >= e for e in CUTOFFS) if div_val > 1 else 0
        lo = ([0] + CUTOFFS)[c] if div_val > 1 else 0
        vec = emb.emb_layers[c].weight[tok - lo]
        proj = emb.emb_projs[c]
        expect = (vec if proj is None else proj @ vec) * math.sqrt(D)
        torch.testing.assert_close(out[0, k], expect)
    # div_val 1 with d_embed == d_model is a plain scaled embedding without projection
    if div_val == 1 and d_embed == D:
        assert emb.emb_projs == [None]


def test_tied_weights_and_projections_are_shared():
    emb, head = _pair(2, tie_projs=[False, True, True, True])
    for i in range(4):
        assert head.out_layers[i].weight is emb.emb_layers[i].weight
    assert head.out_projs[0] is not emb.emb_projs[0]
    for i in (1, 2, 3):
        assert head.out_projs[i] is emb.emb_projs[i]
    lm = LanguageModel(XLBody(d_model=D, n_layers=1, n_heads=2, mem_len=4), V, embedding=emb.float(), head=head.float())
    n_unique = sum(p.numel() for p in lm.parameters())  # named_parameters de-duplicates shared tensors
    n_all = sum(p.numel() for m in lm.modules() for p in m.parameters(recurse=False))
    assert n_all - n_unique == sum(l.weight.numel() for l in head.out_layers) + sum(
        emb.emb_projs[i].numel() for i in (1, 2, 3)
    )
    # one update moves both uses: a gradient through the head changes what the embedding returns
    opt = torch.optim.SGD(lm.parameters(), lr=1.0)
    before = lm.embed(torch.tensor([[25]])).detach().clone()
    h = torch.randn(1, 3, D)
    lm.head.nll(h, torch.tensor([[25, 25, 25]])).sum().backward()
    opt.step()
    assert not torch.allclose(before, lm.embed(torch.tensor([[25]])))
    # untied: nothing shared
    emb2, head2 = _pair(2, tie=False, tie_projs=False)
    assert all(head2.out_layers[i].weight is not emb2.emb_layers[i].weight for i in range(4))


def test_tie_projs_default_all_but_first():
    emb, head = build_adaptive(V, D, cutoffs=CUTOFFS, div_val=2)
    assert [head.out_projs[i] is emb.emb_projs[i] for i in range(4)] == [False, True, True, True]


def test_init_of_projections_and_biases():
    torch.manual_seed(0)
    emb, head = build_adaptive(2000, 64, cutoffs=[500, 1000], div_val=1, d_embed=128, tie_projs=False)
    assert abs(emb.emb_projs[0].std().item() - 0.01) < 0.001
    assert abs(head.out_projs[1].std().item() - 0.01) < 0.001
    assert abs(emb.emb_layers[0].weight.std().item() - 0.02) < 0.001
    assert head.out_layers[0].bias.abs().max() == 0 and head.cluster_bias.abs().max() == 0


@pytest.mark.parametrize("body", ["vanilla", "xl"])
def test_every_body_trains_with_adaptive_from_config(body):
    cfg = {"body": body, "d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0,
           "adaptive_cutoffs": [10, 20], "div_val": 2, "tie_projs": [False, True, True]}
    if body == "xl":
        cfg.update(mem_len=4, positions="none", embed_scale=True)
    else:
        cfg.update(positions="learned", max_len=32)
    torch.manual_seed(0)
    lm = build_language_model(cfg, V)
    assert isinstance(lm.embed, AdaptiveEmbedding) and isinstance(lm.head, ProjectedAdaptiveLogSoftmax)
    assert (lm.embed.pos is None) == (body == "xl")
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    x = torch.randint(0, V, (2, 9))
    losses = []
    for _ in range(15):
        out = lm(x[:, :-1], x[:, 1:])
        losses.append(out.loss.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.5
    out = lm.generate(x[:, :3], 4, temperature=1.0)
    assert out.shape == (2, 7) and int(out.max()) < V


def test_full_softmax_stays_default():
    lm = build_language_model({"body": "xl", "d_model": 16, "n_layers": 1, "n_heads": 2, "mem_len": 4}, V)
    from xvariants.models.heads import InputEmbedding, LinearHead

    assert isinstance(lm.embed, InputEmbedding) and isinstance(lm.head, LinearHead)
    lm2 = build_language_model({"body": "xl", "d_model": 16, "n_layers": 1, "n_heads": 2, "mem_len": 4,
                                "adaptive_cutoffs": None, "div_val": 1, "tie_projs": None}, V)
    assert isinstance(lm2.head, LinearHead)


def test_bad_adaptive_configs():
    base = {"body": "xl", "d_model": 16, "n_layers": 1, "n_heads": 2, "mem_len": 4}
    with pytest.raises(ConfigError, match="model.adaptive_cutoffs: must be strictly increasing integers between 0 and the vocabulary size 30"):
        build_language_model({**base, "adaptive_cutoffs": [20, 10]}, V)
    with pytest.raises(ConfigError, match="adaptive_cutoffs"):
        build_language_model({**base, "adaptive_cutoffs": [5, 40]}, V)
    with pytest.raises(ConfigError, match="div_val / d_embed / tie_projs need adaptive_cutoffs"):
        build_language_model({**base, "div_val": 4}, V)
    with pytest.raises(ConfigError, match="model.div_val"):
        build_language_model({**base, "adaptive_cutoffs": [5, 10, 20], "div_val": 8}, V)
    with pytest.raises(ConfigError, match="model.tie_projs: needs one flag per cluster \\(4\\)"):
        build_language_model({**base, "adaptive_cutoffs": [5, 10, 20], "div_val": 2, "tie_projs": [True]}, V)
    _, head = _pair(2)
    with pytest.raises(IndexError, match="targets must be in"):
        head.nll(torch.randn(1, 2, D, dtype=torch.float64), torch.tensor([[1, 30]]))
