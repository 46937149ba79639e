"""Long-context evaluation (xvariants/evaluation): every token scored exactly once by every
procedure and stride, perplexity = exp(mean NLL) of a direct loop, window >= sequence = one
full forward, XL with mem_len 0 = segment-only evaluation, memory carried like a direct loop,
RECL, the comparison's outputs, and one clear message per bad input. Tiny models, no training."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.evaluation.procedures import (
    evaluate_tokens,
    segments_with_memory,
    sliding_window,
)
from xvariants.evaluation.streams import make_streams, sliding_plan
from xvariants.evaluation.recl import recl, relative_gain
from xvariants.models import BODIES, build_language_model
from xvariants.loading import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
V = 13


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(body: str = "vanilla", **kw):
    torch.manual_seed(0)
    cfg = {"body": body, "d_model": 16, "n_heads": 2, "dropout": 0.0}
    if body == "vanilla":
        cfg.update(n_layers=2, positions="sinusoidal")
    elif body == "xl":
        cfg.update(n_layers=2, mem_len=8)
    elif body == "universal":
        cfg.update(num_steps=2)
    cfg.update(kw)
    return build_language_model(cfg, V).eval()


def streams(B: int = 3, L: int = 41, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return make_streams(torch.randint(0, V, (B * L,), generator=g), B)


@torch.no_grad()
def direct_nll(model, s: torch.Tensor, window: int) -> np.ndarray:
    """Target t of each stream, scored from the (at most) ``window`` tokens before it:
    the first window's tokens see what precedes them inside it, later ones a full window."""
    B, L = s.shape
    out = np.zeros((B, L - 1))
    for t in range(1, L):
        lo = 0 if t <= window else t - window
        hi = max(t, window) if t <= window else t
        x, y = s[:, lo:hi], s[:, lo + 1 : hi + 1]
        out[:, t - 1] = model(x, y).nll[:, t - 1 - lo].double().numpy()
    return out


# ------------------------------------------------------------------ every token once
@pytest.mark.parametrize("n_targets", [1, 7, 40, 97])
def test_sliding_plan_scores_every_target_once(n_targets):
    for window in range(1, n_targets + 1, 3):
        for stride in (1, 2, 3, window, window + 5):
            count = np.zeros(n_targets + 1, dtype=int)
            for start, first in sliding_plan(n_targets, window, stride):
                assert 0 <= start and start + window <= n_targets
                count[start + first + 1 : start + window + 1] += 1
            assert count[0] == 0 and (count[1:] == 1).all(), (n_targets, window, stride)


@pytest.mark.parametrize("window,stride", [(1, 1), (5, 1), (5, 2), (8, 3), (8, 8), (40, 7)])
def test_sliding_window_counts_each_token_once(window, stride):
    s = streams()
    res = sliding_window(tiny(), s, window, stride, max_batch_tokens=17)
    assert (res.count == 1).all() and res.n_tokens == s.shape[0] * (s.shape[1] - 1)
    # positions: a scored token never sees more than the window
    assert res.position.max() <= window - 1


@pytest.mark.skipif("xl" not in BODIES, reason="the xl body (xvariants/models/xl.py) is not registered yet")
@pytest.mark.parametrize("tgt,mem", [(1, 0), (4, 0), (4, 4), (7, 12), (40, 0), (5, 35)])
def test_segments_count_each_token_once(tgt, mem):
    s = streams()
    res = segments_with_memory(tiny("xl"), s, tgt, mem)
    assert (res.count == 1).all() and res.n_tokens == s.shape[0] * (s.shape[1] - 1)
    assert res.position.max() <= tgt + mem - 1
    assert res.attention_length == tgt + mem


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("window", [1, 6, 24])
def test_stride1_perplexity_equals_direct_loop(window):
    model, s = tiny(), streams(L=25)
    res = evaluate_tokens(model, s, window, stride=1)
    ref = direct_nll(model, s, window)
    np.testing.assert_allclose(res.nll, ref, atol=1e-5)
    assert math.isclose(res.ppl, math.exp(ref.mean()), rel_tol=1e-6)


