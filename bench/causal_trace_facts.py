"""Causal tracing results on the three known-facts models (issue 11): where do they keep a fact?

For each model (``bench/facts_models.py`` trains them into ``<runs>/<experiment>``):
1. one prompt per fact (a training template drawn with a fixed seed), kept when the model
   predicts its object; the first ``--n-facts`` of those are traced with the batch mode of
   ``python -m xvariants.interpret trace`` (noise 3 sigma over the subjects' embeddings, 10
   samples, window 1 (``--window``: ROME's 10 of 48 layers would cover all 4 layers here), resid/MLP/attention, severed curves at the last subject token);
2. Universal Transformer: how corruption and restoration change the ponder steps (from the
   per-fact traces: steps per token category, clean vs corrupted vs restored);
3. Transformer-XL: the subject read through memory. The prompt is cut right after the subject:
   the subject ends the previous segment, the rest of the prompt is the current one;
   ``trace_memory`` corrupts the subject in the previous segment and restores one memory entry
   (layer input) at one memory position at a time.
Writes ``<out>/<model>/{summary,effects}.json`` and the plots, ``<out>/<model>/facts.json`` (the
per-fact numbers in one file), ``<out>/xl_memory.json``, and merges the entries into
``<out>/summary.json`` (one entry per model; SmolLM2's comes from causal_trace_smollm2.py).

    python bench/causal_trace_facts.py --runs runs/facts --n-facts 300 --memory-facts 100
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import command_line, machine_info  # noqa: E402

from xvariants.data.spans import encode_fact  # noqa: E402
from xvariants.data.tokenizers import tokenizer_from_dict  # noqa: E402
from xvariants.evaluation.facts import fact_accuracy, load_known_facts  # noqa: E402
from xvariants.interpret.causal_effects import CATEGORIES, _mean_ci  # noqa: E402
from xvariants.interpret.causal_memory import trace_memory  # noqa: E402
from xvariants.interpret.causal_trace import WrongPrediction, embedding_std  # noqa: E402
from xvariants.interpret.cli import main as interpret_main  # noqa: E402
from xvariants.loading import load_model  # noqa: E402

MODELS = ("facts_vanilla", "facts_universal_act", "facts_xl")


def one_prompt_per_fact(records: list[dict], seed: int) -> list[dict]:
    """A training-template prompt per (subject, relation), drawn with ``seed``."""
    by_fact: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("split") == "train":
            by_fact[(r["subject"], r["relation"])].append(r)
    rng = random.Random(seed)
    return [rng.choice(prompts) for _, prompts in sorted(by_fact.items())]


def known_subset(model, tokenizer, records: list[dict], seed: int) -> tuple[list[dict], int]:
    chosen = one_prompt_per_fact(records, seed)
    rng = random.Random(seed)
    rng.shuffle(chosen)  # subjects and relations mixed in the first n
    acc = fact_accuracy(model, tokenizer, chosen)
    return [r for r, hit in zip(chosen, acc.known) if hit], len(chosen)


def trace_model(name: str, ckpt: Path, subset: list[dict], n_facts: int, window: int, out: Path, scratch: Path,
                reuse: bool = False):
    """The CLI's batch mode over the first ``n_facts`` known prompts; returns its summary.
    ``reuse``: take the traces a previous run left in ``scratch`` (same facts file) instead."""
    scratch.mkdir(parents=True, exist_ok=True)
    facts_file = scratch / f"{name}_facts.json"
    run_dir = scratch / name
    wanted = json.dumps(subset[:n_facts])
    reusable = reuse and (run_dir / "summary.json").exists() and facts_file.exists() and facts_file.read_text() == wanted
    facts_file.write_text(wanted)
    rc = 0 if reusable else interpret_main(["trace", f"ckpt_path={ckpt}", f"facts={facts_file}", "severed=true", f"window={window}", f"name={name}",
                         f"out_dir={run_dir}"])
    if rc:
        raise SystemExit(f"tracing {name} failed (exit {rc})")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("summary.json", "effects.json", "aie_heatmap.png", "aie_lines.png", "severed.png"):
        if (run_dir / f).exists():
            shutil.copy(run_dir / f, out / f)
    per_fact = [json.loads(p.read_text()) for p in sorted((run_dir / "facts").glob("*.json"))]
    compact = [{k: f[k] for k in ("known_id", "subject", "relation", "prompt", "answer")}
               | {k: f["trace"][k] for k in ("p_clean", "p_corrupt") if k in f["trace"]}
               | {"ponder": f["trace"].get("ponder")} for f in per_fact]
    (out / "facts.json").write_text(json.dumps(compact) + "\n")
    return json.loads((run_dir / "summary.json").read_text()), per_fact


def ponder_summary(per_fact: list[dict]) -> dict | None:
    """Mean ACT steps per token category: clean, corrupted, and with the residual state at the
    last subject token restored at each step (None for fixed-depth models)."""
    rows = [f["trace"] for f in per_fact if f["trace"].get("ponder")]
    if not rows:
        return None
    out: dict = {}
    for key in ("clean", "corrupt"):
        cats = defaultdict(list)
        for t in rows:
            for c, toks in t["categories"].items():
                cats[c] += [t["ponder"][key][i] for i in toks]
        out[key] = {c: _mean_ci(torch.tensor(v, dtype=torch.float64))[:2] for c, v in cats.items() if v}
    # restored resid cells at the last subject token: steps of the last token (what the answer reads)
    restored = defaultdict(list)
    for t in rows:
        last_subject = t["categories"]["last_subject"][0]
        for layer, steps in enumerate(t["ponder"]["resid"][last_subject]):
            restored[layer].append(steps[-1])
    out["last_token_steps_when_restoring_last_subject_resid"] = {
        layer: _mean_ci(torch.tensor(v, dtype=torch.float64))[:2] for layer, v in sorted(restored.items())}
    return out


def memory_trace(ckpt: Path, subset: list[dict], n: int, out: Path) -> dict:
    """XL: the subject in the previous segment, read through memory."""
    model, hp = load_model(ckpt)
    model.eval()
    tok = tokenizer_from_dict(hp["tokenizer_state"])
    encoded = [encode_fact(tok, r["prompt"], r["subject"], r["answer"]) for r in subset]
    sigma = embedding_std(model, [(torch.as_tensor(e.ids, dtype=torch.long), e.subject) for e in encoded])
    results, wrong = [], 0
    started = time.perf_counter()
    for r, e in zip(subset, encoded):
        if len(results) == n:
            break
        ids = torch.as_tensor(e.ids, dtype=torch.long)
        end = e.subject[1]
        try:
            res = trace_memory(model, ids[:end], e.subject, ids[end:], noise="s3", sigma=sigma, samples=10,
                               answer=e.answer_id)
        except WrongPrediction:
            wrong += 1
            continue
        results.append((r, res))
    seconds = time.perf_counter() - started
    E = results[0][1].scores.size(1)
    by_cat: dict[str, list[torch.Tensor]] = defaultdict(list)
    for _, res in results:
        ie = res.indirect_effect().double()
        for c, toks in res.categories.items():
            by_cat[c] += [ie[m] for m in toks]
    aie = {c: [_mean_ci(torch.stack(v)[:, e])[:2] for e in range(E)] for c, v in by_cat.items() if v}
    p_clean = sum(res.p_clean for _, res in results) / len(results)
    p_corrupt = sum(res.p_corrupt for _, res in results) / len(results)
    best = max(((a[0], c, e) for c, rows in aie.items() for e, a in enumerate(rows)), key=lambda x: x[0])
    payload = {"n_facts": len(results), "skipped_wrong": wrong, "sigma": sigma, "noise": "s3", "samples": 10,
               "p_clean": p_clean, "p_corrupt": p_corrupt, "ate": p_clean - p_corrupt,
               "entries": "memory entry e = the input of layer e (0 = embedding, last = output of the last layer)",
               "aie_by_category_and_entry": {c: {"aie": [a for a, _ in rows], "ci": [ci for _, ci in rows]}
                                             for c, rows in aie.items()},
               "peak_aie": best[0], "peak_token_category": best[1], "peak_entry": best[2],
               "seconds_per_fact": seconds / max(1, len(results) + wrong)}
    (out / "xl_memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/facts")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--n-facts", type=int, default=300)
    ap.add_argument("--memory-facts", type=int, default=100)
    ap.add_argument("--window", type=int, default=1,
                    help="layers per MLP/attention cell: ROME's 10 of GPT-2 XL's 48 would restore all 4 layers here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the traces a previous run left in --scratch")
    ap.add_argument("--scratch", default="runs/causal_trace_scratch", help="per-fact files (not committed)")
    ap.add_argument("--out", default="bench/results/causal_trace")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    extra_path = out / "facts_models_extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    for name in args.models:
        ckpt = Path(args.runs) / name / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt} does not exist; train it first (python bench/facts_models.py --train)")
        model, hp = load_model(ckpt)
        tok = tokenizer_from_dict(hp["tokenizer_state"])
        records = load_known_facts(hp["data_meta"]["facts_files"]["known_facts"])
        subset, n_chosen = known_subset(model.eval(), tok, records, args.seed)
        if len(subset) < args.n_facts:
            print(f"{name}: only {len(subset)} of {n_chosen} facts known; tracing them all", file=sys.stderr)
        started = time.perf_counter()
        entry, per_fact = trace_model(name, ckpt, subset, args.n_facts, args.window, out / name,
                                      Path(args.scratch), args.reuse)
        seconds = time.perf_counter() - started
        if args.reuse and seconds < 0.01 * entry["n_facts"]:  # reused traces: their time is not measured here
            seconds = None
        summary[name] = entry
        extra[name] = {"command": command_line(), "machine": machine_info(torch.device("cpu")),
                       "known_of_chosen": [len(subset), n_chosen], "trace_seconds": seconds,
                       "seconds_per_fact": None if seconds is None else seconds / max(1, entry["n_facts"]), "ponder": ponder_summary(per_fact)}
        if name == "facts_xl":
            extra[name]["memory"] = memory_trace(ckpt, subset, args.memory_facts, out)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        extra_path.write_text(json.dumps(extra, indent=2) + "\n")
        print(f"{name}: {json.dumps(entry)}")


if __name__ == "__main__":
    main()
