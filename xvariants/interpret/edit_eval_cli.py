"""``python -m xvariants.interpret edit_eval key=value ...``: CounterFact-style tables of edits
(ROME's single-edit table, MEMIT's scaling table) on a file of CounterFact-style records.

Model:   ckpt_path=PATH (or hf_model=NAME with records=PATH)
Records:
  records=auto|PATH      auto: the CounterFact file a data=facts checkpoint recorded
  n=300                  records evaluated, spread evenly over the file
Method (as for `edit`):
  method=rome|memit|ft|none   none: the unedited model (the baseline row)
  layer=N | layers=A,B  key_step=peak|mean|N  lambda=auto|N
  stats=auto|PATH  stats_tokens=N  stats_cache=DIR|none
Tables:
  batch=1                1: each record edited alone, evaluated, weights restored (single-edit
                         table); N: groups of N records edited together (MEMIT: one batch; FT:
                         one fine-tuning run), every record of a group evaluated with all its
                         edits in place, then restored
  sequential=false       true: a group's edits applied one after another (sequential ROME)
  fluency=false          true: also the n-gram entropy of 100 sampled tokens per prompt
  out_dir=outputs/edit_eval   writes <method>[_seq][_bN].json (per record and aggregates with
                         95% CIs) and .md (the table)
Metrics: ES/PS/NS = % of rewrite / paraphrase / neighbourhood prompts where the right object
is the more probable; EM/PM/NM the mean probability differences; S the harmonic mean of ES,
PS and NS.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from xvariants.errors import UsageError
from xvariants.interpret.cli_args import as_bool, as_int, one_source, parse_options
from xvariants.interpret.edit_setup import (
    EDIT_OPTIONS,
    EditSettings,
    EditSource,
    edit_settings,
    load_edit_source,
    make_editor,
    resolve_layers,
    stats_for,
)

KNOWN = EDIT_OPTIONS | {"records", "n", "batch", "sequential", "fluency", "out_dir"}
COLUMNS = ("es", "ps", "ns", "score", "em", "pm", "nm", "fluency")


def parse(args: list[str]) -> dict[str, str]:
    """The options after ``edit_eval``; everything that needs no model is checked here."""
    opts = parse_options(args, KNOWN, "edit_eval")
    one_source(opts)
    table_options(opts)
    records = opts.get("records", "auto")
    if records == "auto" and "ckpt_path" not in opts:
        raise UsageError("records=auto reads the CounterFact file of a checkpoint; with hf_model= give records=PATH")
    if records != "auto" and not Path(records).is_file():
        raise UsageError(f"records: file not found: {records}")
    return opts


def table_options(opts: dict[str, str]) -> tuple[EditSettings, int, int, bool, bool]:
    """``(settings, n, batch, sequential, fluency)``, with the combinations that mean nothing refused."""
    settings = edit_settings(opts, allow_none=True)
    n, batch = as_int(opts, "n", 300), as_int(opts, "batch", 1)
    sequential = as_bool(opts["sequential"], "sequential") if "sequential" in opts else False
    fluency = as_bool(opts["fluency"], "fluency") if "fluency" in opts else False
    if batch > n:
        raise UsageError(f"batch={batch} is larger than n={n}: a group cannot hold more records than are evaluated")
    if sequential and (batch == 1 or settings.method == "none"):
        raise UsageError("sequential=true applies a group's edits one after another: it needs batch=N > 1 and a method")
    if settings.method == "rome" and batch > 1 and not sequential:
        raise UsageError(f"ROME edits one fact at a time: batch={batch} needs sequential=true (that many ROME edits "
                         "one after another), or method=memit for one batch")
    return settings, n, batch, sequential, fluency


# ---------------------------------------------------------------------- records
def load_records(path: str | Path) -> list[dict]:
    """A JSON list of CounterFact-style records (``requested_rewrite`` with prompt, subject,
    target_new.str and target_true.str)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"records: {path} is not JSON ({e})") from None
    shaped = isinstance(data, list) and all(isinstance(r, dict) and "requested_rewrite" in r for r in data)
    if not data or not shaped:
        raise UsageError(f"records: {path} is not a non-empty JSON list of CounterFact-style records "
                         "(each with requested_rewrite)")
    return data


