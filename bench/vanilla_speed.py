"""Training throughput and peak memory: xvariants' vanilla decoder vs x-transformers' ``Decoder``.

Both models have the same shape (width W, depth L, heads W/64, FFN 4W with GELU, pre-LN
LayerNorm, learned absolute positions, context 256, dropout 0, embeddings tied or untied
alike) and the same parameter count within 1% (asserted). A training step is forward +
cross-entropy + backward + AdamW step on a fixed random batch.

Timing: for each width both models are built in the same process, warmed up, then timed in
interleaved rounds (ours, theirs, then theirs, ours, ...); tokens/s is the median over rounds
and the ratio ours/theirs is the median of the per-round ratios, so load from other
processes on a shared machine hits both alike. Peak memory is measured in a fresh process
per (model, width) - see ``bench/common.py:PeakMemory`` for what it counts.

x-transformers settings: ``attn_flash=True`` (``F.scaled_dot_product_attention`` with
``is_causal``, as ours), ``attn_dim_head=W/H``, ``ff_mult=4`` (GELU, with biases),
``use_abs_pos_emb`` (learned, default), LayerNorm pre-norm (default), dropout 0; its loss is
``F.cross_entropy`` on ``logits.reshape(-1, V)`` (no transpose). Its attention has no
biases and its LayerNorms no bias term, ours have both: ours has ``6W`` more parameters per
layer (+``W`` final norm), well under 1%. Untied embeddings are the default here because
x-transformers' tied head multiplies the logits by ``dim ** -0.5`` (an extra ``[B, T, V]``
multiply forward and backward), which would hand ours an unearned lead; ``--tie-embeddings``
ties both.

    python bench/vanilla_speed.py                      # widths 128 256 512, compile at 128
    python bench/vanilla_speed.py --widths 128 --steps 12 --no-compile
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    MiB,
    PeakMemory,
    command_line,
    interleaved_rounds,
    machine_info,
    markdown_table,
    pick_device,
    run_probe,
    summarize,
    train_step_fn,
    warm_up,
    write_results,
)

OURS, THEIRS = "xvariants", "x-transformers"


# ---------------------------------------------------------------- models
def heads_for(width: int) -> int:
    return max(1, width // 64)


def build_ours(width: int, args) -> torch.nn.Module:
    from xvariants.models.build import build_language_model

    cfg = {
        "body": "vanilla",
        "d_model": width,
        "n_layers": args.depth,
        "n_heads": heads_for(width),
        "d_ff": 4 * width,
        "dropout": 0.0,
        "positions": "learned",
        "max_len": args.seq_len,
        "tie_embeddings": args.tie_embeddings,
    }
    return build_language_model(cfg, args.vocab)


def build_theirs(width: int, args) -> torch.nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    h = heads_for(width)
    return TransformerWrapper(
        num_tokens=args.vocab,
        max_seq_len=args.seq_len,
        tie_embedding=args.tie_embeddings,
        emb_dropout=0.0,
        attn_layers=Decoder(
            dim=width,
            depth=args.depth,
            heads=h,
            attn_dim_head=width // h,
            ff_mult=4,
            attn_flash=True,
            attn_dropout=0.0,
            ff_dropout=0.0,
        ),
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def make_step(name: str, model: torch.nn.Module, tokens, targets, args):
    """Training step of one model; when compiled, forward + loss is one ``torch.compile``'d
    function for both (the backward is compiled by AOTAutograd, the optimizer is not)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if name == OURS:
        fwd_loss = lambda x, y: model(x, y).loss  # noqa: E731
    else:
        fwd_loss = lambda x, y: F.cross_entropy(model(x).reshape(-1, args.vocab), y.reshape(-1))  # noqa: E731
    if args._compiled:
        fwd_loss = torch.compile(fwd_loss)
    return train_step_fn(model, opt, lambda: fwd_loss(tokens, targets))