def test_window_covering_the_stream_is_one_full_forward():
    model, s = tiny(), streams()
    full = model(s[:, :-1], s[:, 1:]).nll.double().detach().numpy()
    for stride in (1, 5, 40):
        res = sliding_window(model, s, s.shape[1] - 1, stride)
        np.testing.assert_allclose(res.nll, full, atol=1e-5)
        assert res.forwards == 1


def test_learned_positions_window_beyond_max_len_is_refused():
    model = tiny(positions="learned", max_len=8)
    with pytest.raises(ConfigError, match="max_len=8") as e:
        sliding_window(model, streams(), 9, 1)
    assert e.value.field == "eval.attention_lengths"


@pytest.mark.skipif("xl" not in BODIES, reason="the xl body (xvariants/models/xl.py) is not registered yet")
def test_xl_mem0_equals_segment_only_evaluation():
    model, s = tiny("xl"), streams(L=41)
    tgt = 8
    res = evaluate_tokens(model, s, tgt, tgt_len=tgt)  # auto: segments, mem_len = 8 - 8 = 0
    assert res.procedure == "segments" and res.mem_len == 0
    ref = np.zeros_like(res.nll)
    with torch.no_grad(), model.body.lengths(mem_len=0):
        for i in range(0, 40, tgt):
            ref[:, i : i + tgt] = model(s[:, i : i + tgt], s[:, i + 1 : i + tgt + 1]).nll.double().numpy()
    np.testing.assert_allclose(res.nll, ref, atol=1e-5)
    # = the sliding window with stride = window (40 targets = 5 whole windows)
    slide = evaluate_tokens(model, s, tgt, procedure="sliding", stride=tgt)
    np.testing.assert_allclose(slide.nll, ref, atol=1e-5)
    assert model.body.mem_len == 8  # restored


@pytest.mark.skipif("xl" not in BODIES, reason="the xl body (xvariants/models/xl.py) is not registered yet")
def test_xl_memory_equals_direct_loop_carrying_state():
    model, s = tiny("xl"), streams(L=41)
    res = evaluate_tokens(model, s, 5 + 11, tgt_len=5, clamp_len=6)
    assert (res.tgt_len, res.mem_len, res.clamp_len) == (5, 11, 6)
    ref, state = np.zeros_like(res.nll), None
    with torch.no_grad(), model.body.lengths(mem_len=11, clamp_len=6):
        for i in range(0, 40, 5):
            out = model(s[:, i : i + 5], s[:, i + 1 : i + 6], state)
            ref[:, i : i + 5], state = out.nll.double().numpy(), out.state
    np.testing.assert_allclose(res.nll, ref, atol=1e-5)
    assert res.position[0, -1] == 11 + 4
    assert (model.body.mem_len, model.body.clamp_len) == (8, -1)


@pytest.mark.parametrize("body", ["xl", "universal_xl"])
def test_a_short_last_segment_asks_the_body_whether_the_clamp_applies(body):
    kw = {"num_steps": 2, "mem_len": 8} if body == "universal_xl" else {}
    model, s = tiny(body, **kw), streams(L=38)  # 37 targets: segments of 5, the last of 2
    off = evaluate_tokens(model, s, 5 + 11, tgt_len=5, clamp_len=-1)
    asked, b = [], model.body
    # the body's capability (SegmentMemoryBody.clamp_unused), recorded
    b.clamp_unused = lambda T: asked.append(T) or (b.clamp_len > 0 and b.clamp_len >= b.mem_len + T)
    # clamp 15 = the longest distance of a full segment: never changes a score; the last
    # segment (2 tokens) cannot reach it at all, and the xl body refuses such a clamp
    res = evaluate_tokens(model, s, 5 + 11, tgt_len=5, clamp_len=15)
    assert asked and asked[-1] == 2 and res.clamp_len == 15
    np.testing.assert_allclose(res.nll, off.nll, atol=1e-6)


def test_ut_act_uses_sliding_window_and_reports_ponder_steps():
    model = tiny("universal", num_steps=None, act=True, max_steps=3)
    res = evaluate_tokens(model, streams(), 8, stride=3)
    assert res.procedure == "sliding" and (res.count == 1).all()
    assert 1.0 <= res.stats["ponder_steps_mean"] <= 3.0


