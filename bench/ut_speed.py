"""Speed of adaptive computation: does UT+ACT's time follow its mean ponder steps?

Bodies of equal width on the same random batch ``[B, T, D]`` (causal):

* ``act``: UT + ACT with ``max_steps`` (sparse compute: work only for running positions),
* ``act_dense``: the same model computing every position at every step it runs (reference),
* ``fixed``: fixed-step UT at ``num_steps = max_steps``,
* ``vanilla``: vanilla Transformer with ``n_layers = max_steps``.

The halting unit is set so that the mean ponder steps hit each requested target, with steps
spread over positions (random halting weights, a bias found by bisection); ``deep`` is the
default initialisation (bias -3: every position runs ``max_steps``). For each setting we
report tokens/s and the issue's target ``ACT time / fixed time <= 1.1 x mean steps / max_steps``.
Timing: interleaved rounds, median per step (``bench/common.py``); on a CPU the clock is the
process CPU time (1 thread by default), so load from other processes does not count. ``infer`` = forward under ``no_grad``; ``train`` = forward + backward +
AdamW step on ``mean(hidden^2) + ponder cost``.

    python bench/ut_speed.py
    python bench/ut_speed.py --d-model 256 --seq-len 512 --batch 8 --rounds 5
    python bench/ut_speed.py --ckpt logs/ut_shakespeare_char_act/runs/<time>/checkpoints/last.ckpt \
        --batch 32 --seq-len 64 --out bench/results/ut_speed_trained
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line, interleaved_rounds, machine_info, markdown_table, pick_device, write_results  # noqa: E402

from xvariants.models import build_body  # noqa: E402


def set_halting(body, spread: float, bias: float) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(body.halting.proj.weight.shape, generator=g) * spread / body.d_model**0.5
        body.halting.proj.weight.copy_(w)
        body.halting.proj.bias.fill_(bias)


@torch.no_grad()
def mean_steps(body, h) -> float:
    return float(body(h).aux.stats["ponder_steps_mean"])


def calibrate(body, h, target: float, spread: float) -> float:
    """Bias giving mean ponder steps ~ target (mean steps decrease with the bias)."""
    lo, hi = -8.0, 8.0
    for _ in range(20):
        mid = (lo + hi) / 2
        set_halting(body, spread, mid)
        if mean_steps(body, h) > target:
            lo = mid
        else:
            hi = mid
    set_halting(body, spread, (lo + hi) / 2)
    return (lo + hi) / 2


def make_step(body, h, mode: str):
    if mode == "infer":
        body.eval()

        def step():
            with torch.no_grad():
                return body(h).hidden

        return step
    body.train()
    opt = torch.optim.AdamW(body.parameters(), lr=1e-6)  # tiny lr: halting stays where it was set

    def step():
        opt.zero_grad(set_to_none=True)
        out = body(h)
        loss = out.hidden.float().pow(2).mean() + out.aux.total_loss()
        loss.backward()
        opt.step()
        return loss

    return step


def time_setting(mode, name, spread, act, dense, fixed, vanilla, h, args, dev) -> dict:
    """Time the four bodies on ``h`` in interleaved rounds; one result row."""
    M = act.n_steps
    clock = "cpu" if dev.type == "cpu" else "wall"
    n_mean = mean_steps(act.eval(), h)
    with torch.no_grad():
        n_max = float(act(h).aux.stats["ponder_steps_max"])
    steps = {
        "act": make_step(act, h, mode),
        "act_dense": make_step(dense, h, mode),
        "fixed": make_step(fixed, h, mode),
        "vanilla": make_step(vanilla, h, mode),
    }
    for fn in steps.values():  # warm-up
        fn()
    timed = interleaved_rounds(steps, rounds=args.rounds, steps_per_round=args.steps_per_round, device=dev)
    # process CPU time on a CPU (what the step costs, whatever else the machine runs), wall time on a GPU
    per_step = timed[clock] if "wall" in timed else timed
    med = {k: statistics.median(v) for k, v in per_step.items()}
    ratio = med["act"] / med["fixed"]
    target_ratio = 1.1 * n_mean / M
    row = {
        "mode": mode,
        "setting": name,
        "spread": spread,
        "ponder_steps_mean": round(n_mean, 3),
        "ponder_steps_max": n_max,
        "tokens_per_s": {k: round(h.shape[0] * h.shape[1] / v, 1) for k, v in med.items()},
        "act_over_fixed": round(ratio, 3),
        "act_dense_over_fixed": round(med["act_dense"] / med["fixed"], 3),
        "target_act_over_fixed": round(target_ratio, 3),
        "meets_target": ratio <= target_ratio,
    }
    print(row, flush=True)
    return row


def synthetic_rows(args, dev) -> list[dict]:
    """Random states, halting set to hit each mean, for each spread."""
    D, M = args.d_model, args.max_steps
    common = dict(d_model=D, n_heads=args.n_heads, d_ff=4 * D, dropout=0.0, causal=True)
    torch.manual_seed(0)
    h = torch.randn(args.batch, args.seq_len, D, device=dev)
    settings = [(f"mean~{t:g}", t, spread) for spread in args.spreads for t in args.targets] + [("deep (init)", None, None)]
    rows = []
    for mode in args.modes:
        fixed = build_body("universal", num_steps=M, **common).to(dev)
        vanilla = build_body("vanilla", n_layers=M, **common).to(dev)
        for name, target, spread in settings:
            act = build_body("universal", act=True, max_steps=M, **common).to(dev)
            dense = build_body("universal", act=True, max_steps=M, act_compute="dense", **common).to(dev)
            if target is not None:
                bias = calibrate(act.eval(), h, target, spread)
                set_halting(dense, spread, bias)
            dense.load_state_dict(act.state_dict())
            rows.append(time_setting(mode, name, spread, act, dense, fixed, vanilla, h, args, dev))
    return rows


def checkpoint_rows(args, dev) -> tuple[list[dict], str]:
    """A trained UT+ACT checkpoint on windows of its own validation text: real halting."""
    from xvariants.loading import build_datamodule, load_model

    model, hp = load_model(args.ckpt)
    body = model.body
    if not getattr(body, "act", False) or body.__class__.__name__ != "UniversalBody":
        raise SystemExit(f"--ckpt needs a checkpoint of body 'universal' with act=true, got {body.__class__.__name__}")
    dm = build_datamodule(dict(hp["data"]), hp.get("tokenizer_state"))
    dm.setup("validate")
    valid = torch.as_tensor(dm.tokens("valid")[: args.batch * args.seq_len].astype("int64"))
    if valid.numel() < args.batch * args.seq_len:
        raise SystemExit(f"the validation split has only {valid.numel()} tokens, fewer than --batch x --seq-len")
    model = model.to(dev).eval()
    with torch.no_grad():
        h = model.embed(valid.view(args.batch, args.seq_len).to(dev))
    cfg = dict(hp["model"])
    M = body.n_steps
    shape = dict(
        d_model=body.d_model, n_heads=body.block.attn.n_heads, d_ff=body.block.mlp.fc1.out_features,
        dropout=0.0, causal=body.causal, norm_first=body.norm_first,
    )
    dense = copy.deepcopy(body)
    dense.act_compute = "dense"
    fixed = build_body("universal", num_steps=M, **shape).to(dev)
    vanilla = build_body("vanilla", n_layers=M, **shape).to(dev)
    rows = [time_setting(mode, "trained", None, body, dense, fixed, vanilla, h, args, dev) for mode in args.modes]
    desc = (
        f"Checkpoint `{args.ckpt}` ({cfg.get('body')}, d_model={shape['d_model']}, max_steps={M}): its own halting "
        f"on the first {args.batch} x {args.seq_len} tokens of its validation split (embedded by the model)."
    )
    return rows, desc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 4.0, 6.0], help="mean ponder steps to bench")
    ap.add_argument(
        "--spreads", type=float, nargs="+", default=[4.0],
        help="std of halting weights x sqrt(d), one table block each: how varied N is across positions "
        "(0: every position halts at the same step; 4: a long tail of positions running to max_steps)",
    )
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ckpt", help="time a trained UT+ACT checkpoint's own halting on its validation text instead")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ut_speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    D, M = args.d_model, args.max_steps
    clock = "cpu" if dev.type == "cpu" else "wall"
    if args.ckpt:
        results, shape_desc = checkpoint_rows(args, dev)
    else:
        results = synthetic_rows(args, dev)
        shape_desc = (
            f"d_model={D}, heads={args.n_heads}, d_ff={4 * D}, max_steps={M} (fixed UT: {M} steps, vanilla: {M} layers), "
            f"random states; halting weights drawn with the given spread and a bias found by bisection for each mean."
        )
    headers = ["mode", "halting", "spread", "mean N", "max N", "UT+ACT tok/s", "UT+ACT dense tok/s", "UT fixed tok/s",
               "vanilla tok/s", "ACT / fixed", "target 1.1 x N/max", "met"]
    rows = [
        [r["mode"], r["setting"], "-" if r["spread"] is None else r["spread"], r["ponder_steps_mean"], int(r["ponder_steps_max"]), r["tokens_per_s"]["act"],
         r["tokens_per_s"]["act_dense"], r["tokens_per_s"]["fixed"], r["tokens_per_s"]["vanilla"], r["act_over_fixed"],
         r["target_act_over_fixed"], "yes" if r["meets_target"] else "no"]
        for r in results
    ]
    info = machine_info(dev)
    md = "\n".join(
        [
            "# Universal Transformer speed: does ACT time follow the mean ponder steps?",
            "",
            f"Command: `{command_line()}`  ",
            f"Device: {info.get('gpu') or info.get('cpu')} ({args.threads} threads), torch {info.get('torch')}. "
            f"{shape_desc} Batch {args.batch} x {args.seq_len} tokens, causal. Time per step: median over interleaved rounds of "
            f"{'process CPU time (the machine is shared)' if clock == 'cpu' else 'wall time'}; tokens/s = tokens / that time.",
            "",
            markdown_table(headers, rows),
            "",
        ]
    )
    write_results(args.out, {"meta": {"command": command_line(), "machine": info, "args": vars(args)}, "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
