"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), as the
original code (kmeng01/rome, ``experiments/causal_trace.py``) does it, on every xvariants body.

For a prompt whose subject spans tokens ``[start, end)``:

* the answer ``o`` is the clean model's argmax at the last position (a given ``answer`` the
  model does not predict raises :class:`WrongPrediction`, which batch loops count and skip);
* ``samples`` corrupted copies add Gaussian noise (``noise`` absolute, or ``"s3"`` = 3 sigma
  of the subject-token embeddings, :func:`embedding_std`) to the token embeddings of every
  subject token, the same noise in every cell (one generator seeded with ``seed``);
* per (token, layer) a cell restores the clean residual state (``resid``), or the MLP /
  attention outputs over a window of layers (``mlp`` / ``attn``, l-5..l+4 for ``window=10``);
  its score is p(o) averaged over the corrupted rows.

Universal Transformers: a step is a layer. Under ACT a position that halted before step ``n``
in the clean run never ran it (its state there is a copy), so that cell is marked n/a (``na``);
restoring a state also changes the halting of the restored rows, which ``ponder`` reports.
The batched runs are in :mod:`.patching`, the averages over facts in :mod:`.causal_effects`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.interpret.causal_effects import token_categories
from xvariants.interpret.hooks import hooks, unwrap_model
from xvariants.interpret.patching import (
    CORRUPTED,
    KIND_POINTS,
    Cell,
    Patcher,
    lm_logits,
    trace_sites,
    window_bounds,
)
from xvariants.interpret.trace_args import (
    KINDS,
    EvalMode,
    WrongPrediction,
    check_kinds,
    check_prompt,
    check_samples,
    noise_std,
)

__all__ = ["KINDS", "SEVERABLE", "SeveredResult", "TraceResult", "WrongPrediction", "embedding_std",
           "severed_trace", "trace_fact", "trace_many"]

SEVERABLE = ("none", "mlp", "attn")


