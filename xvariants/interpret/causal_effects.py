"""Average causal effects over many traced facts (ROME's ``notebooks/average_causal_effects``).

Per token category (the six of the paper) and layer, the average indirect effect
``AIE = mean(restored p(o) - p_corrupt)`` with a 95% interval ``1.96 * std / sqrt(n)``, and the
average total effect ``ATE = mean(p_clean - p_corrupt)``. As in the notebook, every middle
subject token and every further token of a fact is one sample of its category, a one-token
subject counts as first and last subject token, and a first subsequent token that is the
last token counts in both categories. Two choices differ from the notebook and are said
here: the effect is taken per fact before averaging (the notebook subtracts the mean
corrupted score of all facts, the same for categories with one sample per fact), and the
interval uses the std of those effects and the category's own sample count (the notebook:
the std of the raw scores over the number of facts). n/a cells (ACT steps a position never
ran) are left out, so ``n`` may differ per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xvariants.interpret.causal_trace import SeveredResult, TraceResult

CATEGORIES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
#: the paper's labels
LABELS = dict(zip(CATEGORIES, ("First subject token", "Middle subject tokens", "Last subject token",
                               "First subsequent token", "Further tokens", "Last token")))
Z95 = 1.96


def token_categories(subject_range: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """Token indices of each category for a prompt of ``n_tokens`` whose subject is
    ``[start, end)``; tokens before the subject belong to none."""
    start, end = subject_range
    last = n_tokens - 1
    return {
        "first_subject": [start],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1],
        "first_subsequent": [end] if end < n_tokens else [],
        "further": list(range(end + 1, last)),
        "last": [last],
    }


def _mean_ci(x: torch.Tensor) -> tuple[float, float, int]:
    x = x[~x.isnan()].double()
    n = x.numel()
    if n == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(Z95 * x.std(unbiased=False) / math.sqrt(n)), n


@dataclass
class AverageEffects:
    """Averages over ``n_facts`` traced facts.

    ``aie`` / ``ci`` kind -> ``[6, L]`` (rows in :data:`CATEGORIES` order; NaN where a
    category has no sample, e.g. no middle subject token), ``n`` kind -> ``[6, L]`` samples.
    """

    n_facts: int
    p_clean: float
    p_corrupt: float
    ate: float
    ate_ci: float
    aie: dict[str, torch.Tensor]
    ci: dict[str, torch.Tensor]
    n: dict[str, torch.Tensor]

    def peak(self, kind: str = "resid") -> tuple[float, str, int]:
        """``(AIE, token category, layer)`` of the largest average indirect effect."""
        a = self.aie[kind].nan_to_num(float("-inf"))
        i = int(a.argmax())
        c, layer = divmod(i, a.size(1))
        return float(a.flatten()[i]), CATEGORIES[c], layer

    def summary(self) -> dict:
        """The headline numbers (``bench/results/causal_trace/summary.json`` keys)."""
        out = {"n_facts": self.n_facts, "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "ate": self.ate}
        if "resid" in self.aie:
            out["peak_aie"], out["peak_token_category"], out["peak_layer"] = self.peak("resid")
        for kind in ("mlp", "attn"):
            if kind in self.aie:
                out[f"{kind}_peak_aie"], out[f"{kind}_peak_token_category"], out[f"{kind}_peak_layer"] = self.peak(kind)
        return out

    def to_dict(self) -> dict:
        def nan_none(t):
            return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]

        return {**self.summary(), "ate_ci": self.ate_ci, "categories": list(CATEGORIES),
                "aie": {k: nan_none(v) for k, v in self.aie.items()}, "ci": {k: nan_none(v) for k, v in self.ci.items()},
                "n": {k: v.tolist() for k, v in self.n.items()}}


def average_effects(results: Sequence[TraceResult]) -> AverageEffects:
    """AIE per token category x layer with 95% intervals, and the ATE, over ``results``."""
    if not results:
        raise ValueError("results: no traced facts to average")
    kinds = [k for k in results[0].scores if all(k in r.scores for r in results)]
    total = torch.tensor([r.p_clean - r.p_corrupt for r in results], dtype=torch.float64)
    ate, ate_ci, _ = _mean_ci(total)
    aie, ci, n = {}, {}, {}
    for kind in kinds:
        L = results[0].scores[kind].size(1)
        if any(r.scores[kind].size(1) != L for r in results):
            raise ValueError(f"results: the facts were traced with different numbers of layers for {kind!r}")
        samples: dict[str, list[torch.Tensor]] = {c: [] for c in CATEGORIES}
        for r in results:
            ie = r.indirect_effect(kind).double()
            for c, toks in r.categories.items():
                samples[c].extend(ie[t] for t in toks)
        stats = [[_mean_ci(torch.stack([s[layer] for s in samples[c]]) if samples[c] else torch.empty(0))
                  for layer in range(L)] for c in CATEGORIES]
        aie[kind], ci[kind], n[kind] = (torch.tensor([[cell[j] for cell in row] for row in stats], dtype=dt)
                                        for j, dt in enumerate((torch.float64, torch.float64, torch.long)))
    return AverageEffects(len(results), sum(r.p_clean for r in results) / len(results),
                          sum(r.p_corrupt for r in results) / len(results), ate, ate_ci, aie, ci, n)


def average_severed(results: Sequence[SeveredResult]) -> dict[str, dict[str, list[float]]]:
    """Per sever kind: ``aie`` ``[L]`` (mean restored p(o) - p_corrupt) and its 95% ``ci``."""
    if not results:
        raise ValueError("results: no severed traces to average")
    out = {}
    for kind in results[0].curves:
        ie = torch.stack([(r.curves[kind].double() - r.p_corrupt).masked_fill(r.na, float("nan")) for r in results])
        stats = [_mean_ci(ie[:, layer]) for layer in range(ie.size(1))]
        out[kind] = {"aie": [s[0] for s in stats], "ci": [s[1] for s in stats], "n": [s[2] for s in stats]}
    return out
