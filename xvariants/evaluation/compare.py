"""``python eval.py compare=[A,B,C] eval.attention_lengths=[...]``: several checkpoints on the
same split at several attention lengths, each with the procedure its body calls for.

Writes into the run folder: ``comparison.md`` and ``comparison.csv`` (one row per model and
attention length), ``ppl_vs_attention.png``, ``loss_vs_position.png``, ``position_profile.csv``,
``per_token.npz`` (per-token NLL, for RECL or your own analysis), ``results.json``, and with
``eval.recl=true`` ``recl.md`` / ``recl.csv``. Metrics and figures also go to the selected
loggers (``logger=tensorboard``, ``logger=wandb`` (offline by default), ``logger=many``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xvariants.config_errors import ConfigError, require
from xvariants.constants import BIT_UNITS
from xvariants.evaluation.procedures import MAX_BATCH_TOKENS, PROCEDURES, evaluate_tokens, pick_procedure
from xvariants.evaluation.report import (
    CSV_FIELDS,
    log_to_loggers,
    markdown_table,
    recl_markdown,
    run_recl,
    safe_name,
    write_csv,
)
from xvariants.evaluation.streams import EvalResult, check_attention_length, make_streams, position_profile
from xvariants.loading import CheckpointError, build_datamodule, load_model

log = logging.getLogger("xvariants")

DEFAULTS: dict[str, Any] = {
    "attention_lengths": None,
    "attention_multipliers": None,
    "procedure": "auto",
    "stride": None,
    "stride_fraction": 0.25,
    "tgt_len": None,
    "clamp_len": None,
    "same_length": None,
    "streams": 10,
    "max_batch_tokens": MAX_BATCH_TOKENS,
    "max_tokens": None,
    "bits_per_byte": False,
    "recl": False,
    "recl_r": [0.1, 0.5, 1.0],
    "recl_threshold": 0.01,
    "progress": True,
    "plots": True,
    "save_per_token": True,
}


@dataclass
class Entry:
    """One checkpoint of a comparison."""

    label: str
    path: str
    model: Any
    hparams: dict
    parameters: int
    body_parameters: int
    train_seq_len: int
    train_mem_len: int
    tokens: np.ndarray | None = None
    tokenizer: Any = None
    results: dict[int, EvalResult] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)
    n_bytes: int | None = None

    @property
    def body_name(self) -> str:
        return str(self.hparams["model"].get("body"))

    @property
    def unit(self) -> str:
        return str(self.hparams.get("unit", "token"))

    @property
    def train_attention(self) -> int:
        """Tokens a prediction could attend to in training: segment + memory."""
        return self.train_seq_len + self.train_mem_len


# --------------------------------------------------------------------------- loading
def _label_from_path(path: str) -> str:
    p = Path(path)
    parts = p.resolve().parts if p.exists() else p.parts
    # logs/<task_name>/runs/<time>/checkpoints/<file>.ckpt
    if len(parts) >= 5 and parts[-2] == "checkpoints" and parts[-4] in ("runs", "multiruns"):
        return parts[-5]
    return p.stem


def load_entries(paths: list[str], labels: list[str] | None = None) -> list[Entry]:
    """Rebuild every checkpoint's model (``weights_only`` loads; clear messages otherwise)."""
    require(isinstance(paths, (list, tuple)) and len(paths) >= 1, "compare",
            f"must be a list of checkpoint paths, e.g. compare=[a.ckpt,b.ckpt]; got {paths!r}")
    if labels is not None:
        require(isinstance(labels, (list, tuple)) and len(labels) == len(paths), "labels",
                f"must name every checkpoint of compare ({len(paths)}), got {labels!r}")
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for i, path in enumerate(paths):
        path = str(path)
        try:
            model, hp = load_model(path)
        except CheckpointError as e:
            raise CheckpointError(f"compare[{i}]: {e}") from None
        if not hp.get("data"):
            raise CheckpointError(f"compare[{i}]: {path} does not record its data config; cannot rebuild the split")
        label = str(labels[i]) if labels is not None else _label_from_path(path)
        if label in seen:
            seen[label] += 1
            label = f"{label}-{seen[label]}"
        else:
            seen[label] = 1
        body = model.body
        mem = int(getattr(body, "mem_len", 0) or 0) if getattr(body, "stateful", False) else 0
        entries.append(
            Entry(
                label=label,
                path=path,
                model=model,
                hparams=hp,
                parameters=sum(p.numel() for p in model.parameters()),
                body_parameters=sum(p.numel() for p in model.body.parameters()),
                train_seq_len=int(hp["data"].get("seq_len") or 0),
                train_mem_len=mem,
            )
        )
    return entries