@dataclass
class TraceResult:
    """One traced fact. Probabilities are of the answer token at the last position.

    :param scores: kind -> ``[T, L]`` p(o) with the cell restored (corrupted rows' mean).
    :param na: kind -> ``[T, L]`` True where the clean run never computed the restored step
        (ACT: the position had halted); all False for fixed-depth models.
    :param ponder: ACT only: ``clean`` ``[T]`` steps per position, ``corrupt`` ``[T]`` mean
        over the corrupted rows, and per kind ``[T, L, T]`` the same with each cell restored.
    :param categories: token category -> token indices (:func:`token_categories`).
    """

    tokens: torch.Tensor
    subject_range: tuple[int, int]
    answer: int
    p_clean: float
    p_corrupt: float
    noise: float
    samples: int
    window: int
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    na: dict[str, torch.Tensor] = field(default_factory=dict)
    ponder: dict[str, torch.Tensor] | None = None
    categories: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_effect(self) -> float:
        """TE = p_clean - p_corrupt."""
        return self.p_clean - self.p_corrupt

    def indirect_effect(self, kind: str = "resid") -> torch.Tensor:
        """IE ``[T, L]`` = restored score - p_corrupt (NaN where n/a)."""
        return (self.scores[kind] - self.p_corrupt).masked_fill(self.na[kind], float("nan"))

    def to_dict(self) -> dict:
        """Every number, JSON-ready (n/a scores as null)."""
        def plain(t):
            return t.tolist() if isinstance(t, torch.Tensor) else t

        return {
            "tokens": self.tokens.tolist(), "subject_range": list(self.subject_range), "answer": self.answer,
            "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "total_effect": self.total_effect,
            "noise": self.noise, "samples": self.samples, "window": self.window, "categories": self.categories,
            "scores": {k: [[None if m else s for s, m in zip(r, mr)] for r, mr in zip(v.tolist(), self.na[k].tolist())]
                       for k, v in self.scores.items()},
            "ponder": None if self.ponder is None else {k: plain(v) for k, v in self.ponder.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        """The inverse of :meth:`to_dict` (n/a scores come back as NaN with ``na`` set), so the
        per-fact files of a batch run can be averaged again, e.g. when the run was cut short."""
        scores = {k: torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)
                  for k, rows in d["scores"].items()}
        ponder = None if d.get("ponder") is None else {k: torch.tensor(v) for k, v in d["ponder"].items()}
        return cls(torch.tensor(d["tokens"]), tuple(d["subject_range"]), int(d["answer"]), float(d["p_clean"]),
                   float(d["p_corrupt"]), float(d["noise"]), int(d["samples"]), int(d["window"]),
                   scores=scores, na={k: v.isnan() for k, v in scores.items()}, ponder=ponder,
                   categories={k: list(v) for k, v in d["categories"].items()})


@dataclass
class SeveredResult:
    """Restoring the residual state at (``token``, layer l) while the MLP (``mlp``) or attention
    (``attn``) outputs at that token stay at their corrupted values at every layer;
    ``curves`` sever kind -> ``[L]`` p(o) (``none`` = nothing severed), ``na`` ``[L]``."""

    token: int
    answer: int
    p_clean: float
    p_corrupt: float
    curves: dict[str, torch.Tensor]
    na: torch.Tensor

    def to_dict(self) -> dict:
        """Every number, JSON-ready (n/a layers as null)."""
        na = self.na.tolist()
        return {"token": self.token, "answer": self.answer, "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
                "curves": {k: [None if m else p for p, m in zip(v.tolist(), na)] for k, v in self.curves.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> SeveredResult:
        """The inverse of :meth:`to_dict`."""
        curves = {k: torch.tensor([float("nan") if v is None else v for v in c], dtype=torch.float64)
                  for k, c in d["curves"].items()}
        return cls(int(d["token"]), int(d["answer"]), float(d["p_clean"]), float(d["p_corrupt"]), curves,
                   next(iter(curves.values())).isnan())


def _baseline(patcher: Patcher, answer: int | None, strict: bool, record: Sequence[str] = ()):
    base = patcher.run([CORRUPTED], record=record)
    predicted = int(base.clean.argmax())
    V = base.clean.numel()
    require(answer is None or (isinstance(answer, int) and 0 <= answer < V), "answer", f"must be a token id in [0, {V}), got {answer!r}")
    if answer is None:
        answer = predicted
    elif answer != predicted and strict:
        raise WrongPrediction(int(answer), predicted, float(base.clean[answer]))
    p_clean, p_corrupt = float(base.clean[answer]), float(base.probs[0, :, answer].mean())
    return base, int(answer), p_clean, p_corrupt


# ---------------------------------------------------------------------- the traces
def trace_fact(
    model: nn.Module,
    tokens: torch.Tensor,
    subject_range: tuple[int, int],
    *,
    noise: float | str = 3.0,
    sigma: float | None = None,
    samples: int = 10,
    window: int = 10,
    kinds: Sequence[str] | None = None,
    answer: int | None = None,
    strict: bool = True,
    seed: int = 1,
    batch_rows: int = 1024,
    fast: bool = True,
) -> TraceResult:
    """Trace one fact: every token x layer x kind.

    :param tokens: the prompt ``[T]`` (it ends right before the answer).
    :param subject_range: ``(start, end)`` subject tokens (end exclusive).
    :param noise: absolute noise std, or ``"sN"`` = N x ``sigma`` (ROME's ``s3``).
    :param sigma: embedding std from :func:`embedding_std` (for ``"sN"``).
    :param samples: corrupted rows per cell. :param window: layers per MLP/attention cell.
    :param kinds: any of ``resid``, ``mlp``, ``attn`` (None: every kind the model has).
    :param answer: expected answer token; None = the clean prediction. With ``strict`` a
        different prediction raises :class:`WrongPrediction`; otherwise p(answer) is traced.
    :param seed: noise seed. :param batch_rows: most rows per forward pass.
    :param fast: resume passes at each cell's first layer where the model can (same scores up
        to float rounding, :mod:`.resume`); False = full passes.
    """
    tokens, (start, end) = check_prompt(model, tokens, subject_range)
    require(isinstance(window, int) and window >= 1, "window", f"must be >= 1, got {window!r}")
    sites = trace_sites(model)
    kinds = check_kinds(kinds, sites)
    level = noise_std(noise, sigma)
    check_samples(samples)
    T = tokens.numel()
    with EvalMode(model):
        patcher = Patcher(model, tokens, (start, end), level, samples=samples, seed=seed, sites=sites, batch_rows=batch_rows,
                          fast=fast)
        base, answer, p_clean, p_corrupt = _baseline(patcher, answer, strict)
        cells = [Cell(t, sites.window(k, layer, window)) for k in kinds for t in range(T) for layer in range(len(sites.names[k]))]
        run = patcher.run(cells, answer=answer)
    result = TraceResult(tokens.cpu(), (start, end), answer, p_clean, p_corrupt, level, samples, window,
                         categories=token_categories((start, end), T))
    offset = 0
    for k in kinds:
        n = T * len(sites.names[k])
        result.scores[k] = run.probs[offset : offset + n, :, 0].mean(1).reshape(T, -1).cpu()
        result.na[k] = _not_run(base.clean_n_updates, k, T, len(sites.names[k]), window)
        if run.n_updates is not None:
            result.ponder = result.ponder or {"clean": base.clean_n_updates.float().cpu(),
                                              "corrupt": base.n_updates[0].float().mean(0).cpu()}
            result.ponder[k] = run.n_updates[offset : offset + n].float().mean(1).reshape(T, -1, T).cpu()
        offset += n
    return result


def _not_run(steps: torch.Tensor | None, kind: str, T: int, L: int, window: int) -> torch.Tensor:
    """``[T, L]``: no step of the cell was computed for that position in the clean run."""
    if steps is None:
        return torch.zeros(T, L, dtype=torch.bool)
    first = torch.tensor([l if kind == "resid" else window_bounds(l, window, L)[0] for l in range(L)])
    return first[None, :] >= steps.cpu().round().long()[:, None]


def severed_trace(
    model: nn.Module,
    tokens: torch.Tensor,
    subject_range: tuple[int, int],
    *,
    token: int | None = None,
    sever: Sequence[str] = SEVERABLE,
    noise: float | str = 3.0,
    sigma: float | None = None,
    samples: int = 10,
    answer: int | None = None,
    strict: bool = True,
    seed: int = 1,
    batch_rows: int = 1024,
    fast: bool = True,
) -> SeveredResult:
    """The severed experiment (ROME's ``trace_with_repatch``): per layer l restore the residual
    state at ``token`` (default: the last subject token) while the MLP or attention outputs at
    that token, at every layer, keep the values of the plain corrupted run (two passes: that
    run is recorded, then re-patched). ``sever`` picks the curves (``none``, ``mlp``, ``attn``)."""
    tokens, (start, end) = check_prompt(model, tokens, subject_range)
    sites = trace_sites(model)
    token = end - 1 if token is None else int(token)
    require(0 <= token < tokens.numel(), "token", f"{token} is outside the prompt's {tokens.numel()} tokens")
    sever = (sever,) if isinstance(sever, str) else tuple(sever)
    for s in sever:
        require(s in SEVERABLE, "sever", f"unknown kind {s!r}", SEVERABLE)
        require(s == "none" or s in sites.names, "sever", f"this model has no {KIND_POINTS.get(s, s)} points", sorted(sites.names))
    level = noise_std(noise, sigma)
    check_samples(samples)
    L = sites.n_layers
    frozen_names = [n for s in sever if s != "none" for n in sites.names[s]]
    with EvalMode(model):
        patcher = Patcher(model, tokens, (start, end), level, samples=samples, seed=seed, sites=sites, batch_rows=batch_rows,
                          fast=fast)
        base, answer, p_clean, p_corrupt = _baseline(patcher, answer, strict, frozen_names)
        # ACT: steps the corrupted run never reached have no corrupted value to keep
        frozen = {s: tuple(n for n in sites.names.get(s, ()) if n in base.recorded) for s in sever}
        cells = [Cell(token, (sites.names["resid"][layer],), frozen[s]) for s in sever for layer in range(L)]
        run = patcher.run(cells, answer=answer, frozen=base.recorded)
    probs = run.probs[:, :, 0].mean(1).reshape(len(sever), L).cpu()
    na = _not_run(base.clean_n_updates, "resid", tokens.numel(), L, 1)[token]
    return SeveredResult(token, answer, p_clean, p_corrupt, dict(zip(sever, probs)), na)


def trace_many(model: nn.Module, facts: Iterable[tuple[torch.Tensor, tuple[int, int], int | None]], **kwargs):
    """Batch mode: :func:`trace_fact` over ``(tokens, subject_range, answer)`` triples; facts
    the model gets wrong are skipped. Returns ``(results, skipped indices)``."""
    results, skipped = [], []
    for i, (tokens, subject_range, answer) in enumerate(facts):
        try:
            results.append(trace_fact(model, tokens, subject_range, answer=answer, **kwargs))
        except WrongPrediction:
            skipped.append(i)
    return results, skipped


# ---------------------------------------------------------------------- noise scale
class _Stop(Exception):
    pass


@torch.no_grad()
def embedding_std(model: nn.Module, items: Iterable[tuple[torch.Tensor, tuple[int, int]]]) -> float:
    """sigma of the token embeddings (``hook_embed``) of the subject tokens of ``items``
    (``(tokens, subject_range)`` pairs), over every element (ROME's ``collect_embedding_std``);
    ``noise="s3"`` is 3 x this. Only the embedding runs."""
    grabbed: list[torch.Tensor] = []
    span: list[tuple[int, int]] = []
    inner = unwrap_model(model)

    def grab(act, site):
        grabbed.append(act[0, span[0][0] : span[0][1]].double())
        raise _Stop

    with hooks(inner, [(trace_sites(inner).embed, grab)]):
        for tokens, subject_range in items:
            tokens, rng = check_prompt(inner, tokens, subject_range)
            span[:] = [rng]
            try:
                lm_logits(inner, tokens[None], False)
            except _Stop:
                pass
    if not grabbed:
        raise ConfigError("items", "no (tokens, subject_range) pairs given")
    return float(torch.cat(grabbed).std())
