"""Views of causal traces (:mod:`.causal_trace`, :mod:`.causal_effects`) drawn as the ROME
paper draws them, with matplotlib's Agg backend (PNG, no display needed).

* :func:`plot_fact`: one traced fact, tokens (rows; subject tokens starred) x layers
  (columns), one panel per kind in the paper's colour maps (state Purples, MLP Greens,
  attention Reds); colour = p(answer) with the cell restored, the corrupted probability as
  the floor of the scale; cells an ACT model never ran are grey and hatched.
* :func:`plot_average_heatmap` / :func:`plot_aie_lines`: the average indirect effect per
  token category x layer (``average_effects``), as heatmaps and as lines with 95% bands.
* :func:`plot_severed`: the severed experiment (restore the state at the last subject token
  with the MLP or the attention frozen at its corrupted value, or neither), bars per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xvariants.interpret.causal_effects import CATEGORIES, LABELS, AverageEffects
from xvariants.interpret.causal_trace import SeveredResult, TraceResult

CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
#: what a cell restores, in the panel titles
WHAT = {"resid": "state", "mlp": "MLP", "attn": "attention"}
#: the severed curves: colour and legend (ROME's frozen-MLP/attention figure)
SEVERED = {"none": ("#6a51a3", "no module severed"), "attn": ("#cb181d", "attention severed"),
           "mlp": ("#238b45", "MLP severed")}
NA_COLOR = "#d9d9d9"
CATEGORY_COLORS = dict(zip(CATEGORIES, ("#1f77b4", "#9467bd", "#d62728", "#ff7f0e", "#8c564b", "#2ca02c")))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # keeps an interactive backend the user chose; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(path, dpi=110)
        _pyplot().close(fig)
    return fig


def starred(labels: Sequence[str], subject_range: tuple[int, int]) -> list[str]:
    """Token labels with the subject's tokens marked ``*`` (as the paper marks them)."""
    start, end = subject_range
    return [f"{s}*" if start <= i < end else s for i, s in enumerate(labels)]


def _xlabel(kind: str, window: int, layer_word: str) -> str:
    if kind == "resid":
        return f"single restored {layer_word}"
    return f"center of interval of {window} restored {WHAT[kind]} {layer_word}s"


def _grid(ax, values: np.ndarray, na: np.ndarray, cmap: str, vmin: float, vmax: float):
    """``values`` [rows, cols] as cells at integer coordinates (row 0 on top); ``na`` cells
    hatched over the grey of masked values."""
    import matplotlib
    from matplotlib.patches import Rectangle

    colours = matplotlib.colormaps[cmap].with_extremes(bad=NA_COLOR)
    mesh = ax.pcolormesh(np.ma.masked_array(values, na | np.isnan(values)), cmap=colours, vmin=vmin, vmax=vmax)
    for r, c in zip(*np.nonzero(na)):
        ax.add_patch(Rectangle((c, r), 1, 1, fill=False, hatch="///", edgecolor="#8c8c8c", linewidth=0))
    ax.set_ylim(values.shape[0], 0)
    ticks = _layer_ticks(values.shape[1])
    ax.set_xticks(ticks + 0.5)
    ax.set_xticklabels([str(i) for i in ticks], fontsize=8)
    return mesh


def _layer_ticks(n: int) -> np.ndarray:
    """Every layer up to 16, else every 5th (SmolLM2 has 30)."""
    return np.arange(n) if n <= 16 else np.arange(0, n, 5)


