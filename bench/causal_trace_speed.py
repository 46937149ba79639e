"""Seconds per fact of a full causal trace (every token x every layer x resid/mlp/attn, 10
corrupted samples, window 10) on facts-sized random models: the issue's budget is 10 s on 2 cores.
Wall time and this process's CPU time (summed over its threads) are both reported: on a shared
machine the wall time measures the other jobs too, the CPU time / threads is the idle-machine bound.

Random weights cost the same as trained ones for a fixed-depth body; under ACT the number of
steps depends on the weights, so the universal model here runs ``--max-steps`` steps at the
deep-start halting bias (the worst case). ``--ckpt`` times a trained checkpoint instead.

    python bench/causal_trace_speed.py                       # vanilla, universal ACT, xl
    python bench/causal_trace_speed.py --bodies vanilla --repeats 1 --out bench/results/causal_trace_speed
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

from xvariants.interpret.causal_trace import trace_fact  # noqa: E402
from xvariants.models import build_language_model  # noqa: E402

SHAPES = {
    "vanilla": {"body": "vanilla", "n_layers": 4},
    "universal_act": {"body": "universal", "act": True},
    "xl": {"body": "xl", "n_layers": 4, "mem_len": 32},
}


def build(name: str, args) -> torch.nn.Module:
    cfg = {"d_model": args.width, "n_heads": args.width // 32, "dropout": 0.0, **SHAPES[name]}
    if name == "universal_act":
        cfg["max_steps"] = args.max_steps
    return build_language_model(cfg, args.vocab).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bodies", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ckpt", help="time this checkpoint (load_model) instead of random models")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=4, help="universal ACT: most steps (its 'layers')")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write <out>.json / <out>.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"ckpt": _load(args.ckpt)} if args.ckpt else {name: build(name, args) for name in args.bodies}
    rows, raw = [], {}
    for name, model in models.items():
        vocab = getattr(model, "vocab_size", args.vocab)
        tokens = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
        subject = (2, 5)
        trace_fact(model, tokens, subject, samples=args.samples, batch_rows=args.batch_rows)  # warm-up
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            r = trace_fact(model, tokens, subject, samples=args.samples, batch_rows=args.batch_rows)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        n_layers = r.scores["resid"].size(1)
        cells = sum(s.numel() for s in r.scores.values())
        raw[name] = {"seconds": times, "cpu_seconds": cpu, "layers": n_layers, "cells": cells, "rows": cells * args.samples + 1}
        rows.append([name, n_layers, cells, f"{statistics.median(times):.2f}", f"{min(times):.2f}", f"{statistics.median(cpu):.2f}"])
        print(f"{name}: {statistics.median(times):.2f} s per fact, {statistics.median(cpu):.2f} s CPU "
              f"(median of {len(times)}; {cells} cells)", flush=True)
    table = markdown_table(["model", "layers/steps", "cells", "s/fact (median)", "s/fact (min)", "CPU s/fact (all threads)"], rows)
    print(table)
    if args.out:
        payload = {"command": command_line(), "machine": machine_info(torch.device("cpu")), "args": vars(args), "results": raw}
        write_results(args.out, payload, f"# Causal trace speed\n\n`{command_line()}`\n\n{table}\n")


def _load(path: str) -> torch.nn.Module:
    from xvariants.loading import load_model

    return load_model(path)[0].eval()


if __name__ == "__main__":
    main()
