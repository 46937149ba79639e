"""``python -m xvariants.interpret flow key=value ...``: trace, rank and draw attention flow.

Sources (one of):
  ckpt_path=PATH       an xvariants checkpoint (vanilla, universal, xl); its tokenizer encodes ``text``
  hf_model=minilm      a Hugging Face BERT-style encoder (``minilm`` = the packaged all-MiniLM-L6-v2,
                       or a local model folder); needs the ``interpret`` extra
Options:
  text="..."           input text (required)            text_pair="..."   second sentence (HF)
  tau=0.1              edge threshold                    token=cls|last|N  start token (default:
  direction=backward|forward                              [CLS] for encoders, last token for decoders)
  merge=any|mean       per-head threshold or heads merged first
  heads=all|0,3,5      heads used in every layer         alpha=0.5         decay of token influence
  compare_ckpt=PATH / compare_hf_model=SPEC               a second model on the same input (T3)
  segment_len=N        xl: analyse the last N tokens, earlier ones go through memory first
                       (default: the last half of the text)
  maxflow=true|false   compute attention flow (max-flow) too (default: true up to 64 tokens)
  out_dir=outputs/flow name=flow                          where flow.png / flow.html / flow.json go
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from xvariants.errors import UsageError
from xvariants.interpret.cli_args import as_bool, as_number, load_checkpoint_model, one_source, parse_options
from xvariants.interpret.compare import compare
from xvariants.interpret.flow import DIRECTIONS, MERGES, trace
from xvariants.interpret.importance import attention_flow, rollout
from xvariants.interpret.record import AttentionRecord, _labels, record_attention
from xvariants.interpret.views import plot_trace, write_html

KNOWN = {
    "ckpt_path", "hf_model", "text", "text_pair", "tau", "token", "direction", "merge", "heads", "alpha",
    "compare_ckpt", "compare_hf_model", "segment_len", "maxflow", "out_dir", "name",
}


def parse(args: list[str]) -> dict[str, str]:
    """The options after ``flow``, every value that needs no model checked."""
    opts = parse_options(args, KNOWN, "flow")
    if "text" not in opts:
        raise UsageError('text="..." is required')
    one_source(opts)
    check_values(opts)
    return opts


def _heads(opts: dict) -> list[int] | None:
    spec = opts.get("heads", "all")
    if spec == "all":
        return None
    try:
        heads = [int(h) for h in spec.split(",") if h.strip()]
    except ValueError:
        raise UsageError(f"heads: expected all or comma-separated head numbers (0,3,5), got {spec!r}") from None
    if not heads:
        raise UsageError(f"heads: expected all or comma-separated head numbers (0,3,5), got {spec!r}")
    return heads


def check_values(opts: dict) -> None:
    """Every option that needs no model, checked before a model is loaded."""
    as_number(opts, "tau", 0.1)
    as_number(opts, "alpha", 0.5)
    if opts.get("direction", "backward") not in DIRECTIONS:
        raise UsageError(f"direction: expected {' or '.join(DIRECTIONS)}, got {opts['direction']!r}")
    if opts.get("merge", "any") not in MERGES:
        raise UsageError(f"merge: expected {' or '.join(MERGES)}, got {opts['merge']!r}")
    _heads(opts)
    if opts.get("segment_len") and (not opts["segment_len"].isdigit() or int(opts["segment_len"]) < 1):
        raise UsageError(f"segment_len: expected a positive integer, got {opts['segment_len']!r}")
    if "maxflow" in opts:
        as_bool(opts["maxflow"], "maxflow")


def check_against(rec: AttentionRecord, heads: list[int] | None, start: int | None) -> None:
    """The options that depend on the model and the text: head numbers and the start token."""
    n = rec.n_heads()
    bad = [h for h in heads or [] if not 0 <= h < n]
    if bad:
        raise UsageError(f"heads: {rec.name} has {n} heads per {rec.layer_word}, numbered 0..{n - 1}; got {bad[0]}")
    if start is not None and not -rec.n_tokens <= start < rec.n_tokens:
        raise UsageError(
            f"token: position {start} is outside the text's {rec.n_tokens} tokens "
            f"(0..{rec.n_tokens - 1}, or -1..-{rec.n_tokens} from the end)"
        )


# ---------------------------------------------------------------------- recording
@torch.no_grad()
def checkpoint_record(model, tokenizer, text: str, *, name: str, segment_len: int | None = None) -> AttentionRecord:
    """Encode ``text`` and record attention; Transformer-XL reads the earlier part through memory."""
    ids = [int(i) for i in tokenizer.encode(text)]
    if not ids:
        raise UsageError("the text encodes to no tokens")
    limit = getattr(model, "max_context", None)
    body = model.body
    if getattr(body, "stateful", False):
        seg = segment_len or max(1, math.ceil(len(ids) / 2))
        if limit is not None:
            seg = min(seg, limit)
        past, cur = ids[: len(ids) - seg], ids[len(ids) - seg :]
        keep = getattr(body, "mem_len", 0)
        past = past[len(past) - keep :] if keep else []
        state = None
        for i in range(0, len(past), seg):
            chunk = torch.tensor([past[i : i + seg]])
            state = model(chunk, state=state).state
        labels_past = _labels(tokenizer, past)
        rec = record_attention(model, torch.tensor(cur), tokenizer=tokenizer, state=state, name=name,
                               memory_tokens=labels_past or None)
        rec.meta["memory_positions"] = len(past)
        return rec
    if limit is not None and len(ids) > limit:
        print(f"note: text has {len(ids)} tokens, the model reads at most {limit}; using the last {limit}", file=sys.stderr)
        ids = ids[-limit:]
    return record_attention(model, torch.tensor(ids), tokenizer=tokenizer, name=name)


def _source(opts: dict, ckpt_key: str, hf_key: str, default_name: str) -> AttentionRecord | None:
    if opts.get(ckpt_key):
        model, tok, _ = load_checkpoint_model(opts[ckpt_key])
        seg = int(opts["segment_len"]) if opts.get("segment_len") else None
        name = default_name or Path(opts[ckpt_key]).stem
        return checkpoint_record(model, tok, opts["text"], name=name, segment_len=seg)
    if opts.get(hf_key):
        from xvariants.interpret.hf import hf_record, load_hf_encoder

        model, tok = load_hf_encoder(opts[hf_key])
        return hf_record(model, tok, opts["text"], opts.get("text_pair"), name=default_name or model.xv_name)
    return None


def _start(rec: AttentionRecord, token: str | None, direction: str) -> int | None:
    if token is None or token == "default":
        return None
    if token == "cls":
        return 0
    if token == "last":
        return rec.n_tokens - 1
    try:
        return int(token)
    except ValueError:
        if token in rec.tokens:
            return rec.tokens.index(token)
        raise UsageError(f"token: expected cls, last, a position or one of the text's tokens, got {token!r}") from None


# ---------------------------------------------------------------------- the command
def run(opts: dict) -> dict:
    """Trace, rank and draw; write flow.png, flow.html and flow.json; print the summary."""
    a = _source(opts, "ckpt_path", "hf_model", opts.get("name", ""))
    b = _source(opts, "compare_ckpt", "compare_hf_model", "")
    if b is not None and a.name == b.name:
        b.name = b.name + " (B)"
    check_values(opts)
    tau = as_number(opts, "tau", 0.1)
    direction = opts.get("direction", "backward")
    merge = opts.get("merge", "any")
    heads = _heads(opts)
    alpha = as_number(opts, "alpha", 0.5)
    start = _start(a, opts.get("token"), direction)
    for rec in (a, b) if b is not None else (a,):
        check_against(rec, heads, start)
    g = trace(a, tau, start, direction=direction, heads=heads, merge=merge)
    start = g.start
    out = Path(opts.get("out_dir", "outputs/flow"))
    out.mkdir(parents=True, exist_ok=True)
    png, html, js = out / "flow.png", out / "flow.html", out / "flow.json"
    summary: dict = {"model": a.name, "kind": a.kind, "tokens": a.tokens, "start": start, "start_token": a.tokens[start],
                     "tau": tau, "direction": direction, "merge": merge, "trace": g.to_dict()}
    imp = g.head_importance()
    order = np.argsort(-imp, axis=None)[:5]
    summary["top_heads"] = [(int(i // imp.shape[1]) + 1, int(i % imp.shape[1]), round(float(imp.flat[i]), 4)) for i in order if imp.flat[i] > 0]
    infl = g.token_influence(alpha)
    summary["token_influence"] = {a.tokens[i]: round(float(infl[i]), 4) for i in np.argsort(-infl)[:8] if infl[i] > 0}
    ro = rollout(a, heads)
    summary["rollout_top"] = ro.top(start)
    summary["rollout_memory_share"] = ro.memory_share(start)
    do_flow = as_bool(opts["maxflow"], "maxflow") if "maxflow" in opts else a.n_tokens <= 64
    if do_flow:
        fl = attention_flow(a, [start], heads)
        summary["maxflow_top"] = fl.top(start)
        summary["maxflow_memory_share"] = fl.memory_share(start)
    if b is not None:
        cmp = compare(a, b, tau, start, direction=direction, heads=heads, merge=merge)
        summary["compare"] = cmp.summary()
        plot_trace(cmp, png)
        write_html(html, [a, b], tau=tau, start=start, direction=direction, merge=merge)
    else:
        plot_trace(g, png)
        write_html(html, a, tau=tau, start=start, direction=direction, merge=merge)
    js.write_text(json.dumps(summary, indent=1, default=_jsonable))
    _print(summary, a, g, png, html, js)
    return summary


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(type(x).__name__)


def _print(s: dict, rec: AttentionRecord, g, png: Path, html: Path, js: Path) -> None:
    w = rec.layer_word
    lines = [
        f"model: {s['model']} ({s['kind']}, {rec.n_layers} {w}s, {rec.n_heads()} heads, {rec.n_tokens} tokens)",
        (f"trace: {s['direction']} from {s['start']}:{s['start_token']!r}, tau={s['tau']}, merge={s['merge']}: "
         f"{len(g.edges)} edges, {len(g.nodes)} nodes"),
        "top heads (" + w + ", head, traced weight): " + ", ".join(f"{l}.{h}={v}" for l, h, v in s["top_heads"]),
        "token influence: " + ", ".join(f"{k!r}={v}" for k, v in list(s["token_influence"].items())[:5]),
        "rollout: " + ", ".join(f"{k!r}={v:.3f}" for k, v in s["rollout_top"]),
    ]
    if "maxflow_top" in s:
        lines.append("max-flow: " + ", ".join(f"{k!r}={v:.3f}" for k, v in s["maxflow_top"]))
    if any(rec.n_memory(l) for l in range(1, rec.n_layers + 1)):
        lines.append(
            f"memory: traced weight into memory {100 * g.memory_share()['total']:.1f}%, rollout {100 * s['rollout_memory_share']:.1f}%"
            + (f", max-flow {100 * s['maxflow_memory_share']:.1f}%" if "maxflow_memory_share" in s else "")
        )
    halted = g.halted_nodes()
    if any(m is not None for m in rec.active):
        lines.append(f"halted (copied) nodes on the trace: {len(halted)}")
    if "compare" in s:
        c = s["compare"]
        lines.append(
            f"compare {c['models'][0]} vs {c['models'][1]}: {c['shared_edges']} shared, {c['only_a_edges']} / "
            f"{c['only_b_edges']} exclusive edges (jaccard {c['jaccard']}); most changed heads: "
            + ", ".join(f"{l}.{h}={d:.3f}" for l, h, d in c["most_changed_heads"])
        )
    lines += [f"wrote {png}", f"wrote {html}", f"wrote {js}"]
    print("\n".join(lines), flush=True)
