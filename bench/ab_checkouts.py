"""A/B speed of this checkout against another checkout of xvariants (e.g. the commit before a
refactor), measured side by side: fresh processes alternate between the two code trees for
``--rounds`` rounds, each timing the same workloads (same seed, same weights) by process CPU
time, so a machine shared with other jobs slows both alike. The ratio per workload is the
median of the per-round ratios (this / baseline, > 1 = this checkout is faster).

    git worktree add /tmp/base f47eb71
    python bench/ab_checkouts.py --baseline /tmp/base          # writes bench/results/ab_checkouts.{json,md}

Workloads (1 torch thread, fp32, CPU): training steps (forward + loss + backward + AdamW) and
no-grad forwards of the vanilla decoder, Transformer-XL with memory, the fixed-step Universal
Transformer and UT+ACT (halting weights drawn with spread 1 and a bias giving ~6 of 8 steps spread over positions,
identical in both trees because parameter init is bit-identical per seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

D, H, T, B = 128, 4, 256, 8
WORKLOADS = {
    "vanilla train": dict(body="vanilla", d_model=D, n_layers=4, n_heads=H, d_ff=4 * D, dropout=0.0),
    "xl train (mem 128)": dict(body="xl", d_model=D, n_layers=4, n_heads=H, d_ff=4 * D, mem_len=128, dropout=0.0),
    "xl eval (mem 256)": dict(body="xl", d_model=D, n_layers=4, n_heads=H, d_ff=4 * D, mem_len=256, dropout=0.0),
    "ut fixed train": dict(body="universal", d_model=D, n_heads=H, d_ff=4 * D, num_steps=8, dropout=0.0),
    "ut act train": dict(body="universal", d_model=D, n_heads=H, d_ff=4 * D, act=True, max_steps=8, dropout=0.0),
    "ut act infer": dict(body="universal", d_model=D, n_heads=H, d_ff=4 * D, act=True, max_steps=8, dropout=0.0),
    "ut_xl act train": dict(body="universal_xl", d_model=D, n_heads=H, d_ff=4 * D, act=True, max_steps=8,
                            mem_len=128, dropout=0.0),
}
#: halting bias giving 6.07 of 8 steps on average (3 to 8 by position) with these weights and input
ACT_BIAS = -1.5


def child(names: list[str], steps: int) -> dict:
    """Run inside the tree under test (its root first on sys.path): seconds of CPU per step."""
    import torch

    from xvariants.models import build_language_model

    torch.set_num_threads(1)
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = build_language_model(dict(WORKLOADS[name]), 256)
        body = model.body
        if getattr(body, "halting", None) is not None:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                body.halting.proj.weight.copy_(torch.randn(body.halting.proj.weight.shape, generator=g) / D**0.5)
                body.halting.proj.bias.fill_(ACT_BIAS)
        x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
        y = torch.roll(x, -1, 1)
        train = "train" in name
        model.train(train)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
        state = None

        def step():
            nonlocal state
            if train:
                out = model(x, targets=y, state=state)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
            else:
                with torch.no_grad():
                    out = model(x, state=state)
            state = out.state

        step()  # warm-up (and a memory for the stateful bodies)
        t0 = time.process_time()
        for _ in range(steps):
            step()
        seconds = (time.process_time() - t0) / steps
        with torch.profiler.profile() as prof:  # operators dispatched: a count no load can disturb
            step()
        out[name] = {"s": seconds, "ops": len(prof.events())}
    return out


def run_tree(root: Path, steps: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(root)!r}); sys.path.insert(1, {str(Path(__file__).parent)!r});"
            f"import ab_checkouts as ab; print(json.dumps(ab.child(list(ab.WORKLOADS), {steps})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=1200)
    if r.returncode:
        raise SystemExit(f"{root}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def git_rev(root: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    return r.stdout.strip() or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, type=Path, help="root of the other checkout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per workload per process")
    p.add_argument("--out", default=str(HERE / "bench" / "results" / "ab_checkouts"))
    args = p.parse_args()
    base = args.baseline.resolve()
    if not (base / "xvariants").is_dir():
        raise SystemExit(f"--baseline {base} is not an xvariants checkout (no xvariants/ folder)")
    from common import machine_info, pick_device, write_results

    t0 = time.time()
    per = {n: {"this": [], "base": []} for n in WORKLOADS}
    ops = {n: {} for n in WORKLOADS}
    for r in range(args.rounds):
        order = [("this", HERE), ("base", base)] if r % 2 == 0 else [("base", base), ("this", HERE)]
        for tag, root in order:
            for n, m in run_tree(root, args.steps).items():
                per[n][tag].append(m["s"])
                ops[n][tag] = m["ops"]
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows, results = [], {}
    for n, v in per.items():
        ratios = [b / t for t, b in zip(v["this"], v["base"])]
        res = {"this_s": statistics.median(v["this"]), "base_s": statistics.median(v["base"]),
               "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "raw": v,
               "ops_this": ops[n]["this"], "ops_base": ops[n]["base"]}
        results[n] = res
        rows.append(f"| {n} | {B * T / res['this_s']:,.0f} | {B * T / res['base_s']:,.0f} | "
                    f"**{res['ratio']:.3f}** ({res['ratio_min']:.2f}-{res['ratio_max']:.2f}) | "
                    f"{res['ops_this']:,} / {res['ops_base']:,} |")
    info = machine_info(pick_device("cpu"))
    this_rev, base_rev = git_rev(HERE), git_rev(base)
    cmd = "python bench/ab_checkouts.py " + " ".join(sys.argv[1:])
    md = "\n".join([
        f"# A/B: this checkout ({this_rev}) vs {base_rev}",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {info['cpu']}, 1 torch thread, torch {info['torch']}; {args.rounds} rounds alternating fresh "
        f"processes, {args.steps} timed steps per workload each; batch {B} x {T} tokens, width {D}.",
        "Tokens per CPU-second (median over rounds); ratio = median of per-round ratios, > 1 = this checkout faster.",
        "Operators = profiler events (aten operators and autograd nodes) of one step: the same count means the same",
        "kernels are dispatched, and a difference in time is then Python overhead or the machine's noise.",
        "",
        f"| workload | this ({this_rev}) tok/CPU-s | baseline ({base_rev}) tok/CPU-s | ratio (min-max) | operators per step this / baseline |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"{time.time() - t0:.0f} s in all.",
    ])
    payload = {"command": cmd, "machine": info, "this": this_rev, "baseline": base_rev, "batch": B, "seq_len": T,
               "d_model": D, "rounds": args.rounds, "steps": args.steps, "results": results}
    write_results(args.out, payload, md)
    print(md)


if __name__ == "__main__":
    main()