def _corpus_key(data: dict) -> dict:
    corpus = dict(data.get("corpus") or {})
    corpus.pop("data_dir", None)
    return corpus


def check_comparable(entries: list[Entry], bits_per_byte: bool) -> None:
    """Same corpus always; same tokenizer unless the comparison is in bits per byte."""
    first = entries[0]
    for e in entries[1:]:
        if _corpus_key(e.hparams["data"]) != _corpus_key(first.hparams["data"]):
            raise ConfigError(
                "compare",
                f"{e.label} was trained on another corpus or split ({_corpus_key(e.hparams['data'])}) than "
                f"{first.label} ({_corpus_key(first.hparams['data'])}): their test scores are not comparable",
            )
    states = [e.hparams.get("tokenizer_state") for e in entries]
    if any(s != states[0] for s in states[1:]) and not bits_per_byte:
        desc = ", ".join(
            f"{e.label}: {(s or {}).get('name', '?')} tokenizer (vocab {e.hparams.get('vocab_size')})"
            for e, s in zip(entries, states)
        )
        raise ConfigError(
            "compare",
            f"the checkpoints use different tokenizers ({desc}); perplexities per token would not be "
            "comparable. Compare them per byte of text instead with eval.bits_per_byte=true",
        )


def load_split_tokens(entries: list[Entry], split: str, data_override: dict | None, max_tokens: int | None) -> None:
    """Token ids of ``split`` for every entry (built once per distinct tokenizer)."""
    cache: dict[str, tuple[np.ndarray, Any]] = {}
    for e in entries:
        data = dict(e.hparams["data"])
        if data_override:
            data.update(data_override)
        key = json.dumps([data, e.hparams.get("tokenizer_state")], sort_keys=True, default=str)
        if key not in cache:
            dm = build_datamodule(data, e.hparams.get("tokenizer_state"))
            dm.setup("test")
            toks = np.asarray(dm.tokens(split))
            if max_tokens is not None:
                require(isinstance(max_tokens, int) and max_tokens >= 2, "eval.max_tokens",
                        f"must be an integer >= 2 or null, got {max_tokens!r}")
                toks = toks[:max_tokens]
            cache[key] = (toks, dm.tokenizer)
        e.tokens, e.tokenizer = cache[key]


def _text_bytes(tokenizer, streams: torch.Tensor) -> int:
    """UTF-8 bytes of the text the scored targets (stream positions 1..L-1) spell."""
    total = 0
    for row in streams:
        text = tokenizer.decode(row[1:].tolist())
        total += len(text.encode("utf-8", "surrogateescape"))
    return total


# --------------------------------------------------------------------------- running
def attention_lengths_for(entry: Entry, opts: dict) -> list[int]:
    if opts.get("attention_lengths") is not None:
        lengths = opts["attention_lengths"]
        require(isinstance(lengths, (list, tuple)) and len(lengths) >= 1, "eval.attention_lengths",
                f"must be a non-empty list of integers, got {lengths!r}")
        for a in lengths:
            require(isinstance(a, int) and not isinstance(a, bool) and a >= 1, "eval.attention_lengths",
                    f"must be integers >= 1, got {a!r}")
        return sorted(set(int(a) for a in lengths))
    mults = opts.get("attention_multipliers") or [1]
    require(isinstance(mults, (list, tuple)), "eval.attention_multipliers", f"must be a list of numbers, got {mults!r}")
    for m in mults:
        require(isinstance(m, (int, float)) and m > 0, "eval.attention_multipliers", f"must be numbers > 0, got {m!r}")
    require(entry.train_attention >= 1, "eval.attention_lengths",
            f"{entry.path} records no training sequence length; give eval.attention_lengths explicitly")
    return sorted(set(max(1, int(round(m * entry.train_attention))) for m in mults))