def spread(records: list[dict], n: int) -> list[dict]:
    """``n`` records evenly spaced over the file (consecutive records often share a subject)."""
    if n > len(records):
        raise UsageError(f"n={n}: the records file has only {len(records)} records")
    return [records[i * len(records) // n] for i in range(n)]


def records_path(source: EditSource, spec: str) -> str:
    if spec != "auto":
        return spec
    path = source.counterfact
    if path is None:
        raise UsageError(f"records=auto: {source.ckpt_path} records no CounterFact file (it was not trained with "
                         "data=facts); give records=PATH")
    if not Path(path).is_file():
        raise UsageError(f"records=auto: the recorded CounterFact file {path} is missing; give records=PATH")
    return path


# ---------------------------------------------------------------------- the tables
def evaluate(source: EditSource, settings: EditSettings, records: list[dict], *, batch: int = 1,
             sequential: bool = False, fluency: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Edit and evaluate ``records`` (:func:`xvariants.editing.tables.run_table`); the JSON payload.

    :param quiet: no progress lines on stderr.
    """
    from xvariants.editing.tables import run_table

    editor, used, stats_info = None, {}, None
    if settings.method != "none":
        layers = resolve_layers(settings, source.model)
        stats = None
        if settings.method in ("rome", "memit"):
            stats, stats_info = stats_for(source, settings, layers)
        editor, used = make_editor(source, settings, layers, stats, sequential=sequential)
    marks = {max(1, round(len(records) * k / 10)) for k in range(1, 11)}

    def progress(done: int, total: int) -> None:
        if not quiet and done in marks:
            print(f"  {done}/{total} records", file=sys.stderr, flush=True)

    table = run_table(source.model, source.tokenizer, records, editor, batch=batch, fluency=fluency, progress=progress)
    return {
        "model": source.name, "checkpoint": source.ckpt_path, "method": settings.method, "options": used,
        "batch": batch, "sequential": sequential, "n_records": len(records), "n_evaluated": len(table.records),
        "n_edits": table.n_edits, "stats": stats_info, "seconds_per_edit": table.seconds_per_edit,
        "cpu_seconds_per_edit": table.cpu_seconds_per_edit,
        "edit_seconds": sum(table.edit_seconds), "aggregate": table.aggregate(), "skipped": table.skipped,
        "groups": table.groups, "records": [r.to_dict() for r in table.records],
    }


def stem(method: str, batch: int, sequential: bool) -> str:
    return method + ("_seq" if sequential else "") + ("" if batch == 1 else f"_b{batch}")


def cell(agg: dict, key: str) -> str:
    if key not in agg:
        return "-"
    mean, ci = agg[key]["mean"], agg[key]["ci95"]
    return f"{mean:.1f}" + ("" if ci is None or not math.isfinite(ci) else f" ± {ci:.1f}")


def markdown(payload: dict[str, Any], command: str) -> str:
    where = payload["options"].get("layer", payload["options"].get("layers", "-"))
    how = "applied one after another" if payload["sequential"] else "made at once"
    kind = "single edits, weights restored between them" if payload["batch"] == 1 else \
        f"groups of {payload['batch']} edits {how}"
    spe = payload["seconds_per_edit"]
    lines = [
        f"# Editing: {payload['model']}, {payload['method']}", "", f"`{command}`", "",
        f"{payload['n_evaluated']} of {payload['n_records']} records evaluated ({kind}); layer(s) {where}"
        + ("" if spe is None else f"; {spe:.2f} s per edit") + ".",
        "Mean ± 95% CI (1.96 std / sqrt N) over records, x100; S = harmonic mean of ES, PS, NS.", "",
        "| method | " + " | ".join(c.upper() if c != "score" else "S" for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
        f"| {payload['method']} | " + " | ".join(cell(payload["aggregate"], c) for c in COLUMNS) + " |",
    ]
    if payload["skipped"]:
        lines += ["", f"Skipped: {len(payload['skipped'])} (see the JSON for the reasons)."]
    return "\n".join(lines) + "\n"


def write_outputs(payload: dict[str, Any], out_dir: Path, name: str, command: str) -> tuple[Path, Path]:
    from xvariants.interpret.trace_cli import write_json

    jpath = write_json(out_dir / f"{name}.json", {"command": command, **payload})
    mpath = out_dir / f"{name}.md"
    mpath.write_text(markdown(payload, command), encoding="utf-8")
    return jpath, mpath


def run(opts: dict[str, str]) -> dict[str, Any]:
    settings, n, batch, sequential, fluency = table_options(opts)
    source = load_edit_source(opts)
    path = records_path(source, opts.get("records", "auto"))
    records = spread(load_records(path), n)
    payload = evaluate(source, settings, records, batch=batch, sequential=sequential, fluency=fluency)
    payload["records_file"] = path
    command = "python -m xvariants.interpret edit_eval " + " ".join(shlex.quote(f"{k}={v}") for k, v in opts.items())
    jpath, mpath = write_outputs(payload, Path(opts.get("out_dir", "outputs/edit_eval")),
                                 stem(settings.method, batch, sequential), command)
    print(markdown(payload, command))
    print(f"wrote {jpath} and {mpath}")
    return payload
