"""The fast path of causal tracing (xvariants/interpret/resume.py, hf_resume.py): resuming a
forward at a layer from a checkpoint gives the model's own logits, and traces through it equal
the full-pass traces on the vanilla body (learned and rotary positions) and on small random
GPT-2 and Llama models built locally."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from tests.test_contract import CASES, V, make_lm, registered
from xvariants.interpret.causal_trace import severed_trace, trace_fact
from xvariants.interpret.patching import CORRUPTED, Cell, Patcher, trace_sites
from xvariants.interpret.resume import layer_resumer
from xvariants.models import build_language_model

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="transformers not installed: pip install -c constraints.txt -e '.[interpret]'")

T = 9
SUBJECT = (2, 5)
TRACE = {"samples": 3, "window": 2, "strict": False}


def vanilla(rotary: bool):
    torch.manual_seed(0)
    cfg = {"body": "vanilla", "d_model": 32, "n_layers": 4, "n_heads": 4, "dropout": 0.0, "init_std": 0.3}
    if rotary:
        cfg.update(rotary=True, positions="none")
    return build_language_model(cfg, V).eval()


def hf(kind: str):
    from tests.test_interpret_hf_causal import gpt2, llama
    from xvariants.interpret.hf_causal import HookedCausalLM

    # larger weights than the library's init: peaked outputs whose probabilities move when restored
    build = gpt2 if kind == "gpt2" else llama
    return HookedCausalLM(build(initializer_range=0.3))


MODELS = {
    "vanilla": lambda: vanilla(False),
    "vanilla-rotary": lambda: vanilla(True),
    "gpt2": pytest.param(lambda: hf("gpt2"), marks=needs_hf),
    "llama": pytest.param(lambda: hf("llama"), marks=needs_hf),
}


@pytest.fixture(params=list(MODELS.values()), ids=list(MODELS))
def model(request):
    return request.param()


def prompt(model) -> torch.Tensor:
    vocab = getattr(model, "vocab_size", V)
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(5))


def noise(model) -> float:
    embed = model.hf.get_input_embeddings() if hasattr(model, "hf") else model.embed.tok
    return 3.0 * float(embed.weight.detach().std())


@torch.no_grad()
def test_resuming_with_nothing_restored_gives_the_models_logits(model):
    resumer = layer_resumer(model)
    assert resumer is not None
    tokens = torch.stack([prompt(model), prompt(model).flip(0), prompt(model).roll(3)])
    ref = model(tokens).logits[:, -1].float()
    ckpt = resumer.checkpoint(tokens)
    torch.testing.assert_close(ckpt.logits.float(), ref, atol=1e-5, rtol=1e-5)
    L = resumer.n_layers
    rows = torch.tensor([2, 0, 1, 1])
    for token in (0, 1, T // 2, T - 1):
        for first in ([0, 0, 0, 0], [1, 1, 2, L - 1], [0, 2, 2, L]):  # rows join at their own layer
            out = resumer.run_from_layer(ckpt, rows, torch.tensor(first), token)
            torch.testing.assert_close(out.float(), ref[rows], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-decreasing"):
        resumer.run_from_layer(ckpt, rows, torch.tensor([2, 1, 1, 1]), 0)


def test_fast_trace_equals_the_full_pass_trace(model):
    tokens, sites = prompt(model), trace_sites(model)
    kw = dict(noise=noise(model), kinds=tuple(sites.names), **TRACE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a resumer that fails its self-check would warn
        fast = trace_fact(model, tokens, SUBJECT, **kw)
        plain = trace_fact(model, tokens, SUBJECT, fast=False, **kw)
    assert fast.p_clean == pytest.approx(plain.p_clean, abs=1e-6)
    assert fast.p_corrupt == pytest.approx(plain.p_corrupt, abs=1e-6)
    for k in plain.scores:
        torch.testing.assert_close(fast.scores[k], plain.scores[k], atol=1e-5, rtol=0)
        # the comparison has teeth: restoring moves the score away from p_corrupt somewhere
        assert (plain.scores[k] - plain.p_corrupt).abs().max() > 1e-3
    # states before the subject are clean in every row: restoring them changes nothing
    torch.testing.assert_close(fast.scores["resid"][: SUBJECT[0]],
                               torch.full((SUBJECT[0], sites.n_layers), fast.p_corrupt, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    sever = ("none", "mlp", "attn")
    s_fast = severed_trace(model, tokens, SUBJECT, sever=sever, noise=noise(model), samples=3, strict=False)
    s_plain = severed_trace(model, tokens, SUBJECT, sever=sever, noise=noise(model), samples=3, strict=False, fast=False)
    for k in sever:
        torch.testing.assert_close(s_fast.curves[k], s_plain.curves[k], atol=1e-5, rtol=0)


def test_several_passes_and_mixed_cells_match(model):
    sites = trace_sites(model)
    cells = [CORRUPTED, Cell(0, sites.window("mlp", 3, 4)), Cell((3, 6), sites.names["resid"][1:3]),
             Cell(T - 1, sites.names["attn"][-1:]), Cell(4, sites.window("attn", 0, 4))]
    kw = dict(samples=2, batch_rows=5)  # two cells per pass
    fast = Patcher(model, prompt(model), SUBJECT, noise(model), **kw)
    assert fast.resumes
    a = fast.run(cells, answer=3)
    b = Patcher(model, prompt(model), SUBJECT, noise(model), fast=False, **kw).run(cells, answer=3)
    torch.testing.assert_close(a.probs, b.probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.clean, b.clean, atol=1e-6, rtol=0)


def test_a_resumer_that_disagrees_with_the_model_is_dropped(model):
    p = Patcher(model, prompt(model), SUBJECT, noise(model), samples=2)
    wrong = p.resumer.logits
    p.resumer.logits = lambda h: wrong(h) + 1.0
    with pytest.warns(UserWarning, match="does not reproduce"):
        run = p.run([Cell(3, trace_sites(model).names["resid"][:1])], answer=1)
    assert not p.resumes
    ref = Patcher(model, prompt(model), SUBJECT, noise(model), samples=2, fast=False)
    torch.testing.assert_close(run.probs, ref.run([Cell(3, trace_sites(model).names["resid"][:1])], answer=1).probs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_only_causal_layer_stacks_resume(case):
    with registered(case.name):
        lm = make_lm(case)
    assert (layer_resumer(lm) is not None) == (case.id == "vanilla-decoder")
