"""Views (PNG, standalone HTML rendered in headless Chromium) and the flow CLI on vanilla,
Universal (ACT) and Transformer-XL checkpoints."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from xvariants.interpret import AttentionRecord, compare, plot_trace, trace, write_html
from xvariants.interpret.cli import main as cli_main

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium); HTML not rendered"
)


def rows(rng, H, T, S=None):
    S = S or T
    a = rng.random((H, T, S)) ** 4
    a = a / a.sum(-1, keepdims=True)
    return np.round(a, 5)  # what the page embeds, so Python and JS threshold the same numbers


def records():
    rng = np.random.default_rng(0)
    a = AttentionRecord([f"t{i}" for i in range(6)], [rows(rng, 3, 6) for _ in range(3)], causal=False, name="A")
    b = AttentionRecord(a.tokens, [rows(rng, 3, 6) for _ in range(3)], causal=False, name="B")
    return a, b


def dump_dom(html_path, tmp_path) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", html_path.resolve().as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def summary_attrs(dom: str) -> dict[str, int]:
    m = re.search(r'<div id="summary"([^>]*)>', dom)
    assert m, "no summary element in the rendered page"
    return {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', m.group(1))}


def test_png_for_trace_and_comparison(tmp_path):
    a, b = records()
    plot_trace(trace(a, 0.2), tmp_path / "one.png")
    plot_trace(compare(a, b, 0.2), tmp_path / "two.png")
    for p in ("one.png", "two.png"):
        data = (tmp_path / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_html_is_standalone(tmp_path):
    a, _ = records()
    page = write_html(tmp_path / "f.html", a).read_text()
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    assert 'id="tau"' in page and 'id="token"' in page and "headbox" in page


@needs_chromium
def test_html_draws_the_graph_in_chromium(tmp_path):
    a, b = records()
    tau = 0.2
    dom = dump_dom(write_html(tmp_path / "one.html", a, tau=tau), tmp_path)
    g = trace(a, tau)
    assert len(g.edges) > 0
    assert summary_attrs(dom)["edges-a"] == len(g.edges)  # the page's trace = the Python trace
    assert len(re.findall(r'<line [^>]*class="edge edge-a', dom)) == len(g.edges)
    assert len(re.findall(r'<circle [^>]*class="node', dom)) == a.n_tokens * (a.n_layers + 1)
    assert dom.count('class="headbox"') == 3 * 3  # head selection grid
    # comparison colours
    dom = dump_dom(write_html(tmp_path / "two.html", [a, b], tau=tau), tmp_path)
    c = compare(a, b, tau)
    s = summary_attrs(dom)
    assert s["edges-a"] == len(c.a.edges) and s["edges-b"] == len(c.b.edges) and s["shared"] == len(c.shared)
    assert len(re.findall(r'class="edge edge-shared', dom)) == len(c.shared)
    assert len(re.findall(r'class="edge edge-b', dom)) == len(c.only_b)


@needs_chromium
def test_html_marks_memory_and_halted_nodes(tmp_path):
    rng = np.random.default_rng(1)
    xl = AttentionRecord(list("abc"), [rows(rng, 2, 3, 5) for _ in range(2)], memory_tokens=list("pq"), kind="xl", name="xl")
    dom = dump_dom(write_html(tmp_path / "xl.html", xl, tau=0.1), tmp_path)
    assert summary_attrs(dom)["edges-a"] == len(trace(xl, 0.1).edges)
    assert len(re.findall(r'<rect [^>]*class="node mem', dom)) == 4 and "into memory" in dom
    ut = AttentionRecord(list("abcd"), [rows(rng, 2, 4) for _ in range(2)], active=[None, [1, 0, 1, 1]], kind="universal")
    dom = dump_dom(write_html(tmp_path / "ut.html", ut, tau=0.1, start=1), tmp_path)
    assert 'class="node halted' in dom and "edge-a copy" in dom


# ---------------------------------------------------------------------- CLI on checkpoints
CKPT_MODELS = {
    "vanilla": {"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "max_len": 64},
    "universal": {"body": "universal", "d_model": 32, "n_heads": 4, "dropout": 0.0, "act": True, "max_steps": 3},
    "xl": {"body": "xl", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "mem_len": 8},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from xvariants.data.tokenizers import ByteTokenizer
    from xvariants.training.module import LMTask

    d = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, cfg in CKPT_MODELS.items():
        torch.manual_seed(0)
        task = LMTask(model=cfg, vocab_size=256, optim={}, tokenizer_state=ByteTokenizer().to_dict(), unit="byte")
        paths[name] = d / f"{name}.ckpt"
        torch.save({"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()}, paths[name])
    return paths


@pytest.mark.parametrize("name", list(CKPT_MODELS))
def test_cli_flow_on_checkpoints(name, checkpoints, tmp_path, capsys):
    out = tmp_path / "flow"
    rc = cli_main(["flow", f"ckpt_path={checkpoints[name]}", "text=the cat sat", "tau=0.05", f"out_dir={out}"])
    printed = capsys.readouterr().out
    assert rc == 0
    for f in ("flow.png", "flow.html", "flow.json"):
        assert (out / f).stat().st_size > 0 and f"wrote {out / f}" in printed
    assert "trace: backward from 10:'t'" in printed or name == "xl"
    if name == "xl":
        assert "memory:" in printed  # the first half of the text went through memory
    if name == "universal":
        assert "step" in printed


def test_cli_compare_and_usage_errors(checkpoints, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli_main(["flow", f"ckpt_path={checkpoints['vanilla']}", f"compare_ckpt={checkpoints['universal']}",
                   "text=abcdef", "tau=0.1", "direction=forward", "token=0", f"out_dir={out}"])
    assert rc == 0 and "compare vanilla vs universal" in capsys.readouterr().out
    assert cli_main(["flow", "text=x"]) == 2
    assert cli_main(["flow", f"ckpt_path={checkpoints['vanilla']}", "text=x", "tua=0.1"]) == 2
    assert "did you mean tau" in capsys.readouterr().err
