"""Relative Effective Context Length (Dai et al. 2019, §4.3 and App. C).

RECL is defined on a *group* of models evaluated on the same tokens at the same context
lengths. With ``l_i(c, t)`` the loss of model ``i`` on token ``t`` given context ``c``:

* baseline ``b(c, t) = min_i l_i(c, t)`` (the best model of the group at context ``c``);
* ``T`` = the ``r`` fraction of tokens with the largest baseline loss ``b(c, t)`` (hard tokens);
* relative loss ``f_i(c, c') = mean_{t in T} min(b(c, t), l_i(c', t))``;
* relative gain ``g_i(c, c') = (exp f_i(c, c) - exp f_i(c, c')) / exp f_i(c, c)``.

Starting from the shortest context, ``c' = c + Δ`` (here: the next evaluated length); while
``g_i(c, c') >= threshold`` (1% in the paper) the context is extended; RECL is the ``c`` where
it stops. If the gain never drops below the threshold, RECL is the longest evaluated context
and only a lower bound (``bounded=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xvariants.config_errors import ConfigError, require


@dataclass
class RECLResult:
    model: str
    r: float
    recl: int
    bounded: bool  # False: the gain was still above the threshold at the longest context
    gains: list[tuple[int, int, float]]  # (c, c', g_i(c, c')) along the search

    @property
    def label(self) -> str:
        return f"{self.recl}" if self.bounded else f">={self.recl}"


def relative_gain(losses: dict[str, dict[int, np.ndarray]], model: str, c: int, c2: int, r: float) -> float:
    """``g_model(c, c2)`` over the group ``losses`` (model -> context -> per-token losses)."""
    base = np.min(np.stack([np.asarray(v[c], dtype=np.float64).reshape(-1) for v in losses.values()]), axis=0)
    k = max(1, int(math.ceil(r * base.size)))
    hard = np.argpartition(base, base.size - k)[base.size - k :] if k < base.size else np.arange(base.size)
    b = base[hard]
    f_cc = b.mean()  # min(b, l_i(c)) = b since b is the minimum over the group
    l2 = np.asarray(losses[model][c2], dtype=np.float64).reshape(-1)[hard]
    f_cc2 = np.minimum(b, l2).mean()
    return float((math.exp(f_cc) - math.exp(f_cc2)) / math.exp(f_cc))


def recl(
    losses: dict[str, dict[int, np.ndarray]],
    r: float = 1.0,
    threshold: float = 0.01,
) -> dict[str, RECLResult]:
    """RECL of every model of the group at ratio ``r``.

    :param losses: model -> {context length -> per-token losses ``[N]``}; every model must be
        evaluated at the same context lengths on the same tokens.
    :param r: fraction of hardest tokens (by baseline loss) the gain is measured on, in (0, 1].
    :param threshold: the gain below which the context stops helping (paper: 0.01).
    """
    require(0 < r <= 1, "eval.recl_r", f"every r must be in (0, 1], got {r}")
    require(threshold > 0, "eval.recl_threshold", f"must be > 0, got {threshold}")
    if len(losses) < 1:
        raise ConfigError("compare", "RECL needs at least one model")
    contexts = None
    for name, per_c in losses.items():
        cs = sorted(per_c)
        if contexts is None:
            contexts = cs
        elif cs != contexts:
            raise ConfigError(
                "eval.attention_lengths",
                f"RECL compares models at the same context lengths; {name} has {cs}, others {contexts} "
                "(give eval.attention_lengths explicitly instead of eval.attention_multipliers)",
            )
    if len(contexts) < 2:
        raise ConfigError("eval.attention_lengths", f"RECL needs at least two context lengths, got {contexts}")
    sizes = {per_c[c].size for per_c in losses.values() for c in contexts}
    if len(sizes) != 1:
        raise ConfigError("compare", f"RECL needs per-token losses on the same tokens; got sizes {sorted(sizes)}")
    out = {}
    for name in losses:
        gains = []
        c = contexts[0]
        bounded = False
        for c2 in contexts[1:]:
            g = relative_gain(losses, name, c, c2, r)
            gains.append((c, c2, g))
            if g < threshold:
                bounded = True
                break
            c = c2
        out[name] = RECLResult(model=name, r=r, recl=c, bounded=bounded, gains=gains)
    return out
