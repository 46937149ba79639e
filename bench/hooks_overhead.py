"""Forward-pass cost of the hook points when no hook is attached (target: < 3%).

For each body (vanilla, universal fixed-step, universal ACT, xl) one model is built and
three ways of running its eval forward pass are timed in interleaved rounds, in one process:

* ``before``: every ``HookPoint`` is switched to a class whose ``__call__`` returns its input
  directly (no ``nn.Module`` dispatch) - what the forward cost before the hook points existed,
  up to one plain Python call per point;
* ``no_hooks``: the model as shipped, no hook attached;
* ``after_removed``: the same model after ``run_with_cache`` attached a hook to every point
  and removed them again.

Timing is built for a shared, loaded machine: the three variants run back to back, one
forward each, in an order that rotates every round (``--rounds`` rounds), so each round is a
side-by-side triple. For each forward both the wall time and the process CPU time
(``time.process_time``, one torch thread: time the process was actually computing, so other
processes' load cancels out) are taken. Reported per variant: median and minimum per forward;
overhead = median over rounds of the per-round ratio ``variant / before`` (CPU time is the
headline, wall time is listed too). Outputs are checked to be bit-identical across the three.

    python bench/hooks_overhead.py                   # default shape, ~1-2 min on 2 CPU cores
    python bench/hooks_overhead.py --width 64 --layers 2 --batch 1 --seq 32 --out bench/results/hooks_overhead_tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from xvariants.interpret.hooks import run_with_cache  # noqa: E402
from xvariants.layers.hooks import HookPoint  # noqa: E402
from xvariants.models import build_language_model  # noqa: E402

V = 256


class _Bypass(HookPoint):
    """A hook point that is not a module call any more (the pre-hook-point cost)."""

    def __call__(self, x):
        return x


def configs(width: int, layers: int) -> dict[str, dict]:
    common = {"d_model": width, "n_heads": max(1, width // 64), "dropout": 0.0}
    return {
        "vanilla": {"body": "vanilla", "n_layers": layers, "max_len": 1024, **common},
        "universal": {"body": "universal", "num_steps": layers, **common},
        "universal_act": {"body": "universal", "act": True, "max_steps": layers, **common},
        "xl": {"body": "xl", "n_layers": layers, "mem_len": 64, **common},
    }


def set_bypass(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, HookPoint):
            m.__class__ = _Bypass if on else HookPoint


def measure(steps: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One forward per variant per round, order rotating; (CPU seconds, wall seconds) per round."""
    names = list(steps)
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        if (r // len(names)) % 2:
            order = order[::-1]
        for n in order:
            c0, w0 = time.process_time(), time.perf_counter()
            steps[n]()
            cpu[n].append(time.process_time() - c0)
            wall[n].append(time.perf_counter() - w0)
    return cpu, wall


def summarize(per: dict[str, list[float]]) -> dict:
    ratio = {k: [a / b for a, b in zip(per[k], per["before"])] for k in per if k != "before"}
    return {
        "median_s": {k: statistics.median(v) for k, v in per.items()},
        "min_s": {k: min(v) for k, v in per.items()},
        "overhead_pct": {k: 100 * (statistics.median(v) - 1) for k, v in ratio.items()},
        "overhead_of_min_pct": {k: 100 * (min(per[k]) / min(per["before"]) - 1) for k in ratio},
        "ratio_quartiles": {k: statistics.quantiles(v, n=4) for k, v in ratio.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=200, help="rounds of one forward per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise on a shared machine)")
    ap.add_argument("--bodies", nargs="*", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hooks_overhead"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results = {}
    rows = []
    for name, cfg in configs(args.width, args.layers).items():
        if args.bodies and name not in args.bodies:
            continue
        torch.manual_seed(0)
        model = build_language_model(cfg, V).eval()
        x = torch.randint(0, V, (args.batch, args.seq))
        state = None
        if cfg["body"] == "xl":
            with torch.no_grad():
                state = model(torch.randint(0, V, (args.batch, 64))).state
                # the xl body reuses memory keys/values when handed back the state it just
                # returned; one throwaway call moves that cache on, so every timed call recomputes
                model(x[:, :1], state=[s.clone() for s in state])
        kw = {} if state is None else {"state": state}
        n_points = sum(isinstance(m, HookPoint) for m in model.modules())

        def fwd(bypass: bool):
            def step():
                set_bypass(model, bypass)
                try:
                    with torch.no_grad():
                        return model(x, **kw).logits
                finally:
                    set_bypass(model, False)

            return step

        with torch.no_grad():
            ref = fwd(True)()
            shipped = fwd(False)()
            run_with_cache(model, x, None, **kw)  # attach to every point, then remove
            removed = fwd(False)()
        identical = bool(torch.equal(ref, shipped) and torch.equal(ref, removed))
        assert not any(m._forward_hooks for m in model.modules() if isinstance(m, HookPoint)), "hooks left behind"
        steps = {"before": fwd(True), "no_hooks": fwd(False), "after_removed": fwd(False)}
        for s in steps.values():  # warm-up
            s()
        cpu, wall = measure(steps, args.rounds)
        res = {
            "config": cfg,
            "hook_points": n_points,
            "bit_identical": identical,
            "cpu": summarize(cpu),
            "wall": summarize(wall),
            "cpu_seconds_per_round": cpu,
            "wall_seconds_per_round": wall,
        }
        results[name] = res
        c, w = res["cpu"], res["wall"]
        rows.append([
            name, n_points,
            f"{1e3 * c['median_s']['before']:.2f}", f"{1e3 * c['median_s']['no_hooks']:.2f}",
            f"{c['overhead_pct']['no_hooks']:+.2f}%", f"{c['overhead_pct']['after_removed']:+.2f}%",
            f"{c['overhead_of_min_pct']['no_hooks']:+.2f}%",
            f"{w['overhead_pct']['no_hooks']:+.2f}%",
            "yes" if identical else "NO",
        ])
        print(f"{name}: {rows[-1]}", flush=True)
    payload = {
        "command": command_line(),
        "machine": machine_info(device),
        "shape": {"width": args.width, "layers": args.layers, "batch": args.batch, "seq": args.seq},
        "rounds": args.rounds,
        "results": results,
    }
    md = "\n".join([
        "# Hook points: forward cost with no hook attached",
        "",
        f"`{command_line()}`; width {args.width}, {args.layers} layers/steps, batch {args.batch} x {args.seq} tokens, "
        f"eval forward (no grad) incl. logits, CPU, {args.threads} torch thread(s), {args.rounds} rounds of one forward "
        "per variant in rotating order. `before` = hook points bypassed (plain Python call, no module dispatch); "
        "overhead = median over rounds of the per-round ratio to `before` (process CPU time, which other processes' "
        "load does not inflate; wall time for reference); `overhead of min` = ratio of the fastest forwards. "
        "Target: < 3%.",
        "",
        markdown_table(
            ["body", "hook points", "before ms (CPU)", "no hooks ms (CPU)", "overhead (CPU)", "after attach+remove (CPU)",
             "overhead of min (CPU)", "overhead (wall)", "bit-identical"],
            rows,
        ),
        "",
        f"Machine: {payload['machine'].get('cpu')}, load avg {payload['machine'].get('load_avg_1_5_15')}.",
    ])
    j, m = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
