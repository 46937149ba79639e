"""Transformer-XL speed: training throughput against vanilla, and evaluation speed with memory
against vanilla's sliding window (Dai et al. 2019, Table 9).

Models (same shape for XL and vanilla): post-LN, ReLU FFN, byte vocabulary (256), tied
embeddings. Vanilla is the framework's ``VanillaBody`` with ``norm_first=False,
activation="relu"`` and sinusoidal absolute positions, i.e. the same layer as XL minus relative
attention and memory. Training uses a CPU-size model (width 256, 4 layers, 4 heads, FFN 1024,
dropout 0.1); evaluation uses 2 layers of the paper's enwik8-large shape (width 1024, 8 heads x
128, FFN 3072: Table 9's attention lengths come from the large models' evaluation memories),
dropout 0. The speed ratio is per layer, so depth does not change it.

1. Training tokens/s (forward + cross-entropy + backward + AdamW step, batch 8):
   XL with segment ``tgt_len`` and ``mem_len = tgt_len`` (memory carried across steps) against
   vanilla at context ``tgt_len`` (same tokens per step, half the attention span) and at
   ``2 x tgt_len`` (the same attention span as XL's last query). Timed in interleaved rounds
   (A B C, C B A, ...); tokens/s is the median over rounds, ratios the median of the per-round
   ratios, so load from other processes hits every model alike.

2. Evaluation time per scored token at attention length L (128, 256, 512, 800), no grad:
   * vanilla: the paper's baseline (Al-Rfou et al. style): a window of L tokens slides one token
     at a time and only its last token is scored; 4 windows (4 consecutive positions) per forward.
   * XL: 4 streams, segments of ``--eval-tgt`` (128) tokens with ``mem_len = L`` (the paper's
     Table 9 "attention length" is the evaluation memory length), every token of a segment
     scored; the memory is filled before timing starts. XL reuses the memory's keys/values
     between segments (``XLBody.memory_kv_cache``, exact).
   * XL (klen = L): the stricter variant where the last query of a segment attends to exactly L
     keys (``mem_len = L - eval_tgt``); reported next to it.
   * XL recomputing the memory's keys/values every segment (``memory_kv_cache = False``), as
     the original code does: what the cache saves.
   Rounds alternate the models; per-token time is the median over rounds of (wall time /
   tokens scored) and the ratio is the median of per-round ratios. Only what is listed under
   ``measured`` was timed: nothing is extrapolated.

    python bench/xl_speed.py                 # about 1 minute on 2 idle CPU cores (more when loaded)
    python bench/xl_speed.py --threads 1     # steadier on a shared, loaded machine
    python bench/xl_speed.py --quick         # a smoke run (fewer rounds / tokens)
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

from xvariants.models import LanguageModel  # noqa: E402
from xvariants.models.vanilla import VanillaBody  # noqa: E402
from xvariants.models.xl import XLBody  # noqa: E402

V = 256
PAPER_TABLE9 = {3800: 1874, 2800: 1409, 1800: 773, 800: 363}


def build(kind: str, shape: dict, *, mem_len: int = 0, dropout: float = 0.1, max_len: int = 2048) -> LanguageModel:
    """``shape``: d_model, n_layers, n_heads, d_ff. Same seed: same weights for equal shapes."""
    torch.manual_seed(0)
    shape = dict(shape, dropout=dropout)
    if kind == "xl":
        body = XLBody(**shape, mem_len=mem_len, attn_dropout=0.0)
        return LanguageModel(body, V, positions="none", embed_scale=True, emb_dropout=dropout)
    body = VanillaBody(**shape, attn_dropout=0.0, norm_first=False, activation="relu")
    return LanguageModel(body, V, positions="sinusoidal", max_len=max_len, embed_scale=True, emb_dropout=dropout)


def train_shape(args) -> dict:
    return dict(d_model=args.train_width, n_layers=args.train_layers, n_heads=args.train_heads, d_ff=4 * args.train_width)


def eval_shape(args) -> dict:
    return dict(d_model=args.eval_width, n_layers=args.eval_layers, n_heads=args.eval_heads, d_ff=args.eval_ff)


def stream(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, length), generator=g)


# ------------------------------------------------------------------ training
def bench_training(args) -> dict:
    T, B = args.tgt_len, args.batch
    shape = train_shape(args)
    models = {
        f"xl (tgt {T}, mem {T})": build("xl", shape, mem_len=T),
        f"vanilla (ctx {T})": build("vanilla", shape),
        f"vanilla (ctx {2 * T})": build("vanilla", shape),
    }
    ctx = dict(zip(models, (T, T, 2 * T)))
    data = stream(B, 64 * 2 * T + 1)
    steps, tokens = {}, {}
    for name, lm in models.items():
        lm.train()
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)
        holder = {"state": None, "pos": 0}
        L = ctx[name]

        def loss_fn(lm=lm, holder=holder, L=L, xl=name.startswith("xl")):
            p = holder["pos"]
            if p + L + 1 > data.size(1):
                p, holder["state"] = 0, None
            x, y = data[:, p : p + L], data[:, p + 1 : p + L + 1]
            holder["pos"] = p + L
            out = lm(x, y, state=holder["state"] if xl else None)
            holder["state"] = out.state
            return out.loss

        def step(lm=lm, opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()

        steps[name] = step
        tokens[name] = B * L
    for fn in steps.values():  # warm-up (and fill XL's memory)
        for _ in range(args.train_warmup):
            fn()
    rounds = interleave(steps, args.train_rounds, args.train_steps)
    xl_name = next(iter(models))
    result = {"seconds_per_step_per_round": rounds}
    for clock in ("wall", "cpu"):
        tps = {n: [tokens[n] * args.train_steps / t for t in v] for n, v in rounds[clock].items()}
        res = {"tokens_per_s": {n: statistics.median(v) for n, v in tps.items()}, "ratios": {}}
        for n in models:
            if n != xl_name:
                r = [a / b for a, b in zip(tps[xl_name], tps[n])]
                res["ratios"][f"{xl_name} / {n}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
        result[clock] = res
    result["measured"] = {
        n: f"{args.train_rounds} rounds x {args.train_steps} steps x {tokens[n]} tokens after {args.train_warmup} warm-up steps"
        for n in models
    }
    return result


# ---------------------------------------------------------------- evaluation
def vanilla_eval_fn(lm: LanguageModel, L: int, B: int, data: torch.Tensor):
    """Score B consecutive tokens, each with its own window of L tokens (one forward)."""
    holder = {"pos": L}

    @torch.no_grad()
    def run():
        p = holder["pos"]
        if p + B + 1 > data.size(1):
            p = L
        windows = data[0, p - L + 1 : p + B].unfold(0, L, 1)  # [B, L]: window b ends at token p + b
        targets = data[0, p + 1 : p + B + 1]
        h = lm.body(lm.embed(windows)).hidden[:, -1]  # only the last position is scored
        nll = lm.head.nll(h[:, None], targets[:, None])
        holder["pos"] = p + B
        return nll.sum()

    return run


def xl_eval_fn(lm: LanguageModel, T: int, data: torch.Tensor):
    """Score one segment of T tokens in each of the B streams, with memory."""
    holder = {"pos": 0, "state": None}

    @torch.no_grad()
    def run():
        p = holder["pos"]
        if p + T + 1 > data.size(1):
            p, holder["state"] = 0, None
        out = lm(data[:, p : p + T], data[:, p + 1 : p + T + 1], state=holder["state"])
        holder["state"], holder["pos"] = out.state, p + T
        return out.loss

    return run


def time_calls(fn, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for ``n`` calls. CPU time leaves out the
    time the process waited for a core, so on a shared machine it is the steadier figure."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleave(fns: dict, rounds: int, calls: int) -> dict[str, dict[str, list[float]]]:
    """Seconds for ``calls`` calls of each function per round, ``{"wall"|"cpu": {name: [...]}}``;
    the order is reversed every other round so drifting load hits all alike."""
    out = {"wall": {n: [] for n in fns}, "cpu": {n: [] for n in fns}}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            wall, cpu = time_calls(fns[name], calls)
            out["wall"][name].append(wall)
            out["cpu"][name].append(cpu)
    return out


def bench_eval(args) -> dict:
    B, T = args.eval_batch, args.eval_tgt
    shape = eval_shape(args)
    vanilla = build("vanilla", shape, dropout=0.0).eval()
    # same weights; "xl_recompute" projects the whole memory again every segment, as the original code does
    xls = {name: build("xl", shape, dropout=0.0).eval() for name in ("xl", "xl_klen", "xl_recompute")}
    xls["xl_recompute"].body.memory_kv_cache = False
    results = []
    for L in args.lengths:
        v_calls = max(2, round(args.vanilla_tokens / B * 128 / L)) if not args.quick else 2
        variants = {
            "vanilla": (vanilla_eval_fn(vanilla, L, B, stream(1, L + B * (v_calls + 2) + 1, seed=1)), B, v_calls, None),
        }
        mem_variants = {"xl": L, "xl_recompute": L}
        if L - T > 0:
            mem_variants["xl_klen"] = L - T
        for name, mem in mem_variants.items():
            fill = -(-mem // T)  # segments to fill the memory
            calls = args.xl_segments if not args.quick else 2
            data = stream(B, T * (fill + calls * (args.eval_rounds + 1) + 2) + 1, seed=2)
            xls[name].body.mem_len = mem
            variants[name] = (xl_eval_fn(xls[name], T, data), B * T, calls, (mem, fill))
        # warm-up: one call each; XL memories are filled to mem_len (not timed)
        for name, (fn, _, _, extra) in variants.items():
            for _ in range(1 if extra is None else extra[1] + 1):
                fn()
        # one round = each variant's calls back to back; variants alternate between rounds
        per_round = {}
        for r in range(args.eval_rounds):
            names = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in names:
                fn, toks, calls, extra = variants[name]
                wall, cpu = time_calls(fn, calls)
                per_round.setdefault(name, {"wall": [], "cpu": []})
                per_round[name]["wall"].append(wall / (toks * calls))
                per_round[name]["cpu"].append(cpu / (toks * calls))
        row = {"attention_length": L, "eval_tgt": T, "batch": B}
        for name, (fn, toks, calls, extra) in variants.items():
            row[name] = {
                "seconds_per_token": statistics.median(per_round[name]["wall"]),
                "cpu_seconds_per_token": statistics.median(per_round[name]["cpu"]),
                "per_round": per_round[name],
                "tokens_timed": toks * calls * args.eval_rounds,
                "mem_len": None if extra is None else extra[0],
            }
        for name in variants:
            if name != "vanilla":
                for clock, key in (("wall", "slowdown_of_vanilla"), ("cpu", "slowdown_of_vanilla_cpu")):
                    rr = [a / b for a, b in zip(per_round["vanilla"][clock], per_round[name][clock])]
                    row[name][key] = {"median": statistics.median(rr), "min": min(rr), "max": max(rr)}
        row["paper_table9"] = PAPER_TABLE9.get(L)
        results.append(row)
        print(
            f"L={L}: vanilla {row['vanilla']['seconds_per_token'] * 1e3:.1f} ms/token, "
            f"xl {row['xl']['seconds_per_token'] * 1e3:.4f} ms/token, ratio {row['xl']['slowdown_of_vanilla']['median']:.0f}x",
            flush=True,
        )
    return {"rows": results}


# ------------------------------------------------------------------- report
def render(payload: dict) -> str:
    a = payload["args"]
    tr = payload["training"]
    lines = [
        "# Transformer-XL speed (CPU)",
        "",
        f"`{payload['command']}` on {payload['machine']['cpu']} ({payload['machine']['torch_threads']} torch threads, "
        f"load average at start {payload['machine'].get('load_avg_1_5_15')}, at end {payload.get('load_avg_end')}), "
        f"torch {payload['machine']['torch']}, {payload['seconds']:.0f} s in all.",
        "Vanilla = the same layer (post-LN, ReLU FFN) with sinusoidal absolute positions instead of relative "
        "attention and memory; byte vocabulary (256).",
        "",
        f"## Training: width {a['train_width']}, {a['train_layers']} layers, {a['train_heads']} heads, FFN "
        f"{4 * a['train_width']}, batch {a['batch']}, dropout 0.1 (tokens/s = scored tokens per second, median of "
        f"{a['train_rounds']} interleaved rounds of {a['train_steps']} steps)",
        "",
    ]
    xl_name = next(iter(tr["wall"]["tokens_per_s"]))
    rows = []
    for n, v in tr["wall"]["tokens_per_s"].items():
        cells = [n, f"{v:,.0f}"]
        for clock in ("wall", "cpu"):
            r = tr[clock]["ratios"].get(f"{xl_name} / {n}")
            cells.append("1.00" if r is None else f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})")
        cells.insert(2, f"{tr['cpu']['tokens_per_s'][n]:,.0f}")
        rows.append(cells)
    lines.append(markdown_table(
        ["model", "tokens/s (wall)", "tokens/s (CPU time)", "XL / this, wall (min-max)", "XL / this, CPU time (min-max)"], rows
    ))
    lines += [
        "",
        f"## Evaluation: time per scored token (no grad; width {a['eval_width']}, {a['eval_layers']} layers, "
        f"{a['eval_heads']} heads, FFN {a['eval_ff']} = the enwik8-large layer; batch {a['eval_batch']}; "
        f"XL segments of {a['eval_tgt']}; median of {a['eval_rounds']} interleaved rounds)",
        "",
        "Vanilla = sliding window advancing one token per window (only its last token scored), "
        "as the paper's Table 9 baseline. XL mem = L: the paper's definition of attention length "
        "(evaluation memory); XL klen = L: memory L - segment, so no query sees more than L keys.",
        "",
    ]
    rows = []
    for r in payload["evaluation"]["rows"]:
        kl = r.get("xl_klen")
        sx = r["xl"]["slowdown_of_vanilla"]
        rows.append([
            r["attention_length"],
            f"{r['vanilla']['seconds_per_token'] * 1e3:.1f}",
            f"{r['xl']['seconds_per_token'] * 1e3:.3f}",
            f"**{sx['median']:.0f}x** ({sx['min']:.0f}-{sx['max']:.0f})",
            f"{r['xl']['slowdown_of_vanilla_cpu']['median']:.0f}x",
            "-" if kl is None else f"{kl['slowdown_of_vanilla']['median']:.0f}x / {kl['slowdown_of_vanilla_cpu']['median']:.0f}x",
            f"{r['xl_recompute']['seconds_per_token'] * 1e3:.3f} ({r['xl_recompute']['seconds_per_token'] / r['xl']['seconds_per_token']:.2f}x)",
            f"{r['paper_table9']}x (GPU)" if r["paper_table9"] else "-",
            f"{r['vanilla']['tokens_timed']} / {r['xl']['tokens_timed']}",
        ])
    lines.append(markdown_table(
        ["attention length L", "vanilla ms/token", "XL (mem = L) ms/token", "vanilla / XL, wall (min-max)",
         "vanilla / XL, CPU time", "klen = L: wall / CPU", "XL recomputing memory k/v like the original: ms/token (vs XL)",
         "paper", "tokens timed (vanilla / XL)"],
        rows,
    ))
    lines += [
        "",
        "Ratios are medians of per-round ratios measured side by side in this run (wall clock, and the "
        "process's CPU time, which leaves out waiting for a core on a shared machine); nothing is extrapolated.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-width", type=int, default=256)
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--train-heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="training batch")
    ap.add_argument("--tgt-len", type=int, default=128)
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--train-rounds", type=int, default=6)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--eval-width", type=int, default=1024)
    ap.add_argument("--eval-layers", type=int, default=2)
    ap.add_argument("--eval-heads", type=int, default=8)
    ap.add_argument("--eval-ff", type=int, default=3072)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 800])
    ap.add_argument("--eval-tgt", type=int, default=128)
    ap.add_argument("--eval-rounds", type=int, default=3)
    ap.add_argument("--xl-segments", type=int, default=2, help="segments per round for XL")
    ap.add_argument("--vanilla-tokens", type=int, default=32, help="tokens per round for vanilla at L=128 (scaled by 128/L)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "xl_speed"))
    args = ap.parse_args()
    if args.quick:
        args.train_rounds, args.train_steps, args.eval_rounds = 2, 1, 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    payload = {"command": command_line(), "machine": machine_info(torch.device("cpu")), "args": vars(args)}
    print("training ...", flush=True)
    payload["training"] = bench_training(args)
    for n, v in payload["training"]["wall"]["tokens_per_s"].items():
        print(f"  {n}: {v:,.0f} tokens/s", flush=True)
    print("evaluation ...", flush=True)
    payload["evaluation"] = bench_eval(args)
    payload["seconds"] = time.perf_counter() - t0
    try:
        import os

        payload["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    md = render(payload)
    j, m = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