def batch(args, device):
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    return tokens.to(device), targets.to(device)


BUILDERS = {OURS: build_ours, THEIRS: build_theirs}


# ---------------------------------------------------------------- memory probe (own process)
def memory_probe(args) -> None:
    name, width = args.probe[0], int(args.probe[1])
    device = pick_device(args.device)
    tokens, targets = batch(args, device)
    torch.manual_seed(0)
    with PeakMemory(device) as mem:
        model = BUILDERS[name](width, args).to(device).train()
        step = make_step(name, model, tokens, targets, args)
        for _ in range(args.probe_steps):
            step()
    print(
        '{"peak_bytes": %d, "hidden": %s, "params": %d}'
        % (mem.peak_bytes, "true" if getattr(mem, "hidden", False) else "false", count_params(model))
    )


def probe_argv(name: str, width: int, args) -> list[str]:
    argv = [
        str(Path(__file__).resolve()),
        "--probe", name, str(width),
        "--device", args.device,
        "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len),
        "--vocab", str(args.vocab),
        "--depth", str(args.depth),
        "--probe-steps", str(args.probe_steps),
        "--tie-embeddings" if args.tie_embeddings else "--no-tie-embeddings",
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


# ---------------------------------------------------------------- one width
def bench_width(width: int, args, device, compiled: bool) -> dict:
    args._compiled = compiled
    tokens, targets = batch(args, device)
    models, steps = {}, {}
    for name in (OURS, THEIRS):
        torch.manual_seed(0)
        models[name] = BUILDERS[name](width, args).to(device).train()
    n_ours, n_theirs = count_params(models[OURS]), count_params(models[THEIRS])
    rel = abs(n_ours - n_theirs) / n_theirs
    label = f"W={width}{' compiled' if compiled else ''}"
    print(f"[{label}] heads={heads_for(width)} params: ours {n_ours:,}  theirs {n_theirs:,}  (diff {100 * rel:.2f}%)", flush=True)
    assert rel < 0.01, f"parameter counts differ by {100 * rel:.2f}% (> 1%)"
    result = {"width": width, "heads": heads_for(width), "compiled": compiled, "params": {OURS: n_ours, THEIRS: n_theirs}}
    errors = {}
    for name, model in models.items():
        try:
            steps[name] = make_step(name, model, tokens, targets, args)
        except Exception as e:  # noqa: BLE001
            errors[name] = repr(e)
    # warm-up (compiles when compiled); a model that fails to compile is reported, not timed
    warm = {}
    for name in list(steps):
        try:
            t0 = time.perf_counter()
            warm_up({name: steps[name]}, args.warmup, device)
            warm[name] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            del steps[name]
    result["warmup_seconds"] = warm
    if errors:
        result["errors"] = errors
        print(f"[{label}] errors: {errors}", flush=True)
    per_round = max(1, args.steps // args.rounds)
    tokens_per_step = args.batch_size * args.seq_len
    if steps:
        times = interleaved_rounds(steps, rounds=args.rounds, steps_per_round=per_round, device=device)
        result.update(summarize(times, tokens_per_step, OURS, THEIRS))
    result["steps_per_round"] = per_round
    tps = result.get("tokens_per_s", {})
    print(
        f"[{label}] warm-up {', '.join(f'{k} {v:.1f}s' for k, v in warm.items())}; tokens/s "
        + ", ".join(f"{k} {v:,.0f}" for k, v in tps.items())
        + (
            f"; ratio ours/theirs {result['ratio_median']:.3f} (rounds {result['ratio_min']:.3f}-{result['ratio_max']:.3f})"
            f"; by CPU time {result['cpu']['ratio_median']:.3f} ({result['cpu']['ratio_min']:.3f}-{result['cpu']['ratio_max']:.3f})"
            if "ratio_median" in result
            else ""
        ),
        flush=True,
    )
    del models, steps
    gc.collect()
    return result


# ---------------------------------------------------------------- report
def fmt_ratio(r: dict) -> str:
    if "ratio_median" not in r:
        return "n/a"
    return f"**{r['ratio_median']:.3f}** ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"


def render_markdown(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]
    rows = []
    for r in payload["results"]:
        tps, cpu = r.get("tokens_per_s", {}), r.get("cpu", {}).get("tokens_per_s", {})
        mem = r.get("peak_memory_mib", {})
        failed = "failed" if THEIRS in r.get("errors", {}) else "n/a"
        rows.append(
            [
                f"{r['width']}{' (compiled)' if r['compiled'] else ''}",
                r["heads"],
                f"{r['params'][OURS]:,} / {r['params'][THEIRS]:,}",
                f"{tps[OURS]:,.0f}" if OURS in tps else "n/a",
                f"{tps[THEIRS]:,.0f}" if THEIRS in tps else failed,
                fmt_ratio(r),
                f"{cpu.get(OURS, float('nan')):,.0f} / {cpu.get(THEIRS, float('nan')):,.0f}" if cpu else "n/a",
                fmt_ratio(r.get("cpu", {})),
                f"{mem[OURS]:,.0f} / {mem[THEIRS]:,.0f}" if mem else "-",
                " / ".join(f"{r['warmup_seconds'].get(n, float('nan')):.0f}" for n in (OURS, THEIRS)) if r["compiled"] else "-",
            ]
        )
    table = markdown_table(
        [
            "width",
            "heads",
            "params ours / theirs",
            "ours tok/s",
            "x-transformers tok/s",
            "ratio ours/theirs, wall (median, round range)",
            "tok per CPU-s ours / theirs",
            "ratio ours/theirs, CPU time",
            "peak mem MiB ours / theirs",
            "compile warm-up s ours / theirs",
        ],
        rows,
    )
    errs = [f"- width {r['width']} compiled={r['compiled']}: {r['errors']}" for r in payload["results"] if r.get("errors")]
    lines = [
        "# Vanilla decoder training throughput: xvariants vs x-transformers",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), device `{m['device']}`"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch {m['torch']}, x-transformers {payload['x_transformers']}, Python {m['python']}; "
        f"load average at start {m.get('load_avg_1_5_15')}, at end {payload.get('load_avg_end')}.",
        "",
        f"Shape: depth {s['depth']}, heads W/64, d_ff 4W, context {s['seq_len']}, vocab {s['vocab']}, "
        f"{'tied' if s['tie_embeddings'] else 'untied'} embeddings, dropout 0, fp32. Batch {s['batch_size']} x {s['seq_len']} "
        f"= {s['batch_size'] * s['seq_len']} tokens/step. Step = forward + cross-entropy + backward + AdamW(lr={s['lr']}). "
        f"{s['warmup']} warm-up steps each, then {s['rounds']} interleaved rounds of {payload['results'][0]['steps_per_round']} "
        "steps each (order alternating); tokens/s = median over rounds; ratio = median of per-round ratios "
        "(min-max over rounds in parentheses). The CPU-time columns use this process's CPU seconds "
        "(`time.process_time`) instead of wall seconds: on a machine shared with other jobs they are much less "
        "sensitive to the others' load (with one thread they equal wall time on an idle machine).",
        "",
        table,
        "",
        f"Peak memory: {payload['memory_method']}; {s['probe_steps']} training steps, model built inside the window "
        "(parameters + gradients + AdamW state + activations + allocator slack).",
        "",
        "Compiled rows: forward + loss as one `torch.compile`'d function per model (default mode; backward via "
        "AOTAutograd, AdamW eager); warm-up = first steps including compilation"
        + (" with inductor's caches disabled (a cold compile)." if s["cold_compile"] else
           ", shorter when inductor's on-disk cache holds the graphs from an earlier run."),
        "",
        "x-transformers: `TransformerWrapper(num_tokens, max_seq_len=256, tie_embedding=..., attn_layers=Decoder(dim=W, "
        "depth=L, heads=W/64, attn_dim_head=64, ff_mult=4, attn_flash=True, attn_dropout=0, ff_dropout=0))`, loss "
        "`F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))`.",
    ]
    if payload.get("notes"):
        lines += ["", *[f"Note: {n}" for n in payload["notes"]]]
    if errs:
        lines += ["", "Errors:", *errs]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--steps", type=int, default=8, help="timed steps per model and width, split over --rounds")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (ratio = median over rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (compiles when compiled)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the project's BPE default)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time torch.compile'd models")
    p.add_argument("--compile-widths", type=int, nargs="+", default=[128], help="widths to time compiled (CPU compile is slow)")
    p.add_argument(
        "--cold-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="disable inductor's caches so the warm-up column is a first compile",
    )
    p.add_argument("--compile-steps", type=int, default=None, help="timed steps when compiled (default: --steps)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak memory (one process each)")
    p.add_argument("--probe-steps", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "vanilla_speed"), help="output path without suffix")
    p.add_argument("--probe", nargs=2, metavar=("MODEL", "WIDTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args._compiled = False
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return memory_probe(args)
    import x_transformers  # noqa: F401  (fail early when missing: pip install -e ".[bench]")
    from importlib.metadata import version

    device = pick_device(args.device)
    args.device = device.type
    machine = machine_info(device)
    print(f"machine: {machine}", flush=True)
    t_start = time.perf_counter()
    results = []
    for width in args.widths:
        results.append(bench_width(width, args, device, compiled=False))
    if args.compile:
        if args.cold_compile:
            import torch._inductor.config as inductor_config

            inductor_config.force_disable_caches = True
        steps = args.steps
        if args.compile_steps:
            args.steps = args.compile_steps
        for width in args.compile_widths:
            results.append(bench_width(width, args, device, compiled=True))
        args.steps = steps
    mem_method = None
    if args.memory:
        for r in results:
            if r["compiled"]:
                continue
            r["peak_memory_mib"], r["peak_memory_hidden"] = {}, {}
            for name in (OURS, THEIRS):
                probe = run_probe(probe_argv(name, r["width"], args))
                r["peak_memory_mib"][name] = probe["peak_bytes"] / MiB
                r["peak_memory_hidden"][name] = probe["hidden"]
            print(f"[W={r['width']}] peak memory MiB: {r['peak_memory_mib']}", flush=True)
        mem_method = PeakMemory(device).method
    import os

    payload = {
        "command": command_line(),
        "machine": machine,
        "x_transformers": version("x-transformers"),
        "settings": {
            k: getattr(args, k)
            for k in (
                "widths", "steps", "rounds", "warmup", "batch_size", "seq_len", "vocab", "depth", "lr",
                "tie_embeddings", "compile", "compile_widths", "compile_steps", "cold_compile", "probe_steps", "threads",
            )
        },
        "memory_method": mem_method,
        "results": results,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": time.perf_counter() - t_start,
    }
    payload["notes"] = notes(payload)
    jpath, mpath = write_results(args.out, payload, render_markdown(payload))
    print(render_markdown(payload))
    print(f"\nwrote {jpath} and {mpath} in {payload['total_seconds']:.0f}s")


def notes(payload: dict) -> list[str]:
    out = []
    for r in payload["results"]:
        if "ratio_median" in r and not r["compiled"]:
            wall, cpu = r["ratio_median"], r["cpu"]["ratio_median"]
            if min(wall, cpu) < 1.05:
                out.append(f"width {r['width']}: ratio {wall:.3f} (wall) / {cpu:.3f} (CPU time) - below the 1.05 target.")
        if any(r.get("peak_memory_hidden", {}).values()):
            out.append(f"width {r['width']}: the RSS high-water mark did not rise during the probe; memory is a lower bound.")
    return out


if __name__ == "__main__":
    main()
