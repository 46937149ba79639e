"""Adaptive input embeddings (Baevski & Auli 2019) and the projected adaptive softmax
(Grave et al. 2017) as used by Transformer-XL (``AdaptiveEmbedding`` and
``ProjectedAdaptiveLogSoftmax`` of kimiyoung/transformer-xl), for large vocabularies.

The vocabulary, sorted by frequency, is cut at ``cutoffs`` into clusters: cluster 0 (the
shortlist, ids ``[0, cutoffs[0])``), then ``[cutoffs[0], cutoffs[1])``, ... up to the vocabulary
size. Cluster ``i`` has width ``d_embed // div_val**i`` and its own projection to
``d_model`` (``div_val = 1``: one table of width ``d_embed``, projected only if
``d_embed != d_model``). The softmax has a head over shortlist + one logit per tail
cluster; a tail token's log-probability is head[cluster] + tail-softmax[token].

Both work with every body through ``LanguageModel(embedding=..., head=...)``; the head
offers the same ``logits(hidden)`` (here: log-probabilities) and ``nll(hidden, targets)``
(per token, token order, 0 where the target is -100) as :class:`~xvariants.models.heads.LinearHead`.
Empty ``cutoffs`` gives one cluster: a full softmax with an output bias (the original's
enwik8/text8 setup).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.constants import IGNORE_INDEX
from xvariants.layers.hooks import HookPoint
from xvariants.layers.positions import build_positions


def check_cutoffs(cutoffs: Sequence[int], vocab_size: int, field: str = "cutoffs") -> list[int]:
    """Cutoffs must be strictly increasing ints in ``(0, vocab_size)``."""
    cutoffs = list(cutoffs)
    ok = all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs)
    ok = ok and all(0 < c < vocab_size for c in cutoffs) and all(a < b for a, b in zip(cutoffs, cutoffs[1:]))
    require(ok, field, f"must be strictly increasing integers between 0 and the vocabulary size {vocab_size}, got {cutoffs}")
    return cutoffs


def _check_div_val(div_val: int, d_embed: int, n_clusters: int) -> None:
    require(isinstance(div_val, int) and div_val >= 1, "div_val", f"must be an integer >= 1, got {div_val!r}")
    if div_val > 1:
        smallest = d_embed // div_val ** (n_clusters - 1)
        require(smallest >= 1, "div_val", f"d_embed={d_embed} // div_val**{n_clusters - 1} leaves width 0 for the last cluster")


def cluster_layout(
    vocab_size: int, d_model: int, cutoffs: Sequence[int], d_embed: int | None, div_val: int
) -> tuple[int, list[int], list[int]]:
    """Checked cluster layout shared by adaptive input and softmax: ``(d_embed, cutoffs,
    cutoff_ends)`` with ``cutoffs`` ending at ``vocab_size`` and ``cutoff_ends = [0] + cutoffs``."""
    cutoffs = check_cutoffs(cutoffs, vocab_size)
    d_embed = d_model if d_embed is None else d_embed
    _check_div_val(div_val, d_embed, len(cutoffs) + 1)
    ends = cutoffs + [vocab_size]
    return d_embed, ends, [0] + ends


class AdaptiveEmbedding(nn.Module):
    """Adaptive input: per-cluster embedding tables of shrinking width, projected to ``d_model``.

    :param vocab_size: number of token ids (sorted by frequency for the clusters to help).
    :param d_model: output width (``d_proj`` of the original).
    :param cutoffs: cluster boundaries (without ``vocab_size``); ``[]`` = one table.
    :param d_embed: width of cluster 0 (default ``d_model``).
    :param div_val: cluster ``i`` has width ``d_embed // div_val**i``.
    :param scale: multiply by ``sqrt(d_model)`` (the original always does).
    :param dropout: dropout on the output.
    :param positions: absolute positions for bodies that need them (``learned``, ``sinusoidal``, ``none``).
    :param max_len: longest sequence for learned positions.
    :param init_std: std of the N(0, std) tables.
    :param proj_init_std: std of the N(0, std) projections.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        cutoffs: Sequence[int] = (),
        *,
        d_embed: int | None = None,
        div_val: int = 1,
        scale: bool = True,
        dropout: float = 0.0,
        positions: str = "none",
        max_len: int = 1024,
        init_std: float = 0.02,
        proj_init_std: float = 0.01,
    ):
        super().__init__()
        d_embed, self.cutoffs, self.cutoff_ends = cluster_layout(vocab_size, d_model, cutoffs, d_embed, div_val)
        self.vocab_size, self.d_model, self.d_embed, self.div_val = vocab_size, d_model, d_embed, div_val
        self.emb_layers = nn.ModuleList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(vocab_size, d_embed))
            self.register_parameter("emb_proj_0", nn.Parameter(torch.empty(d_model, d_embed)) if d_model != d_embed else None)
        else:
            for i in range(len(self.cutoffs)):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_i = d_embed // div_val**i
                self.emb_layers.append(nn.Embedding(hi - lo, d_i))
                self.register_parameter(f"emb_proj_{i}", nn.Parameter(torch.empty(d_model, d_i)))
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.pos = build_positions(positions, d_model, max_len)
        self.max_len = max_len if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        for emb in self.emb_layers:
            nn.init.normal_(emb.weight, 0.0, init_std)
        for p in self.emb_projs:
            if p is not None:
                nn.init.normal_(p, 0.0, proj_init_std)
        if self.pos is not None and hasattr(self.pos, "weight"):
            nn.init.normal_(self.pos.weight, 0.0, init_std)

    @property
    def emb_projs(self) -> list[nn.Parameter | None]:
        """Projection of each cluster ``[d_model, d_i]`` (None where there is none)."""
        return [getattr(self, f"emb_proj_{i}", None) for i in range(len(self.emb_layers))]

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if self.div_val == 1:
            emb = self.emb_layers[0](tokens)
            if self.emb_proj_0 is not None:
                emb = F.linear(emb, self.emb_proj_0)
        else:
            flat = tokens.reshape(-1)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
                raise IndexError(f"token ids must be in [0, {self.vocab_size}), got [{int(flat.min())}, {int(flat.max())}]")
            dtype = self.emb_proj_0.dtype
            emb_flat = torch.zeros(flat.size(0), self.d_model, dtype=dtype, device=tokens.device)
            for i, layer in enumerate(self.emb_layers):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                emb_i = F.linear(layer(flat[idx] - lo), getattr(self, f"emb_proj_{i}"))
                emb_flat = emb_flat.index_copy(0, idx, emb_i.to(dtype))
            emb = emb_flat.view(*tokens.shape, self.d_model)
        h = self.hook_embed(emb * self.scale)
        if self.pos is not None:
            h = h + self.hook_pos_embed(self.pos(tokens.size(1), offset, device=tokens.device))
        return self.drop(h)


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Adaptive softmax with per-cluster projections (``ProjectedAdaptiveLogSoftmax``).

    ``logits(hidden)`` returns full log-probabilities ``[..., V]`` (their softmax is the
    model's distribution, so sampling code treats them as logits); ``nll(hidden, targets)``
    returns the per-token negative log-likelihood in token order (the original's
    ``keep_order=True``), 0 where ``targets == -100``, without forming tail logits for
    tokens outside each tail cluster.

    Head layout as the original: ``[shortlist logits, cluster_weight[0], ..., cluster_weight[n-1]]``,
    and tail cluster ``i`` (1-based) reads head column ``-i`` (cluster 1 <-> the LAST row of
    ``cluster_weight``), which matters when porting weights.

    :param vocab_size: number of token ids.
    :param d_model: hidden width (``d_proj``).
    :param cutoffs: cluster boundaries (without ``vocab_size``); ``[]`` = full softmax with bias.
    :param d_embed: width of cluster 0 (default ``d_model``).
    :param div_val: cluster ``i`` has width ``d_embed // div_val**i``.
    :param init_std: std of output weights and cluster weights (biases start at 0).
    :param proj_init_std: std of the projections.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        cutoffs: Sequence[int] = (),
        *,
        d_embed: int | None = None,
        div_val: int = 1,
        init_std: float = 0.02,
        proj_init_std: float = 0.01,
    ):
        super().__init__()
        d_embed, self.cutoffs, self.cutoff_ends = cluster_layout(vocab_size, d_model, cutoffs, d_embed, div_val)
        self.vocab_size, self.d_model, self.d_embed, self.div_val = vocab_size, d_model, d_embed, div_val
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.empty(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
            nn.init.normal_(self.cluster_weight, 0.0, init_std)
        self.out_layers = nn.ModuleList()
        if div_val == 1:
            self.out_layers.append(nn.Linear(d_embed, vocab_size))
            for i in range(len(self.cutoffs)):
                self.register_parameter(f"out_proj_{i}", nn.Parameter(torch.empty(d_model, d_embed)) if d_model != d_embed else None)
        else:
            for i in range(len(self.cutoffs)):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_i = d_embed // div_val**i
                self.out_layers.append(nn.Linear(d_i, hi - lo))
                self.register_parameter(f"out_proj_{i}", nn.Parameter(torch.empty(d_model, d_i)))
        for layer in self.out_layers:
            nn.init.normal_(layer.weight, 0.0, init_std)
            nn.init.zeros_(layer.bias)
        for p in self.out_projs:
            if p is not None:
                nn.init.normal_(p, 0.0, proj_init_std)

    @property
    def out_projs(self) -> list[nn.Parameter | None]:
        return [getattr(self, f"out_proj_{i}", None) for i in range(len(self.cutoffs))]

    # ----------------------------------------------------------------- tying
    def tie_to(
        self, embedding: AdaptiveEmbedding, tie_projs: bool | Sequence[bool] = False, *, tie_weights: bool = True
    ) -> None:
        """Share output weights with ``embedding`` (``tie_weight``) and, per cluster where
        ``tie_projs`` is true, the projections (the original's wt103 uses ``[F, T, T, T]``,
        lm1b ``[F, F, F, F]``). Biases stay untied. With ``div_val == 1`` and
        ``d_embed == d_model`` there are no projections and ``tie_projs`` changes nothing."""
        if not isinstance(embedding, AdaptiveEmbedding):
            raise TypeError(f"the adaptive softmax ties to an AdaptiveEmbedding, got {type(embedding).__name__}")
        same = (embedding.cutoffs, embedding.div_val, embedding.d_embed, embedding.d_model) == (
            self.cutoffs, self.div_val, self.d_embed, self.d_model)
        if not same:
            raise ValueError("embedding and softmax must have the same vocabulary, cutoffs, div_val, d_embed and d_model to be tied")
        if tie_weights:
            for i, layer in enumerate(self.out_layers):
                layer.weight = embedding.emb_layers[i].weight
        flags = [bool(tie_projs)] * len(self.cutoffs) if isinstance(tie_projs, bool) else [bool(t) for t in tie_projs]
        if len(flags) != len(self.cutoffs):
            raise ConfigError("tie_projs", f"needs one flag per cluster ({len(self.cutoffs)}), got {len(flags)}")
        for i, tie in enumerate(flags):
            if not tie:
                continue
            if self.div_val == 1 and self.d_model != self.d_embed:
                setattr(self, f"out_proj_{i}", embedding.emb_proj_0)
            elif self.div_val != 1:
                setattr(self, f"out_proj_{i}", getattr(embedding, f"emb_proj_{i}"))

    # ---------------------------------------------------------------- scores
    @staticmethod
    def _logit(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
        if proj is not None:
            hidden = F.linear(hidden, proj.t())
        return F.linear(hidden, weight, bias)

    def _cluster_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights, biases = [], []
        for i in range(len(self.cutoffs)):
            if self.div_val == 1:
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                w, b = self.out_layers[0].weight[lo:hi], self.out_layers[0].bias[lo:hi]
            else:
                w, b = self.out_layers[i].weight, self.out_layers[i].bias
            if i == 0 and self.n_clusters > 0:
                w = torch.cat([w, self.cluster_weight], dim=0)
                b = torch.cat([b, self.cluster_bias], dim=0)
            weights.append(w)
            biases.append(b)
        return weights, biases

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[..., V]`` of the next token (float32)."""
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.size(-1))
        weights, biases = self._cluster_params()
        projs = self.out_projs
        head_lp = F.log_softmax(self._logit(h, weights[0], biases[0], projs[0]).float(), dim=-1)
        if self.n_clusters == 0:
            return head_lp.view(*lead, self.vocab_size)
        parts = [head_lp[:, : self.shortlist_size]]
        for i in range(1, len(self.cutoffs)):
            tail_lp = F.log_softmax(self._logit(h, weights[i], biases[i], projs[i]).float(), dim=-1)
            parts.append(head_lp[:, -i, None] + tail_lp)
        return torch.cat(parts, dim=-1).view(*lead, self.vocab_size)

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`logits` (they are log-probabilities)."""
        return self.logits(hidden)

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood (nats) ``targets.shape``, token order, 0 at -100."""
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
        h = hidden.reshape(-1, hidden.size(-1))
        t = targets.reshape(-1)
        scored = t != IGNORE_INDEX
        if bool(((t < 0) & scored).any()) or bool((t >= self.vocab_size).any()):
            raise IndexError(f"targets must be in [0, {self.vocab_size}) or {IGNORE_INDEX}")
        weights, biases = self._cluster_params()
        projs = self.out_projs
        nll = torch.zeros(t.shape, dtype=torch.float32, device=h.device)
        if self.n_clusters == 0:
            lp = F.log_softmax(self._logit(h, weights[0], biases[0], projs[0]).float(), dim=-1)
            nll = -lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            return nll.masked_fill(~scored, 0.0).view_as(targets)
        head_lp = F.log_softmax(self._logit(h, weights[0], biases[0], projs[0]).float(), dim=-1)
        for i in range(len(self.cutoffs)):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            idx = (scored & (t >= lo) & (t < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            t_i = (t[idx] - lo)[:, None]
            head_i = head_lp[idx]
            if i == 0:
                lp_i = head_i.gather(1, t_i).squeeze(1)
            else:
                tail = F.log_softmax(self._logit(h[idx], weights[i], biases[i], projs[i]).float(), dim=-1)
                lp_i = head_i[:, -i] + tail.gather(1, t_i).squeeze(1)
            nll = nll.index_copy(0, idx, -lp_i)
        return nll.view_as(targets)


def build_adaptive(
    vocab_size: int,
    d_model: int,
    *,
    cutoffs: Sequence[int],
    div_val: int = 1,
    d_embed: int | None = None,
    tie_weights: bool = True,
    tie_projs: bool | Sequence[bool] | None = None,
    scale: bool = True,
    dropout: float = 0.0,
    positions: str = "none",
    max_len: int = 1024,
    init_std: float = 0.02,
    proj_init_std: float = 0.01,
) -> tuple[AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax]:
    """Embedding + softmax pair, tied as the original's ``--tie_weight`` / ``--tie_projs``.

    ``tie_projs=None`` uses the original's default for adaptive runs: all but the first
    cluster (``[False, True, True, ...]``).
    """
    cutoffs = check_cutoffs(cutoffs, vocab_size)
    emb = AdaptiveEmbedding(
        vocab_size, d_model, cutoffs, d_embed=d_embed, div_val=div_val, scale=scale, dropout=dropout,
        positions=positions, max_len=max_len, init_std=init_std, proj_init_std=proj_init_std,
    )
    head = ProjectedAdaptiveLogSoftmax(
        vocab_size, d_model, cutoffs, d_embed=d_embed, div_val=div_val, init_std=init_std, proj_init_std=proj_init_std
    )
    if tie_projs is None:
        tie_projs = [False] + [True] * len(cutoffs)
    head.tie_to(emb, tie_projs, tie_weights=tie_weights)
    return emb, head


def build_adaptive_from_config(
    adaptive: dict, lm_kwargs: dict, body: nn.Module, vocab_size: int, init_std: float = 0.02
) -> tuple[AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax]:
    """The pair asked for by a flat model config (keys ``adaptive_cutoffs``, ``div_val``,
    ``tie_projs``, ``d_embed``, ``proj_init_std`` plus the LM keys ``tie_embeddings``,
    ``emb_dropout``, ``embed_scale``, ``positions``, ``max_len``).

    Returns ``(None, None)`` when ``adaptive_cutoffs`` is null (full softmax), after checking
    that no other adaptive key asks for something (``[]`` gives one cluster with a bias)."""
    if adaptive.get("adaptive_cutoffs") is None:
        tie_projs = adaptive.get("tie_projs")
        asks = (
            adaptive.get("div_val") not in (None, 1)
            or adaptive.get("d_embed") not in (None, body.d_model)
            or (any(tie_projs) if isinstance(tie_projs, (list, tuple)) else bool(tie_projs))
        )
        require(not asks, "adaptive_cutoffs", "div_val / d_embed / tie_projs need adaptive_cutoffs (a list; [] = one cluster)")
        return None, None
    positions = lm_kwargs.get("positions")
    if positions is None:
        positions = "none" if getattr(body, "owns_positions", False) else "learned"
    tie_projs = adaptive.get("tie_projs")
    if tie_projs is not None and not isinstance(tie_projs, bool):
        tie_projs = list(tie_projs)
    return build_adaptive(
        vocab_size,
        body.d_model,
        cutoffs=check_cutoffs(adaptive["adaptive_cutoffs"], vocab_size, field="adaptive_cutoffs"),
        div_val=adaptive.get("div_val") or 1,
        d_embed=adaptive.get("d_embed"),
        tie_weights=lm_kwargs.get("tie_embeddings", True),
        tie_projs=tie_projs,
        scale=lm_kwargs.get("embed_scale", True),
        dropout=lm_kwargs.get("emb_dropout", 0.0),
        positions=positions,
        max_len=lm_kwargs.get("max_len", 1024),
        init_std=init_std,
        proj_init_std=adaptive.get("proj_init_std") or 0.01,
    )