def run_entry(entry: Entry, lengths: list[int], opts: dict, split: str) -> None:
    streams = make_streams(entry.tokens, opts["streams"], split=split)
    for a in lengths:
        check_attention_length(a, streams, split=split)
    proc = pick_procedure(entry.model, opts["procedure"])
    if opts.get("bits_per_byte"):
        entry.n_bytes = _text_bytes(entry.tokenizer, streams)
    for a in lengths:
        limit = getattr(entry.model, "max_context", None)
        if proc == "sliding" and limit is not None and a > limit:
            entry.notes[a] = f"skipped: learned positions stop at max_len={limit}"
            log.warning("%s: attention length %d %s", entry.label, a, entry.notes[a])
            print(f"{entry.label}: attention length {a} {entry.notes[a]}", flush=True)
            continue
        tgt = opts.get("tgt_len") or entry.train_seq_len or a
        res = evaluate_tokens(
            entry.model,
            streams,
            a,
            procedure=proc,
            stride=opts.get("stride"),
            stride_fraction=opts.get("stride_fraction"),
            tgt_len=tgt,
            clamp_len=opts.get("clamp_len"),
            same_length=opts.get("same_length"),
            max_batch_tokens=opts.get("max_batch_tokens") or MAX_BATCH_TOKENS,
            progress=bool(opts.get("progress")),
            desc=f"{entry.label} @{a}",
        )
        assert (res.count == 1).all(), "internal error: a target was not scored exactly once"
        entry.results[a] = res
        print(f"{entry.label} @{a}: {res.describe()}: loss {res.loss:.4f}  ppl {res.ppl:.3f}  "
              f"{res.tokens_per_s:,.0f} tok/s", flush=True)


def result_rows(entries: list[Entry], split: str) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        for a in sorted(set(e.results) | set(e.notes)):
            r = e.results.get(a)
            row: dict[str, Any] = {
                "model": e.label,
                "body": e.body_name,
                "parameters": e.parameters,
                "body_parameters": e.body_parameters,
                "attention_length": a,
                "x_train": round(a / e.train_attention, 3) if e.train_attention else None,
                "split": split,
                "unit": e.unit,
            }
            if r is None:
                row.update({"procedure": "", "note": e.notes[a]})
                rows.append(row)
                continue
            row.update(
                {
                    "procedure": r.describe(),
                    "window": r.window,
                    "stride": r.stride,
                    "tgt_len": r.tgt_len,
                    "mem_len": r.mem_len,
                    "clamp_len": r.clamp_len,
                    "mean_context": round(r.mean_context, 1),
                    "tokens": r.n_tokens,
                    "loss": r.loss,
                    "ppl": r.ppl,
                    "bpc": r.bits if e.unit in BIT_UNITS else None,
                    "bpb": (r.nll.sum() / math.log(2) / e.n_bytes) if e.n_bytes else None,
                    "tokens_per_s": r.tokens_per_s,
                    "seconds": r.seconds,
                    "ponder_steps": r.stats.get("ponder_steps_mean"),
                    "note": "",
                }
            )
            rows.append(row)
    return rows


