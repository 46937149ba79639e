"""Figures of a comparison: perplexity vs attention length, loss vs position in the window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _metric(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The figure of merit: bits per byte when asked for, bpc for char/byte units, else ppl."""
    if any(r.get("bpb") is not None for r in rows):
        return "bpb", "bits per byte"
    if rows and all(r.get("bpc") is not None for r in rows if not r.get("note")):
        unit = next((r.get("unit") for r in rows), "char")
        return "bpc", "bits per byte" if unit == "byte" else "bits per character"
    return "ppl", "perplexity"


def plot_ppl_vs_attention(rows: list[dict[str, Any]], path: str | Path):
    """Left: the metric vs attention length per model; right: evaluation tokens/s."""
    done = [r for r in rows if not r.get("note")]
    key, label = _metric(done)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in done):
        rs = sorted((r for r in done if r["model"] == model), key=lambda r: r["attention_length"])
        xs = [r["attention_length"] for r in rs]
        name = f"{model} ({rs[0]['body']}, {rs[0]['parameters'] / 1e6:.2f}M)"
        ax.plot(xs, [r[key] for r in rs], marker="o", label=name)
        ax2.plot(xs, [r["tokens_per_s"] for r in rs], marker="o", label=name)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("attention length (tokens)")
        a.grid(True, alpha=0.3)
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs attention length")
    ax2.set_yscale("log")
    ax2.set_ylabel("evaluation tokens/s")
    ax2.set_title("evaluation speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_loss_vs_position(profile: list[dict[str, Any]], path: str | Path):
    """Mean NLL vs position of the scored token inside the attended window (tokens of
    context it saw directly), one panel per model, one line per attention length."""
    models = list(dict.fromkeys(p["model"] for p in profile))
    n = max(1, len(models))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        ps = [p for p in profile if p["model"] == model]
        for a in sorted({p["attention_length"] for p in ps}):
            pa = sorted((p for p in ps if p["attention_length"] == a), key=lambda p: p["position"])
            ax.plot([p["position"] + 1 for p in pa], [p["loss"] for p in pa], marker=".", label=f"attention {a}")
        ax.set_xscale("log", base=2)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("tokens of context attended (position in window + 1)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
