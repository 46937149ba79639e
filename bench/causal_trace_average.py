"""Average the per-fact files of a ``trace facts=...`` batch run (``<run>/facts/<id>.json``) again:
for a run that was cut short (a long SmolLM2 run on a shared CPU) or to re-plot. Writes
``effects.json``, ``summary.json`` and the plots into ``--out`` and the summary entry under
``--name`` into ``--summary`` (merged with the entries already there).

    python bench/causal_trace_average.py --run runs/smol_run --name smollm2_135m \\
        --out bench/results/causal_trace/smollm2_135m --summary bench/results/causal_trace/summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xvariants.interpret.causal_effects import average_effects, average_severed  # noqa: E402
from xvariants.interpret.causal_trace import SeveredResult, TraceResult  # noqa: E402
from xvariants.interpret.trace_views import plot_aie_lines, plot_average_heatmap, plot_severed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the batch run's out_dir (holds facts/*.json)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary", default=None)
    ap.add_argument("--layer-word", default="layer")
    ap.add_argument("--note", default=None, help="recorded in effects.json (e.g. why the run was cut short)")
    args = ap.parse_args()
    files = sorted(Path(args.run, "facts").glob("*.json"))
    if not files:
        raise SystemExit(f"{args.run}/facts holds no traced fact")
    per_fact = [json.loads(p.read_text()) for p in files]
    traces = [TraceResult.from_dict(f["trace"]) for f in per_fact]
    severed = [SeveredResult.from_dict(f["severed"]) for f in per_fact if f.get("severed")]
    effects = average_effects(traces)
    sev = average_severed(severed) if severed else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.name}: {effects.n_facts} facts, p clean {effects.p_clean:.3f}, "
             f"p corrupted {effects.p_corrupt:.3f}, ATE {effects.ate:.3f}")
    plot_average_heatmap(effects, out / "aie_heatmap.png", layer_word=args.layer_word, title=title)
    plot_aie_lines(effects, out / "aie_lines.png", layer_word=args.layer_word, title=title)
    if sev:
        plot_severed(sev, out / "severed.png", layer_word=args.layer_word,
                     title=f"{args.name}: restoring the last subject token's state, {len(severed)} facts (95% CI)")
    summary = effects.summary()
    facts = [{k: f.get(k) for k in ("known_id", "subject", "relation", "prompt", "answer")}
             | {"p_clean": f["trace"]["p_clean"], "p_corrupt": f["trace"]["p_corrupt"]} for f in per_fact]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "effects.json").write_text(json.dumps({"model": args.name, "n_traced": len(traces), "note": args.note,
                                                  "window": traces[0].window, "noise": traces[0].noise,
                                                  "samples": traces[0].samples, "effects": effects.to_dict(),
                                                  "severed": sev}, indent=2) + "\n")
    (out / "facts.json").write_text(json.dumps(facts) + "\n")
    if args.summary:
        path = Path(args.summary)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged[args.name] = summary
        path.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