def compare(cfg: dict, out_dir: str | Path) -> dict[str, Any]:
    """Run a comparison from the plain eval config (``compare``, ``labels``, ``split``,
    ``data``, ``eval.*``, ``logger``); returns ``{"rows", "recl", "files"}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {**DEFAULTS, **(cfg.get("eval") or {})}
    unknown = sorted(set(cfg.get("eval") or {}) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"eval.{unknown[0]}", "unknown option", sorted(DEFAULTS))
    require(opts["procedure"] in PROCEDURES, "eval.procedure", f"unknown procedure {opts['procedure']!r}", PROCEDURES)
    split = cfg.get("split", "test")
    require(split in ("valid", "test"), "split", f"unknown split {split!r}", ["valid", "test"])
    paths = cfg.get("compare")
    if paths is None and cfg.get("ckpt_path"):
        paths = [cfg["ckpt_path"]]
    if isinstance(paths, str):
        paths = [paths]
    entries = load_entries(list(paths or []), cfg.get("labels"))
    check_comparable(entries, bool(opts["bits_per_byte"]))
    load_split_tokens(entries, split, cfg.get("data"), opts.get("max_tokens"))
    plan = {e.label: attention_lengths_for(e, opts) for e in entries}
    # validate every length against the split before any long evaluation starts
    for e in entries:
        streams = make_streams(e.tokens, opts["streams"], split=split)
        for a in plan[e.label]:
            check_attention_length(a, streams, split=split)
    if opts["recl"]:
        require(opts.get("attention_lengths") is not None, "eval.recl",
                "RECL compares models at the same context lengths: give eval.attention_lengths (at least two)")
    for e in entries:
        run_entry(e, plan[e.label], opts, split)
    rows = result_rows(entries, split)
    files = []
    corpus = _corpus_key(entries[0].hparams["data"]).get("name", "?")
    ex = entries[0]
    n_streams = opts["streams"]
    stream_len = len(ex.tokens) // n_streams
    header = (
        f"Split `{split}` of `{corpus}`: {n_streams} streams × {stream_len:,} tokens, "
        f"{n_streams * (stream_len - 1):,} targets scored once each per row. "
        "Sliding window: the first window scores all its tokens, later ones their last `stride`; "
        "segments: memory = attention length − segment length. "
        "mean context = tokens each prediction attended to directly, on average.\n"
    )
    md = markdown_table(rows, header)
    (out_dir / "comparison.md").write_text(md)
    write_csv(out_dir / "comparison.csv", rows, CSV_FIELDS)
    files += ["comparison.md", "comparison.csv"]
    # per-token data and position profiles
    arrays, prof_rows = {}, []
    for e in entries:
        for a, r in e.results.items():
            arrays[f"{safe_name(e.label)}@{a}/nll"] = r.nll.astype(np.float32)
            arrays[f"{safe_name(e.label)}@{a}/position"] = r.position.astype(np.int32)
            for p in position_profile(r):
                prof_rows.append({"model": e.label, "attention_length": a, **p})
    if arrays and opts["save_per_token"]:
        np.savez_compressed(out_dir / "per_token.npz", **arrays)
        files.append("per_token.npz")
    write_csv(out_dir / "position_profile.csv", prof_rows, ["model", "attention_length", "lo", "hi", "count", "position", "loss"])
    files.append("position_profile.csv")
    recl_rows: list[dict[str, Any]] = []
    if opts["recl"]:
        recl_rows = run_recl(entries, opts)
        write_csv(out_dir / "recl.csv", recl_rows, ["model", "r", "recl", "bounded", "label", "gains"])
        (out_dir / "recl.md").write_text(recl_markdown(recl_rows, float(opts["recl_threshold"])))
        files += ["recl.csv", "recl.md"]
    figures = {}
    if opts["plots"]:
        from xvariants.evaluation.plots import plot_loss_vs_position, plot_ppl_vs_attention

        figures["ppl_vs_attention"] = plot_ppl_vs_attention(rows, out_dir / "ppl_vs_attention.png")
        figures["loss_vs_position"] = plot_loss_vs_position(prof_rows, out_dir / "loss_vs_position.png")
        files += ["ppl_vs_attention.png", "loss_vs_position.png"]
    summary = {
        "checkpoints": {e.label: e.path for e in entries},
        "options": opts,
        "split": split,
        "rows": rows,
        "recl": recl_rows,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    files.append("results.json")
    try:
        log_to_loggers(cfg.get("logger"), rows, recl_rows, figures, md)
    finally:
        if figures:
            import matplotlib.pyplot as plt

            for fig in figures.values():
                plt.close(fig)
    print(md)
    if recl_rows:
        print(recl_markdown(recl_rows, float(opts["recl_threshold"])))
    print(f"written to {out_dir}: {', '.join(files)}", flush=True)
    return {"rows": rows, "recl": recl_rows, "files": [str(out_dir / f) for f in files]}
