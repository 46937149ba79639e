"""What a comparison writes: the markdown table, CSV files, the RECL table, and the metrics,
tables and figures sent to loggers."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any

from xvariants.evaluation.recl import recl as compute_recl
from xvariants.loading import instantiate_group

log = logging.getLogger("xvariants")

CSV_FIELDS = [
    "model", "body", "parameters", "body_parameters", "attention_length", "x_train", "procedure", "window", "stride", "tgt_len",
    "mem_len", "clamp_len", "mean_context", "tokens", "loss", "ppl", "bpc", "bpb", "tokens_per_s", "seconds",
    "ponder_steps", "split", "unit", "note",
]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], header: str = "") -> str:
    has_bpc = any(r.get("bpc") is not None for r in rows)
    has_bpb = any(r.get("bpb") is not None for r in rows)
    has_ponder = any(r.get("ponder_steps") is not None for r in rows)
    cols = ["model", "body", "parameters (body)", "attention length", "× train", "procedure", "mean context", "ppl"]
    if has_bpc:
        cols.append("bpc")
    if has_bpb:
        cols.append("bits/byte")
    cols.append("tokens/s")
    if has_ponder:
        cols.append("ponder steps")
    lines = [header] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r["model"], r["body"], f"{r['parameters']:,} ({r['body_parameters']:,})", str(r["attention_length"]), _fmt(r.get("x_train"), 2)]
        if r.get("note"):
            cells += [r["note"], "–", "–"] + (["–"] if has_bpc else []) + (["–"] if has_bpb else []) + ["–"]
            cells += ["–"] if has_ponder else []
        else:
            cells += [r["procedure"], _fmt(r["mean_context"], 1), _fmt(r["ppl"], 3)]
            if has_bpc:
                cells.append(_fmt(r.get("bpc"), 4))
            if has_bpb:
                cells.append(_fmt(r.get("bpb"), 4))
            cells.append(f"{r['tokens_per_s']:,.0f}")
            if has_ponder:
                cells.append(_fmt(r.get("ponder_steps"), 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def run_recl(entries: list, opts: dict) -> list[dict[str, Any]]:
    """RECL of every comparison entry (its ``label`` and per-length ``results``) at each ``recl_r``."""
    losses = {}
    for e in entries:
        losses[e.label] = {a: r.nll.reshape(-1) for a, r in e.results.items()}
    rs = opts.get("recl_r") or [1.0]
    rs = rs if isinstance(rs, (list, tuple)) else [rs]
    rows = []
    for r in rs:
        res = compute_recl(losses, float(r), float(opts.get("recl_threshold") or 0.01))
        for name, x in res.items():
            rows.append({"model": name, "r": float(r), "recl": x.recl, "bounded": x.bounded, "label": x.label,
                         "gains": " ".join(f"{c}->{c2}:{g:.4f}" for c, c2, g in x.gains)})
    return rows


def recl_markdown(rows: list[dict[str, Any]], threshold: float) -> str:
    rs = sorted({r["r"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["r"]): r["label"] for r in rows}
    lines = [
        f"RECL (Dai et al. 2019 §4.3) over this group, threshold {threshold:g}; '>=' = still gaining at the longest length.",
        "",
        "| model | " + " | ".join(f"r={r:g}" for r in rs) + " |",
        "|---|" + "|".join("---" for _ in rs) + "|",
    ]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(by[(m, r)] for r in rs) + " |")
    return "\n".join(lines) + "\n"


def log_to_loggers(logger_cfg: dict | None, rows, recl_rows, figures: dict, md: str) -> None:
    if not logger_cfg:
        return
    loggers = instantiate_group(logger_cfg)
    ordered = sorted((r for r in rows if not r.get("note")), key=lambda r: r["attention_length"])
    for lg in loggers:
        for r in ordered:
            metrics = {f"compare/{r['model']}/{k}": float(r[k]) for k in ("loss", "ppl", "bpc", "bpb", "tokens_per_s")
                       if r.get(k) is not None}
            lg.log_metrics(metrics, step=int(r["attention_length"]))
        for r in recl_rows:
            lg.log_metrics({f"recl/{r['model']}/r={r['r']:g}": float(r["recl"])})
        kind = type(lg).__name__
        try:
            if kind == "TensorBoardLogger":
                exp = lg.experiment
                exp.add_text("comparison", md)
                for name, fig in figures.items():
                    if fig is not None:
                        exp.add_figure(name, fig)
            elif kind == "WandbLogger":
                cols = [c for c in CSV_FIELDS if any(r.get(c) is not None for r in rows)]
                lg.log_table(key="comparison", columns=cols, data=[[r.get(c) for c in cols] for r in rows])
                for name, fig in figures.items():
                    if fig is not None:
                        import wandb

                        lg.experiment.log({name: wandb.Image(fig)})
        except Exception as e:  # a logger's extras must not lose the results already written
            log.warning("could not log figures/tables to %s: %s", kind, e)
        lg.save()
        lg.finalize("success")
        if kind == "WandbLogger":
            lg.experiment.finish()