# ------------------------------------------------------------------ RECL
def test_recl_follows_the_paper_definition():
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, 500)
    ctx = [100, 200, 300, 400]
    # "long" keeps gaining 5% of loss per step up to 300, "short" never gains
    long = {c: base * (1 - 0.05 * min(k, 2)) for k, c in enumerate(ctx)}
    short = {c: base.copy() for c in ctx}
    losses = {"long": long, "short": short}
    out = recl(losses, r=1.0)
    assert out["long"].recl == 300 and out["long"].bounded
    assert out["short"].recl == 100 and out["short"].bounded
    # gain by hand at (100, 200): b = min over models at 100 = base
    g = relative_gain(losses, "long", 100, 200, 1.0)
    assert math.isclose(g, 1 - math.exp(np.minimum(base, long[200]).mean() - base.mean()), rel_tol=1e-9)
    still = recl({"a": {c: base * (1 - 0.05 * k) for k, c in enumerate(ctx)}}, r=0.5)
    assert still["a"].recl == 400 and not still["a"].bounded and still["a"].label == ">=400"


# ------------------------------------------------------------------ checkpoints and eval.py
def _text_corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
    text = " ".join(rng.choice(words, 3000)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def make_checkpoint(tmp_path: Path, name: str, body: str = "vanilla", tokenizer: str = "char", **model_kw) -> Path:
    from xvariants.training.module import LMTask
    from xvariants.training.run import build_datamodule

    data = {
        "_target_": "xvariants.data.LMDataModule",
        "tokenizer": {"name": tokenizer},
        "corpus": {"name": "text", "path": str(_text_corpus(tmp_path)), "split": [0.8, 0.1, 0.1]},
        "batch_size": 4, "seq_len": 16, "eval_batch_size": 4, "eval_seq_len": 16,
        "batching": "ordered", "cache_dir": str(tmp_path / "cache"), "seed": 0, "num_workers": 0,
    }
    dm = build_datamodule(data)
    dm.setup("fit")
    model = {"body": body, "d_model": 16, "n_heads": 2, "dropout": 0.0}
    model.update({"vanilla": {"n_layers": 2, "positions": "sinusoidal"}, "xl": {"n_layers": 2, "mem_len": 16},
                  "universal": {"num_steps": 2}}[body])
    model.update(model_kw)
    torch.manual_seed(0)
    task = LMTask(model=model, vocab_size=dm.vocab_size, optim={"lr": 1e-3}, tokenizer_state=dm.tokenizer.to_dict(),
                  data_meta=dm.meta, unit=dm.unit, data=data)
    path = tmp_path / "logs" / name / "runs" / "t0" / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def _cfg(paths, **ev):
    return {"compare": [str(p) for p in paths], "split": "test", "data": None, "logger": None,
            "eval": {"progress": False, **ev}}


def test_eval_perplexity_equals_direct_loop_on_checkpoint(tmp_path):
    from xvariants.evaluation.compare import compare
    from xvariants.training.run import build_datamodule, evaluate, load_task

    ckpt = make_checkpoint(tmp_path, "van")
    out = compare(_cfg([ckpt], attention_lengths=[6, 12], stride=1, streams=4), tmp_path / "out")
    task, _ = load_task(str(ckpt))
    dm = build_datamodule(task.hparams.data, task.hparams.tokenizer_state)
    s = make_streams(dm.tokens("test"), 4)
    for row in out["rows"]:
        ref = direct_nll(task.model.eval(), s, row["attention_length"])
        assert math.isclose(row["ppl"], math.exp(ref.mean()), rel_tol=1e-6)
        assert row["tokens"] == ref.size
    # single-checkpoint eval.py path (Lightning over ordered streams of seq_len 16)
    from omegaconf import OmegaConf

    metrics = evaluate(OmegaConf.create({"ckpt_path": str(ckpt), "split": "test", "batch_size": 4,
                                         "seq_len": 16, "data": None}))
    n = s.shape[1] - 1
    with torch.no_grad():
        nll = torch.cat([task.model(s[:, i : min(i + 16, n)], s[:, i + 1 : min(i + 17, n + 1)]).nll
                         for i in range(0, n, 16)], 1)
    assert math.isclose(metrics["test/ppl"], math.exp(nll.double().mean().item()), rel_tol=1e-5)
    for f in ("comparison.md", "comparison.csv", "ppl_vs_attention.png", "loss_vs_position.png", "per_token.npz"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f


@pytest.mark.skipif("xl" not in BODIES, reason="the xl body (xvariants/models/xl.py) is not registered yet")
def test_compare_picks_procedure_per_body_and_writes_recl(tmp_path):
    from xvariants.evaluation.compare import compare

    a = make_checkpoint(tmp_path, "van")
    b = make_checkpoint(tmp_path, "xl", body="xl")
    out = compare(_cfg([a, b], attention_lengths=[16, 32], recl=True, recl_r=[1.0], streams=4), tmp_path / "o")
    procs = {(r["model"], r["attention_length"]): r["procedure"] for r in out["rows"]}
    assert procs[("van", 32)].startswith("sliding window 32") and procs[("xl", 32)] == "segments 16 + memory 16"
    assert {r["model"] for r in out["recl"]} == {"van", "xl"}
    md = (tmp_path / "o" / "comparison.md").read_text()
    assert "| xl | xl |" in md and "bpc" in md
    # attention multipliers follow each model's training attention length (xl: 16 + 16)
    out = compare(_cfg([a, b], attention_multipliers=[1, 2], streams=4, plots=False), tmp_path / "o2")
    assert {(r["model"], r["attention_length"]) for r in out["rows"]} == {("van", 16), ("van", 32), ("xl", 32), ("xl", 64)}


# ------------------------------------------------------------------ bad input
def test_missing_and_foreign_checkpoints(tmp_path):
    from xvariants.evaluation.compare import compare

    with pytest.raises(CheckpointError, match=r"compare\[0\]: checkpoint not found"):
        compare(_cfg([tmp_path / "nope.ckpt"], attention_lengths=[4]), tmp_path / "o")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, foreign)
    with pytest.raises(CheckpointError, match="not written by xvariants"):
        compare(_cfg([foreign], attention_lengths=[4]), tmp_path / "o")
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "x": Path("/")}, pickled)
    with pytest.raises(CheckpointError, match="refusing to load"):
        compare(_cfg([pickled], attention_lengths=[4]), tmp_path / "o")