def _colorbar(fig, mesh, ax, label: str):
    from matplotlib.ticker import ScalarFormatter

    bar = fig.colorbar(mesh, ax=ax, fraction=0.08, pad=0.03)
    plain = ScalarFormatter(useOffset=False)  # an offset label would sit on the panel title
    bar.ax.yaxis.set_major_formatter(plain)
    bar.ax.set_title(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def _panel_width(n_layers: int) -> float:
    return 2.2 + 0.12 * min(n_layers, 48)


def plot_fact(
    result: TraceResult,
    labels: Sequence[str],
    path: str | Path | None = None,
    *,
    answer: str | None = None,
    model_name: str | None = None,
    layer_word: str = "layer",
):
    """The paper's heatmaps of one traced fact, one panel per traced kind.

    :param result: a :func:`~xvariants.interpret.causal_trace.trace_fact` result.
    :param labels: the decoded text of each prompt token (``len == T``).
    :param path: PNG to write (the figure is closed then); None returns it open.
    :param answer: the answer's text for the title and colour bar (default: its token id).
    :param model_name: shown in the title.
    :param layer_word: ``layer``, or ``step`` for Universal Transformers.
    """
    plt = _pyplot()
    kinds = list(result.scores)
    T = result.tokens.numel()
    if len(labels) != T:
        raise ValueError(f"labels: {len(labels)} labels for {T} tokens")
    answer = answer if answer is not None else str(result.answer)
    L = max(result.scores[k].size(1) for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + len(kinds) * _panel_width(L), 1.6 + 0.3 * T),
                             squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        scores = result.scores[kind].double().numpy()
        na = result.na[kind].numpy()
        top = np.nanmax(np.where(na, np.nan, scores)) if not na.all() else result.p_clean
        vmax = max(top, result.p_corrupt + 1e-6)  # the floor is the corrupted run, as in the paper
        mesh = _grid(ax, scores, na, CMAPS[kind], result.p_corrupt, vmax)
        ax.set_title(f"Impact of restoring {WHAT[kind]}\nafter corrupted input", fontsize=9)
        ax.set_xlabel(_xlabel(kind, result.window, layer_word), fontsize=8)
        _colorbar(fig, mesh, ax, f"p({answer.strip()})")
    axes[0][0].set_yticks(np.arange(T) + 0.5)
    axes[0][0].set_yticklabels(starred(labels, result.subject_range), fontsize=8)
    head = f"{model_name}: " if model_name else ""
    fig.suptitle(f"{head}answer {answer.strip()!r}, p clean {result.p_clean:.3f}, p corrupted {result.p_corrupt:.3f}"
                 + ("; hatched: step never run" if any(result.na[k].any() for k in kinds) else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _present_rows(effects: AverageEffects, kinds: Sequence[str]) -> list[int]:
    """Categories with a sample somewhere (a corpus of one-token subjects has no middle tokens)."""
    return [i for i in range(len(CATEGORIES)) if any(int(effects.n[k][i].sum()) > 0 for k in kinds)]


def plot_average_heatmap(effects: AverageEffects, path: str | Path | None = None, *, title: str | None = None,
                         layer_word: str = "layer"):
    """Average indirect effect per token category (rows) x layer (columns), one panel per kind,
    colour from 0 up (the notebook's average heatmaps). Categories without samples are left out."""
    plt = _pyplot()
    kinds = list(effects.aie)
    rows = _present_rows(effects, kinds)
    L = max(effects.aie[k].size(1) for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.4 + len(kinds) * _panel_width(L), 1.8 + 0.35 * len(rows)),
                             squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        aie = effects.aie[kind].numpy()[rows]
        top = np.nanmax(aie) if not np.isnan(aie).all() else 0.0
        mesh = _grid(ax, aie, np.isnan(aie), CMAPS[kind], 0.0, max(top, 1e-6))
        ax.set_title(f"Average indirect effect of {WHAT[kind]}", fontsize=9)
        ax.set_xlabel(f"{layer_word}" if kind == "resid" else f"center of {layer_word} window", fontsize=8)
        _colorbar(fig, mesh, ax, "AIE")
    axes[0][0].set_yticks(np.arange(len(rows)) + 0.5)
    axes[0][0].set_yticklabels([LABELS[CATEGORIES[i]] for i in rows], fontsize=8)
    fig.suptitle(title or _average_title(effects), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _average_title(effects: AverageEffects) -> str:
    return (f"{effects.n_facts} facts: p clean {effects.p_clean:.3f}, p corrupted {effects.p_corrupt:.3f}, "
            f"ATE {effects.ate:.3f} ± {effects.ate_ci:.3f}")


def plot_aie_lines(effects: AverageEffects, path: str | Path | None = None, *, title: str | None = None,
                   layer_word: str = "layer"):
    """AIE by layer, one line per token category with its 95% band, one panel per kind."""
    plt = _pyplot()
    kinds = list(effects.aie)
    fig, axes = plt.subplots(1, len(kinds), figsize=(0.6 + 4.2 * len(kinds), 3.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        aie, ci = effects.aie[kind].numpy(), effects.ci[kind].numpy()
        x = np.arange(aie.shape[1])
        for i in _present_rows(effects, [kind]):
            c = CATEGORIES[i]
            ax.plot(x, aie[i], marker="o", markersize=3, color=CATEGORY_COLORS[c], label=LABELS[c])
            ax.fill_between(x, aie[i] - ci[i], aie[i] + ci[i], color=CATEGORY_COLORS[c], alpha=0.18, linewidth=0)
        ax.axhline(0.0, color="#999999", linewidth=0.6)
        ax.set_title(f"AIE of {WHAT[kind]} (95% CI)", fontsize=9)
        ax.set_xlabel(layer_word if kind == "resid" else f"center of {layer_word} window", fontsize=8)
        ax.set_xticks(_layer_ticks(len(x)))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("average indirect effect on p(answer)", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title or _average_title(effects), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def severed_effects(result: SeveredResult) -> dict[str, dict[str, list]]:
    """One fact's severed curves in :func:`~xvariants.interpret.causal_effects.average_severed`'s
    layout: per sever kind ``aie`` (restored p - p_corrupt; None where n/a) and no ``ci``."""
    na = result.na.tolist()
    return {k: {"aie": [None if m else p - result.p_corrupt for p, m in zip(v.tolist(), na)], "ci": None}
            for k, v in result.curves.items()}


def plot_severed(effects: dict[str, dict], path: str | Path | None = None, *, title: str | None = None,
                 layer_word: str = "layer"):
    """Bars per layer: the indirect effect of restoring the state at the last subject token
    with nothing, the attention or the MLP severed (ROME's ``causal_trace_frozen_mlp_attn``).

    :param effects: :func:`~xvariants.interpret.causal_effects.average_severed` output (with
        95% intervals drawn as error bars) or :func:`severed_effects` of one fact.
    """
    plt = _pyplot()
    kinds = [k for k in SEVERED if k in effects]
    L = len(effects[kinds[0]]["aie"])
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 2.0 + 0.35 * L * len(kinds) ** 0.5)), 3.4))
    x = np.arange(L)
    for j, kind in enumerate(kinds):
        aie = np.array([math.nan if v is None else v for v in effects[kind]["aie"]], dtype=float)
        ci = effects[kind].get("ci")
        err = None if ci is None else np.array([0.0 if v is None or math.isnan(v) else v for v in ci], dtype=float)
        colour, label = SEVERED[kind]
        ax.bar(x + (j - (len(kinds) - 1) / 2) * width, np.nan_to_num(aie), width, yerr=err, color=colour,
               label=label, capsize=2, error_kw={"linewidth": 0.7})
    ax.axhline(0.0, color="#999999", linewidth=0.6)
    ax.set_xticks(_layer_ticks(L))
    ax.set_xlabel(f"{layer_word} of the restored state (last subject token)", fontsize=8)
    ax.set_ylabel("indirect effect on p(answer)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(title or "Restoring the state with MLP or attention severed", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
