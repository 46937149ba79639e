"""Train the three known-facts models (issue 11) and measure their fact accuracy.

``facts_vanilla``, ``facts_universal_act`` and ``facts_xl`` (configs/experiment/) learn the same
1,200 facts at matched size. A fact is known when the greedy next token after its prompt is
its object (``xvariants.evaluation.facts``). Accuracy is reported on the training templates
(written into the corpus; target >= 95%) and on the held-out paraphrase templates (never
seen; target >= 70%), with 95% Wilson intervals, plus the wall time of training.

    python bench/facts_models.py --train --runs runs/facts   # train all three, then evaluate
    python bench/facts_models.py --runs runs/facts           # evaluate existing runs
Each run lives in ``<runs>/<experiment>`` (checkpoints/last.ckpt); the causal-tracing and
editing benches read the checkpoints from there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from xvariants.data.tokenizers import tokenizer_from_dict  # noqa: E402
from xvariants.evaluation.facts import fact_accuracy, load_known_facts  # noqa: E402
from xvariants.loading import load_model  # noqa: E402

EXPERIMENTS = ("facts_vanilla", "facts_universal_act", "facts_xl")


def train(name: str, run_dir: Path, overrides: list[str]) -> float:
    """Train one experiment into ``run_dir`` with train.py; wall seconds."""
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={name}", f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"training {name} failed (exit {rc}); see {log}")
    return time.perf_counter() - start


def evaluate(ckpt: Path) -> dict:
    model, hp = load_model(ckpt)
    tokenizer = tokenizer_from_dict(hp["tokenizer_state"])
    files = (hp.get("data_meta") or {}).get("facts_files")
    if not files:
        raise SystemExit(f"{ckpt} was not trained on the facts corpus (no data_meta.facts_files)")
    records = load_known_facts(files["known_facts"])
    start = time.perf_counter()
    acc = fact_accuracy(model.eval(), tokenizer, records)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    return {
        "checkpoint": str(ckpt),
        "known_facts": files["known_facts"],
        "parameters": n_params,
        "non_embedding_parameters": n_params - n_embed,
        "accuracy": acc.to_dict(),
        "eval_seconds": time.perf_counter() - start,
    }


def _cell(split: dict) -> str:
    lo, hi = split["ci95"]
    return f"{100 * split['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/facts", help="folder holding one run per experiment")
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    ap.add_argument("--train", action="store_true", help="train the experiments first")
    ap.add_argument("--override", nargs="*", default=[], help="extra train.py overrides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/facts_models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    results = {}
    for name in args.experiments:
        run_dir = runs / name
        seconds = train(name, run_dir, args.override) if args.train else None
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt} does not exist; train it first (--train)")
        results[name] = {**evaluate(ckpt), "train_seconds": seconds}
        acc = results[name]["accuracy"]
        print(f"{name}: train templates {acc['train']['accuracy']:.3f}, held-out {acc['heldout']['accuracy']:.3f}")

    rows = []
    for name, r in results.items():
        a = r["accuracy"]
        rows.append([name, f"{r['non_embedding_parameters']:,}", _cell(a["train"]), _cell(a["heldout"]),
                     f"{a['train']['n']} / {a['heldout']['n']}",
                     "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f}"])
    md = "\n".join([
        "# Known-facts models: fact accuracy",
        "",
        f"`{command_line()}`",
        "",
        "Greedy next token = the object; % of prompts with a 95% Wilson interval. Targets: >= 95 on",
        "training templates, >= 70 on held-out paraphrase templates.",
        "",
        markdown_table(["model", "non-embedding params", "train templates %", "held-out templates %",
                        "prompts (train / held-out)", "training min"], rows),
    ])
    payload = {"command": command_line(), "machine": machine_info(torch.device("cpu")), "results": results}
    for p in write_results(args.out, payload, md):
        print("wrote", p)


if __name__ == "__main__":
    main()
