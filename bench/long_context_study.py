"""Long-context study: vanilla vs Transformer-XL vs Universal Transformer (+ACT), matched
parameters and equal training budget, on Tiny Shakespeare (char) and PTB (word), each
evaluated at 1x, 2x and 4x its training attention length.

    python bench/long_context_study.py                      # train all, then compare
    python bench/long_context_study.py --corpora ptb        # one corpus
    python bench/long_context_study.py --skip-train         # reuse checkpoints in logs/study/
    python bench/long_context_study.py --smoke              # 3 steps, 4k test tokens (plumbing check)

Every model trains with ``python train.py experiment=study_<corpus>_<model>`` (one subprocess
each, ``OMP_NUM_THREADS=1``: tiny models on shared CPU cores run faster single-threaded; the
corpora run side by side with ``--parallel 2``); the comparison is ``python eval.py
compare=[...] eval.attention_lengths=[64,128,256] eval.recl=true`` into
``bench/results/study_<corpus>/``. A summary with training facts goes to
``bench/results/study_summary.md``. A model whose body or config is missing is reported, not
faked.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = {"shakespeare": "Tiny Shakespeare (char)", "ptb": "Penn Treebank (word)"}
MODELS = {"vanilla": "vanilla", "xl": "xl", "ut_act": "universal_act"}
MULTIPLIERS = (1, 2, 4)


def run(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, float]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    return rc, time.perf_counter() - t0


def study_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="offline")
    return env


def missing_reason(corpus: str, model: str) -> str | None:
    exp = ROOT / "configs" / "experiment" / f"study_{corpus}_{model}.yaml"
    if not exp.exists():
        return f"missing config {exp.relative_to(ROOT)}"
    cfg = ROOT / "configs" / "model" / f"{MODELS[model]}.yaml"
    if not cfg.exists():
        return f"missing model config {cfg.relative_to(ROOT)}"
    sys.path.insert(0, str(ROOT))
    from xvariants.models import BODIES

    body = {"vanilla": "vanilla", "xl": "xl", "ut_act": "universal"}[model]
    if body not in BODIES:
        return f"body {body!r} is not registered (xvariants/models)"
    return None


def train_one(corpus: str, model: str, args) -> dict:
    name = f"study_{corpus}_{model}"
    run_dir = ROOT / "logs" / "study" / name
    info = {"corpus": corpus, "model": model, "experiment": name, "run_dir": str(run_dir)}
    reason = missing_reason(corpus, model)
    if reason:
        info["missing"] = reason
        return info
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not args.skip_train or not ckpt.exists():
        cmd = ["nice", sys.executable, "train.py", f"experiment={name}", f"hydra.run.dir={run_dir}",
               "trainer.enable_progress_bar=false"]
        if args.smoke:
            cmd += ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=2"]
        if args.steps_scale != 1.0:
            cmd += _scaled_steps(name, args.steps_scale)
        rc, seconds = run(cmd, run_dir.parent / f"{name}.train.log", study_env(args.threads))
        info["train_seconds"] = round(seconds, 1)
        if rc != 0:
            info["missing"] = f"training failed (exit {rc}), see logs/study/{name}.train.log"
            return info
    else:
        prev = run_dir / "study_train.json"
        if prev.exists():
            info["train_seconds"] = json.loads(prev.read_text()).get("train_seconds")
    if not ckpt.exists():
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            info["missing"] = f"no checkpoint in {run_dir}/checkpoints"
            return info
        ckpt = last
    info["ckpt"] = str(ckpt)
    info.update(_train_facts(run_dir))
    (run_dir / "study_train.json").write_text(json.dumps({k: v for k, v in info.items()}, indent=2))
    return info


def _scaled_steps(name: str, scale: float) -> list[str]:
    import yaml  # hydra depends on PyYAML

    cfg = yaml.safe_load((ROOT / "configs" / "experiment" / f"{name}.yaml").read_text())
    steps = max(1, int(round(cfg["trainer"]["max_steps"] * scale)))
    return [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]


def _train_facts(run_dir: Path) -> dict:
    facts: dict = {}
    meta = run_dir / "run_meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        facts["parameters"] = m.get("parameters")
        facts["unit"] = m.get("unit")
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        import yaml

        c = yaml.safe_load(cfg.read_text())
        facts["seq_len"] = c["data"]["seq_len"]
        facts["batch_size"] = c["data"]["batch_size"]
        facts["mem_len"] = c["model"].get("mem_len", 0) if c["model"]["body"] == "xl" else 0
        facts["max_steps"] = c["trainer"]["max_steps"]
        facts["train_tokens"] = facts["seq_len"] * facts["batch_size"] * facts["max_steps"]
        facts["train_attention"] = facts["seq_len"] + facts["mem_len"]
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.exists():
        with open(metrics) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
        if rows:
            facts["val_loss"] = float(rows[-1]["val/loss"])
            facts["steps_done"] = int(rows[-1]["step"])
    return facts


def compare_corpus(corpus: str, trained: list[dict], args) -> dict:
    ok = [t for t in trained if "ckpt" in t]
    out_dir = ROOT / "bench" / "results" / f"study_{corpus}"
    res = {"corpus": corpus, "out_dir": str(out_dir), "models": [t["model"] for t in ok]}
    if not ok:
        res["error"] = "no trained model"
        return res
    attn = sorted({t.get("train_attention") for t in ok})
    cmd = ["nice", sys.executable, "eval.py", "compare=[" + ",".join(t["ckpt"] for t in ok) + "]",
           "labels=[" + ",".join(t["model"] for t in ok) + "]", f"hydra.run.dir={out_dir}",
           "eval.save_per_token=false", "eval.progress=false"]
    if len(attn) == 1 and attn[0]:
        lengths = [m * attn[0] for m in MULTIPLIERS]
        cmd += ["eval.attention_lengths=[" + ",".join(map(str, lengths)) + "]", "eval.recl=true"]
    else:  # different training lengths: multipliers per model, no RECL (needs common lengths)
        cmd += ["eval.attention_multipliers=[" + ",".join(map(str, MULTIPLIERS)) + "]"]
    if args.smoke:
        cmd += ["eval.max_tokens=4000"]
    elif args.max_tokens:
        cmd += [f"eval.max_tokens={args.max_tokens}"]
    rc, seconds = run(cmd, ROOT / "logs" / "study" / f"study_{corpus}.eval.log", study_env(args.threads))
    res["eval_seconds"] = round(seconds, 1)
    res["rc"] = rc
    if rc != 0:
        res["error"] = f"eval failed (exit {rc}), see logs/study/study_{corpus}.eval.log"
    return res


def summary(trained: dict[str, list[dict]], compared: dict[str, dict], args) -> str:
    lines = ["# Long-context study: results", ""]
    lines.append("Reproduce: `python bench/long_context_study.py` (trains the models with `python train.py "
                 "experiment=study_<corpus>_<model>`, then runs `python eval.py compare=[...]` per corpus; "
                 "`--skip-train` reuses the checkpoints in `logs/study/`). Written by "
                 f"`python bench/long_context_study.py {' '.join(sys.argv[1:])}`".rstrip() + ".")
    lines.append("")
    lines.append("## Training (equal budget per corpus)")
    lines.append("")
    lines.append("| corpus | model | experiment | parameters | segment + memory | steps | tokens | wall time (s) | val loss |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for corpus, ts in trained.items():
        for t in ts:
            if "missing" in t:
                lines.append(f"| {corpus} | {t['model']} | {t['experiment']} | – | – | – | – | – | **{t['missing']}** |")
                continue
            val = f"{t['val_loss']:.4f}" if t.get("val_loss") is not None else "–"
            lines.append(
                f"| {corpus} | {t['model']} | `{t['experiment']}` | {t.get('parameters', 0):,} | "
                f"{t.get('seq_len')} + {t.get('mem_len')} | {t.get('max_steps')} | {t.get('train_tokens', 0):,} | "
                f"{t.get('train_seconds', '–')} | {val} |"
            )
    for corpus, c in compared.items():
        lines += ["", f"## {CORPORA[corpus]}", ""]
        if c.get("error"):
            lines.append(f"**{c['error']}**")
            continue
        d = Path(c["out_dir"])
        lines.append((d / "comparison.md").read_text().strip())
        if (d / "recl.md").exists():
            lines += ["", (d / "recl.md").read_text().strip()]
        rel = d.relative_to(ROOT / "bench" / "results")
        lines += ["", f"![ppl vs attention length]({rel}/ppl_vs_attention.png)",
                  f"![loss vs position]({rel}/loss_vs_position.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--skip-train", action="store_true", help="reuse logs/study/<experiment>/checkpoints when present")
    p.add_argument("--smoke", action="store_true", help="3 training steps, 4k evaluation tokens")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every model's max_steps (equal budgets stay equal)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the test split")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    p.add_argument("--parallel", type=int, default=2, help="corpora processed side by side")
    p.add_argument("--summary-only", action="store_true",
                   help="rebuild bench/results/study_summary.md from finished runs (no training, no evaluation)")
    args = p.parse_args()
    if args.summary_only:
        trained, compared = {}, {}
        for corpus in args.corpora:
            trained[corpus] = []
            for m in args.models:
                name = f"study_{corpus}_{m}"
                f = ROOT / "logs" / "study" / name / "study_train.json"
                trained[corpus].append(json.loads(f.read_text()) if f.exists() else
                                       {"corpus": corpus, "model": m, "experiment": name, "missing": "not trained"})
            d = ROOT / "bench" / "results" / f"study_{corpus}"
            compared[corpus] = {"out_dir": str(d)} if (d / "comparison.md").exists() else {"error": "not evaluated"}
        out = ROOT / "bench" / "results" / "study_summary.md"
        out.write_text(summary(trained, compared, args))
        out.with_suffix(".json").write_text(json.dumps({"trained": trained, "compared": compared}, indent=2, default=str))
        print(f"summary: {out}")
        return

    def one_corpus(corpus: str):
        ts = [train_one(corpus, m, args) for m in args.models]
        for t in ts:
            print(f"[{corpus}] {t['model']}: " + (t.get("missing") or f"trained ({t.get('train_seconds')} s), val loss {t.get('val_loss')}"), flush=True)
        c = compare_corpus(corpus, ts, args)
        print(f"[{corpus}] comparison: " + (c.get("error") or f"{c['out_dir']} ({c['eval_seconds']} s)"), flush=True)
        return corpus, ts, c

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        done = list(pool.map(one_corpus, args.corpora))
    trained = {c: ts for c, ts, _ in done}
    compared = {c: cc for c, _, cc in done}
    out = ROOT / "bench" / "results" / ("study_summary_smoke.md" if args.smoke else "study_summary.md")
    out.write_text(summary(trained, compared, args))
    (out.with_suffix(".json")).write_text(json.dumps({"trained": trained, "compared": compared}, indent=2, default=str))
    print(f"summary: {out}")


if __name__ == "__main__":
    main()