def test_different_tokenizers_refused_unless_bits_per_byte(tmp_path):
    from xvariants.evaluation.compare import compare

    a = make_checkpoint(tmp_path, "chars")
    b = make_checkpoint(tmp_path, "bytes", tokenizer="byte")
    with pytest.raises(ConfigError, match="different tokenizers.*bits_per_byte=true") as e:
        compare(_cfg([a, b], attention_lengths=[8]), tmp_path / "o")
    assert e.value.field == "compare"
    out = compare(_cfg([a, b], attention_lengths=[8], bits_per_byte=True, streams=4, plots=False), tmp_path / "o")
    rows = {r["model"]: r for r in out["rows"]}
    # ASCII text: one char = one byte, so bits per byte = bits per char for both
    for r in rows.values():
        assert math.isclose(r["bpb"], r["bpc"], rel_tol=1e-3)


def test_attention_length_longer_than_split(tmp_path):
    from xvariants.evaluation.compare import compare

    a = make_checkpoint(tmp_path, "van")
    with pytest.raises(ConfigError, match="longer than the test split allows") as e:
        compare(_cfg([a], attention_lengths=[8, 5000], streams=4), tmp_path / "o")
    assert e.value.field == "eval.attention_lengths"
    with pytest.raises(ConfigError, match="eval.procedure"):
        compare(_cfg([a], attention_lengths=[8], procedure="magic"), tmp_path / "o")


def test_eval_py_reports_one_clear_line(tmp_path, monkeypatch, capsys):
    """eval.py itself (in-process: importing torch again in a subprocess costs seconds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["eval.py", f"compare=[{tmp_path}/missing.ckpt]", "eval.attention_lengths=[8]",
                                      f"hydra.run.dir={tmp_path}/run"])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: compare[0]: checkpoint not found: {tmp_path}/missing.ckpt"


def test_training_and_evaluation_do_not_import_each_other():
    """Both sit on xvariants.loading; neither reaches into the other (nor interpret into training)."""
    import ast

    pkg = ROOT / "xvariants"
    forbidden = {"evaluation": "xvariants.training", "interpret": "xvariants.training", "training": "xvariants.evaluation"}
    found = []
    for folder, bad in forbidden.items():
        for path in sorted((pkg / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith(bad)]
    assert not found, found
