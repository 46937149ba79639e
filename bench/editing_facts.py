"""Editing the known-facts models (issue 12): CounterFact-style tables of ROME, FT-L, MEMIT and
sequential ROME on ``facts_vanilla``, ``facts_universal_act`` and ``facts_xl``.

For each model (``bench/facts_models.py`` trains them into ``<runs>/<model>``), on the
CounterFact-style records its checkpoint recorded (spread evenly over the file):
1. the unedited model (``none``), single-edit ROME and FT-L over ``--n`` records, each edit
   evaluated alone with the weights restored between edits;
2. scaling (``--scaling``): MEMIT with k edits in one batch and ROME applied k times one after
   another, every record of the k evaluated with all k edits in place;
3. Universal Transformer: ROME with the key of the traced peak step and with keys averaged
   over steps (``--key-step peak mean``), one row each.
The ROME layer is the MLP's average-indirect-effect peak at the last subject token in the
causal-trace results (``--trace-results``/<model>/effects.json), else ``--layer``, else a third
of the way up; MEMIT edits that layer and the one below (``--memit-layers``). Key statistics
come from the model's own training text (``--stats-tokens``, cached); their time is reported.
Seconds per edit are wall and CPU time of the editor calls (the evaluation is not counted).

Writes ``<out>/<model>.json`` (per run: aggregates with 95% CIs, per-record metrics), a
``<out>/<model>.md`` table with the command, and merges one entry per model and run into
``<out>/summary.json`` (``n_edits``, ``es``, ``ps``, ``ns``, ``score``, ``seconds_per_edit``).

    python bench/editing_facts.py --runs /work/runs --models facts_vanilla facts_universal_act facts_xl \\
        --n 300 --scaling 1 10 100 1000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import command_line, machine_info, markdown_table  # noqa: E402

from xvariants.interpret.edit_eval_cli import evaluate, load_records, spread  # noqa: E402
from xvariants.interpret.edit_setup import edit_settings, load_edit_source, stats_for  # noqa: E402
from xvariants.interpret.trace_cli import plain  # noqa: E402

MODELS = ("facts_vanilla", "facts_universal_act", "facts_xl")
COLUMNS = ("es", "ps", "ns", "score", "em", "pm", "nm", "fluency")


def trace_layer(trace_dir: Path, model: str) -> int | None:
    """The layer (step) where restoring the MLP output at the last subject token recovers the
    answer best, averaged over the traced facts; None without trace results."""
    path = trace_dir / model / "effects.json"
    if not path.is_file():
        return None
    effects = json.loads(path.read_text())["effects"]
    row = effects["aie"]["mlp"][effects["categories"].index("last_subject")]
    values = [-math.inf if v is None else v for v in row]
    return max(range(len(values)), key=values.__getitem__)


def plan(args, n_layers: int, universal: bool, traced: int | None) -> tuple[list[tuple[str, dict, int, int, bool]], dict]:
    """``([(run name, edit options, records, batch, sequential)], layers)`` for one model."""
    layer = args.layer if args.layer is not None else traced if traced is not None else n_layers // 3
    top = max(layer, 1)
    memit = args.memit_layers or [top - 1, top]
    base = {"stats_cache": args.stats_cache, **({"stats_tokens": str(args.stats_tokens)} if args.stats_tokens else {})}
    rome = [("rome" if not universal else f"rome-{k}", {**base, "method": "rome", "layer": str(layer),
             **({"key_step": k} if universal else {})}) for k in (args.key_step if universal else [None])]
    runs = [("none", {**base, "method": "none"}, args.n, 1, False)]
    runs += [(name, opts, args.n, 1, False) for name, opts in rome]
    runs += [("ft", {**base, "method": "ft", "layer": str(layer)}, args.n, 1, False)]
    memit_opts = {**base, "method": "memit", "layers": ",".join(map(str, memit)),
                  **({"lambda": str(args.memit_lambda)} if args.memit_lambda else {})}
    for k in args.scaling:
        runs.append((f"memit@{k}", memit_opts, k, k, False))
        runs.append((f"{rome[0][0]}-seq@{k}", rome[0][1], k, k, True))
    where = {"rome_layer": layer, "rome_layer_from": "--layer" if args.layer is not None else
             "causal trace (MLP AIE peak at the last subject token)" if traced is not None else "a third of the way up",
             "memit_layers": memit}
    return runs, where


def strip(payload: dict) -> dict:
    """The payload without the NLL lists per record (the aggregates and per-record scores stay)."""
    out = dict(payload)
    out["records"] = [{k: v for k, v in r.items() if k not in ("nll", "generations")} for r in payload["records"]]
    return out


def cell(agg: dict, key: str) -> str:
    if key not in agg:
        return "-"
    ci = agg[key]["ci95"]
    return f"{agg[key]['mean']:.1f}" + ("" if ci is None or not math.isfinite(ci) else f" ± {ci:.1f}")


def write_model(out: Path, name: str, result: dict) -> None:
    rows = []
    for run, p in result["runs"].items():
        if "error" in p:
            rows.append([run, "-", *["error"] * len(COLUMNS), "-", "-"])
            continue
        spe, cpu = p["seconds_per_edit"], p["cpu_seconds_per_edit"]
        rows.append([run, p["n_edits"], *(cell(p["aggregate"], c) for c in COLUMNS),
                     "-" if spe is None else f"{spe:.2f}", "-" if cpu is None else f"{cpu:.2f}"])
    st = result.get("stats") or {}
    md = "\n".join([
        f"# Editing facts: {name}", "", f"`{result['command']}`", "",
        f"Checkpoint `{result['checkpoint']}`; ROME layer {result['layers']['rome_layer']} "
        f"({result['layers']['rome_layer_from']}), MEMIT layers {result['layers']['memit_layers']}.",
        f"Key statistics: {st.get('n_tokens', '?')} tokens of {st.get('corpus', '?')}, "
        f"{st.get('seconds', float('nan')):.1f} s ({'computed' if st.get('corpus_built') else 'cache'}).",
        "Mean ± 95% CI over records, x100; S = harmonic mean of ES, PS, NS; fluency = n-gram entropy x100 "
        "(single-edit runs with --fluency). `name@k`: k edits in place at once (MEMIT one batch, "
        "`-seq` one after another). s/edit: wall / CPU seconds of the edits alone.", "",
        markdown_table(["run", "edits", *(c.upper() if c != "score" else "S" for c in COLUMNS), "s/edit", "CPU s/edit"],
                       rows),
    ])
    (out / f"{name}.json").write_text(json.dumps(plain(result), indent=1) + "\n")
    (out / f"{name}.md").write_text(md + "\n")


def merge_summary(out: Path, name: str, result: dict) -> None:
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    for run, p in result["runs"].items():
        if "error" in p:
            continue
        agg = p["aggregate"]
        summary[f"{name}/{run}"] = plain({
            "n_edits": p["n_edits"], **{k: agg.get(k, {}).get("mean") for k in ("es", "ps", "ns", "score")},
            "seconds_per_edit": p["seconds_per_edit"], "cpu_seconds_per_edit": p["cpu_seconds_per_edit"],
            "n_records": p["n_evaluated"], "options": p["options"],
        })
    path.write_text(json.dumps(dict(sorted(summary.items())), indent=1) + "\n")


def bench_model(args, name: str, out: Path) -> dict:
    ckpt = Path(args.runs) / name / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        print(f"{name}: {ckpt} does not exist, skipped", flush=True)
        return {}
    source = load_edit_source({"ckpt_path": str(ckpt)})
    source.name = name
    from xvariants.editing.runs import edit_site, mlp_steps

    n_layers = mlp_steps(source.model)
    universal = edit_site(source.model, 0).memory.shared
    runs, where = plan(args, n_layers, universal, trace_layer(Path(args.trace_results), name))
    records = load_records(source.counterfact)
    result = {"command": command_line(), "machine": machine_info(torch.device("cpu")), "checkpoint": str(ckpt),
              "records_file": source.counterfact, "layers": where, "runs": {}}
    needed = sorted({where["rome_layer"], *where["memit_layers"]})
    settings = edit_settings({"stats_cache": args.stats_cache,
                              **({"stats_tokens": str(args.stats_tokens)} if args.stats_tokens else {})})
    _, result["stats"] = stats_for(source, settings, tuple(needed))
    print(f"{name}: statistics for layers {needed} in {result['stats']['seconds']:.1f} s "
          f"({'computed' if result['stats']['corpus_built'] else 'cache'})", flush=True)
    for run, opts, n, batch, sequential in runs:
        t0 = time.perf_counter()
        try:
            payload = evaluate(source, edit_settings(opts, allow_none=True), spread(records, n), batch=batch,
                               sequential=sequential, fluency=args.fluency and batch == 1, quiet=True)
            result["runs"][run] = strip(payload)
            agg, spe = payload["aggregate"], payload["seconds_per_edit"]
            print(f"{name}/{run}: ES {agg['es']['mean']:.1f} PS {agg['ps']['mean']:.1f} NS {agg['ns']['mean']:.1f} "
                  f"S {agg['score']['mean']:.1f}" + ("" if spe is None else f", {spe:.2f} s/edit")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing run must not lose the others
            result["runs"][run] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"{name}/{run}: failed: {type(e).__name__}: {e}", flush=True)
        write_model(out, name, result)  # after every run: a long bench keeps what it measured
    merge_summary(out, name, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/facts", help="folder holding one run per model")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--n", type=int, default=300, help="records of the single-edit tables")
    ap.add_argument("--scaling", type=int, nargs="*", default=[1, 10, 100, 1000], help="edits at once")
    ap.add_argument("--layer", type=int, default=None, help="ROME/FT layer (default: the causal-trace peak)")
    ap.add_argument("--memit-layers", type=int, nargs="+", default=None)
    ap.add_argument("--memit-lambda", type=float, default=None, help="MEMIT's λ (default: 15000 x d_mlp / 16384)")
    ap.add_argument("--key-step", nargs="+", default=["peak", "mean"], choices=["peak", "mean"],
                    help="Universal Transformer: whose keys ROME uses, one run each")
    ap.add_argument("--trace-results", default="bench/results/causal_trace")
    ap.add_argument("--stats-tokens", type=int, default=None, help="default: 100,000 or the whole training text")
    ap.add_argument("--stats-cache", default=".cache/xvariants/key_stats")
    ap.add_argument("--fluency", action=argparse.BooleanOptionalAction, default=True,
                    help="n-gram entropy of sampled text in the single-edit runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/editing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        bench_model(args, name, out)


if __name__ == "__main__":
    main()
