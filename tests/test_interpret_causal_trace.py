"""Causal tracing (xvariants/interpret/causal_trace.py, patching.py, causal_effects.py) on tiny
random models of every registered body and mode (the cases of tests/test_contract.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_contract import CASES, V, make_lm, registered
from xvariants.config_errors import ConfigError
from xvariants.interpret import hook_names
from xvariants.interpret.causal_effects import CATEGORIES, average_effects, average_severed, token_categories
from xvariants.interpret.causal_trace import (
    KINDS,
    WrongPrediction,
    embedding_std,
    severed_trace,
    trace_fact,
    trace_many,
)
from xvariants.interpret.patching import CORRUPTED, Cell, Patcher, trace_sites
from xvariants.interpret.trace_args import EvalMode
from xvariants.models import build_language_model

pytestmark = pytest.mark.usefixtures("one_thread")

T = 8
SUBJECT = (2, 5)  # first, middle, last subject token; first subsequent 5, further 6, last 7
TOKENS = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(11))
FAST = {"samples": 3, "window": 2}
VANILLA = next(c for c in CASES if c.id == "vanilla-decoder")


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def lm(request):
    with registered(request.param.name):
        yield make_lm(request.param)


def kinds_of(lm) -> tuple[str, ...]:
    return tuple(k for k in KINDS if k in trace_sites(lm).names)


def is_act(lm) -> bool:
    return getattr(lm.body, "halting", None) is not None


def noise_for(lm, sigma_factor: float = 8.0) -> torch.Tensor:
    return sigma_factor * torch.randn(3, SUBJECT[1] - SUBJECT[0], lm.body.d_model,
                                      generator=torch.Generator().manual_seed(2), dtype=torch.float64)


# ---------------------------------------------------------------------- the tracing invariants
def test_noise_zero_restores_the_clean_score_everywhere(lm):
    r = trace_fact(lm, TOKENS, SUBJECT, noise=0.0, kinds=kinds_of(lm), **FAST)
    assert r.p_corrupt == pytest.approx(r.p_clean, abs=1e-9)
    for scores in r.scores.values():
        assert scores.shape == (T, trace_sites(lm).n_layers)
        torch.testing.assert_close(scores, torch.full_like(scores, r.p_clean), atol=1e-6, rtol=0)


def test_restoring_every_state_recovers_the_clean_probability(lm):
    sites = trace_sites(lm)
    patcher = Patcher(lm, TOKENS, SUBJECT, noise_for(lm), sites=sites)
    every = tuple(range(T))
    cells = [Cell(every, sites.names["resid"])]
    if not is_act(lm):  # fixed depth: the last state of every token is the whole input of the head
        cells.append(Cell(every, sites.names["resid"][-1:]))
    else:  # ACT: the halting of step 0 reads the corrupted input; restore the probabilities too
        cells.append(Cell(every, sites.names["resid"] + tuple(n for n in hook_names(lm) if n.endswith("hook_halting_prob"))))
    run = patcher.run([CORRUPTED, *cells])
    assert not torch.allclose(run.probs[0], run.clean.expand_as(run.probs[0]), atol=1e-6), "the noise must matter"
    last = run.probs[-1]
    torch.testing.assert_close(last, run.clean.expand_as(last), atol=1e-9, rtol=0)
    if not is_act(lm):
        torch.testing.assert_close(run.probs[1], run.clean.expand_as(run.probs[1]), atol=1e-9, rtol=0)


def test_restoring_at_a_token_changes_no_earlier_output(lm):
    if not lm.body.causal:
        pytest.skip("bidirectional body")
    sites = trace_sites(lm)
    t = 4
    cells = [CORRUPTED] + [Cell(t, sites.window(k, layer, 2)) for k in kinds_of(lm) for layer in range(len(sites.names[k]))]
    run = Patcher(lm, TOKENS, SUBJECT, noise_for(lm), sites=sites).run(cells, all_positions=True)
    before, base = run.probs[1:, :, :t], run.probs[:1, :, :t]
    torch.testing.assert_close(before, base.expand_as(before), atol=1e-10, rtol=0)
    assert not torch.allclose(run.probs[1:, :, t:], run.probs[:1, :, t:].expand_as(run.probs[1:, :, t:]), atol=1e-8)


def test_same_seed_same_trace_and_another_seed_differs(lm):
    a = trace_fact(lm, TOKENS, SUBJECT, noise=2.0, seed=3, kinds=kinds_of(lm), **FAST)
    b = trace_fact(lm, TOKENS, SUBJECT, noise=2.0, seed=3, kinds=kinds_of(lm), **FAST)
    c = trace_fact(lm, TOKENS, SUBJECT, noise=2.0, seed=4, kinds=kinds_of(lm), **FAST)
    assert a.p_corrupt == b.p_corrupt and a.answer == b.answer
    for k in a.scores:
        assert torch.equal(a.scores[k], b.scores[k])
    assert c.p_corrupt != a.p_corrupt


def test_batched_cells_equal_one_cell_per_pass(lm):
    kw = dict(noise=2.0, kinds=kinds_of(lm), **FAST)
    many = trace_fact(lm, TOKENS, SUBJECT, batch_rows=10_000, **kw)
    one = trace_fact(lm, TOKENS, SUBJECT, batch_rows=1 + FAST["samples"], **kw)
    for k in many.scores:
        torch.testing.assert_close(many.scores[k], one.scores[k], atol=1e-6, rtol=0)
        assert torch.equal(many.na[k], one.na[k])
    if many.ponder is not None:
        for k in many.ponder:
            torch.testing.assert_close(many.ponder[k], one.ponder[k], atol=0, rtol=0)


def test_act_rows_do_not_interact_and_ponder_steps_are_reported(lm):
    if not is_act(lm):
        pytest.skip("fixed-depth body")
    sites = trace_sites(lm)
    cells = [CORRUPTED] + [Cell(t, sites.names["resid"][1:2]) for t in range(T)]
    run = Patcher(lm, TOKENS, SUBJECT, noise_for(lm), sites=sites).run(cells, all_positions=True)
    with torch.no_grad():
        alone = lm.hidden_states(TOKENS[None])
        p_alone = torch.softmax(lm.head.logits(alone.hidden).double(), -1)[0]
    torch.testing.assert_close(run.clean, p_alone, atol=1e-10, rtol=0)
    assert torch.equal(run.clean_n_updates, alone.aux.maps["n_updates"][0])
    assert not torch.equal(run.n_updates[0], run.clean_n_updates.expand_as(run.n_updates[0])), "noise changes halting"
    r = trace_fact(lm, TOKENS, SUBJECT, noise=8.0, kinds=kinds_of(lm), **FAST)
    steps = r.ponder["clean"].round().long()
    layer = torch.arange(sites.n_layers)
    assert torch.equal(r.na["resid"], layer[None, :] >= steps[:, None])
    assert r.na["resid"].any(), "some position halts before the last step"
    assert r.ponder["resid"].shape == (T, sites.n_layers, T) and r.ponder["corrupt"].shape == (T,)


def test_severed_trace(lm):
    kinds = kinds_of(lm)
    sever = ("none",) + tuple(k for k in ("mlp", "attn") if k in kinds)
    s = severed_trace(lm, TOKENS, SUBJECT, sever=sever, noise=2.0, samples=3)
    r = trace_fact(lm, TOKENS, SUBJECT, noise=2.0, kinds=("resid",), **FAST)
    assert s.token == SUBJECT[1] - 1 and s.p_corrupt == pytest.approx(r.p_corrupt, abs=1e-9)
    torch.testing.assert_close(s.curves["none"], r.scores["resid"][s.token], atol=1e-6, rtol=0)
    for kind in sever[1:]:
        # at the last layer nothing after the frozen outputs reads them: severing changes nothing
        torch.testing.assert_close(s.curves[kind][-1], s.curves["none"][-1], atol=1e-6, rtol=0)
    zero = severed_trace(lm, TOKENS, SUBJECT, sever=sever, noise=0.0, samples=2)
    for curve in zero.curves.values():
        torch.testing.assert_close(curve, torch.full_like(curve, zero.p_clean), atol=1e-6, rtol=0)
    json.dumps(s.to_dict())
    avg = average_severed([s, s])
    assert set(avg) == set(sever) and len(avg["none"]["aie"]) == trace_sites(lm).n_layers


# ---------------------------------------------------------------------- noise scale, averages
def test_embedding_std_is_the_std_of_the_subject_embeddings():
    lm = make_lm(VANILLA)
    other = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(3))
    sigma = embedding_std(lm, [(TOKENS, SUBJECT), (other, (0, 2))])
    ids = torch.cat([TOKENS[SUBJECT[0] : SUBJECT[1]], other[:2]])
    assert sigma == pytest.approx(float(lm.embed.tok.weight[ids].detach().double().std()), rel=1e-9)
    a = trace_fact(lm, TOKENS, SUBJECT, noise="s3", sigma=sigma, kinds=("resid",), **FAST)
    assert a.noise == pytest.approx(3 * sigma)


def test_a_trace_gives_every_submodule_its_own_mode_back():
    """A wrapper in train mode around a network in eval mode (a fresh adapter around a Hugging
    Face model): after tracing, the network must still be in eval mode, its dropout off."""

    class Wrapper(torch.nn.Module):  # the shape of a Lightning task: the network under .model
        def __init__(self, model):
            super().__init__()
            self.model = model

    wrapper = Wrapper(make_lm(VANILLA))
    wrapper.model.eval()
    assert wrapper.training
    trace_fact(wrapper, TOKENS, SUBJECT, noise=0.1, kinds=("resid",), **FAST)
    assert wrapper.training and not any(m.training for m in wrapper.model.modules())
    with pytest.raises(RuntimeError), EvalMode(wrapper):  # an error inside the block restores them too
        assert not wrapper.training
        raise RuntimeError("inside")
    assert wrapper.training and not any(m.training for m in wrapper.model.modules())


def test_average_effects_by_token_category():
    lm = make_lm(VANILLA)
    r1 = trace_fact(lm, TOKENS, SUBJECT, noise=2.0, **FAST)
    r2 = trace_fact(lm, TOKENS.flip(0), (0, 2), noise=2.0, **FAST)
    avg = average_effects([r1, r2])
    L = trace_sites(lm).n_layers
    assert avg.n_facts == 2 and avg.aie["resid"].shape == (len(CATEGORIES), L)
    assert avg.ate == pytest.approx((r1.total_effect + r2.total_effect) / 2)
    last = CATEGORIES.index("last")
    want = ((r1.scores["resid"][-1] - r1.p_corrupt) + (r2.scores["resid"][-1] - r2.p_corrupt)) / 2
    torch.testing.assert_close(avg.aie["resid"][last], want.double(), atol=1e-6, rtol=0)
    middle = CATEGORIES.index("middle_subject")
    assert avg.n["resid"][middle].tolist() == [1] * L  # only r1 has a middle subject token
    value, category, layer = avg.peak("mlp")
    assert value == float(avg.aie["mlp"].nan_to_num(-1).max()) and category in CATEGORIES and 0 <= layer < L
    json.dumps(avg.to_dict())
    json.dumps(r1.to_dict())
    assert set(avg.summary()) >= {"n_facts", "p_clean", "p_corrupt", "ate", "peak_aie", "peak_layer",
                                  "peak_token_category", "mlp_peak_aie", "attn_peak_aie"}


def test_token_categories_follow_the_paper():
    assert token_categories((2, 5), 8) == {"first_subject": [2], "middle_subject": [3], "last_subject": [4],
                                           "first_subsequent": [5], "further": [6], "last": [7]}
    one = token_categories((0, 1), 2)  # one-token subject; the first subsequent token is the last
    assert one["first_subject"] == one["last_subject"] == [0] and one["first_subsequent"] == one["last"] == [1]
    assert token_categories((3, 5), 5)["first_subsequent"] == []


# ---------------------------------------------------------------------- bad input
def test_bad_input_gets_one_clear_message():
    lm = make_lm(VANILLA)
    for rng in [(3, 3), (5, 20), (-1, 2)]:
        with pytest.raises(ConfigError, match="subject_range"):
            trace_fact(lm, TOKENS, rng)
    with pytest.raises(ConfigError, match="kinds.*unknown kind 'mlps'"):
        trace_fact(lm, TOKENS, SUBJECT, kinds=("mlps",))
    with pytest.raises(ConfigError, match="sigma"):
        trace_fact(lm, TOKENS, SUBJECT, noise="s3")
    with pytest.raises(ConfigError, match="noise"):
        trace_fact(lm, TOKENS, SUBJECT, noise="x3")
    short = build_language_model({"body": "vanilla", "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 6}, V)
    with pytest.raises(ConfigError, match="tokens.*longer than the model's context of 6"):
        trace_fact(short, TOKENS, SUBJECT)
    predicted = trace_fact(lm, TOKENS, SUBJECT, kinds=("resid",), **FAST).answer
    wrong = (predicted + 1) % V
    with pytest.raises(WrongPrediction, match=f"not the expected {wrong}"):
        trace_fact(lm, TOKENS, SUBJECT, answer=wrong)
    loose = trace_fact(lm, TOKENS, SUBJECT, answer=wrong, strict=False, kinds=("resid",), **FAST)
    assert loose.answer == wrong and not math.isnan(loose.p_clean)
    results, skipped = trace_many(lm, [(TOKENS, SUBJECT, predicted), (TOKENS, SUBJECT, wrong)], kinds=("resid",), **FAST)
    assert len(results) == 1 and skipped == [1]


def test_a_kind_the_model_lacks_is_named():
    toy = next(c for c in CASES if c.name == "toy")
    with registered("toy"):
        lm = make_lm(toy)
        with pytest.raises(ConfigError, match="no hook_mlp_out hook points for kind 'mlp'"):
            trace_fact(lm, TOKENS, SUBJECT, kinds=("mlp",))


# ---------------------------------------------------------------------- through XL memory
MEMORY_CASES = [c for c in CASES if c.name in ("xl", "universal_xl")]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c.id for c in MEMORY_CASES])
def test_memory_trace(case):
    from xvariants.interpret.causal_memory import trace_memory

    lm = make_lm(case)
    context, prompt = TOKENS, TOKENS[:5].flip(0)
    zero = trace_memory(lm, context, SUBJECT, prompt, noise=0.0, samples=2)
    torch.testing.assert_close(zero.scores, torch.full_like(zero.scores, zero.p_clean), atol=1e-6, rtol=0)
    r = trace_memory(lm, context, SUBJECT, prompt, noise=8.0, samples=3, batch_rows=7)
    entries = len(lm.body(torch.zeros(1, 2, lm.body.d_model, dtype=torch.float64)).state)
    assert r.scores.shape == (T, entries) and r.positions == list(range(T))
    with torch.no_grad():  # the clean row equals reading the two segments one after the other
        state = lm(context[None]).state
        alone = torch.softmax(lm(prompt[None], state=state).logits[0, -1].double(), -1)
    assert r.p_clean == pytest.approx(float(alone[r.answer]), abs=1e-10) and r.p_corrupt != pytest.approx(r.p_clean)
    # memory before the subject was never corrupted: restoring it changes nothing
    torch.testing.assert_close(r.scores[: SUBJECT[0]], torch.full_like(r.scores[: SUBJECT[0]], r.p_corrupt), atol=1e-9, rtol=0)
    if case.name == "xl":  # the last entry (output of the last layer) is kept but read by no layer
        torch.testing.assert_close(r.scores[:, -1], torch.full_like(r.scores[:, -1], r.p_corrupt), atol=1e-9, rtol=0)
    assert r.categories["last_subject"] == [SUBJECT[1] - 1]
    json.dumps(r.to_dict())
    with pytest.raises(ConfigError, match="subject_range.*not in memory"), lm.body.lengths(mem_len=4):
        trace_memory(lm, context, SUBJECT, prompt)


def test_memory_trace_needs_a_memory_body():
    from xvariants.interpret.causal_memory import trace_memory

    with pytest.raises(ConfigError, match="model.*segment memory"):
        trace_memory(make_lm(VANILLA), TOKENS, SUBJECT, TOKENS[:3])


def test_saved_traces_load_back_and_average_the_same():
    """TraceResult / SeveredResult.from_dict invert to_dict through JSON, n/a cells included,
    so the per-fact files of a cut-short batch run can be averaged again."""
    import json

    from xvariants.interpret.causal_effects import average_effects, average_severed
    from xvariants.interpret.causal_trace import SeveredResult, TraceResult, severed_trace, trace_fact
    from xvariants.models import build_language_model

    torch.manual_seed(0)
    lm = build_language_model({"body": "universal", "act": True, "d_model": 32, "n_heads": 2, "d_ff": 64,
                               "max_steps": 3, "dropout": 0.0, "max_len": 32}, 50).eval()
    facts = [(torch.tensor([3, 4, 5, 6, 7]), (1, 3)), (torch.tensor([9, 8, 7, 6]), (0, 2))]
    traces = [trace_fact(lm, t, s, noise=0.5, samples=3, strict=False) for t, s in facts]
    sev = [severed_trace(lm, t, s, noise=0.5, samples=3, answer=r.answer) for (t, s), r in zip(facts, traces)]
    back = [TraceResult.from_dict(json.loads(json.dumps(r.to_dict()))) for r in traces]
    sev_back = [SeveredResult.from_dict(json.loads(json.dumps(r.to_dict()))) for r in sev]
    for a, b in zip(traces, back):
        for k in a.scores:
            assert torch.equal(a.na[k], b.na[k])
            torch.testing.assert_close(a.scores[k].double().masked_fill(a.na[k], 0), b.scores[k].masked_fill(b.na[k], 0))
    want, got = average_effects(traces), average_effects(back)
    for k, v in want.summary().items():
        assert got.summary()[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    for k in want.aie:
        torch.testing.assert_close(got.aie[k], want.aie[k], equal_nan=True)
    for k, curve in average_severed(sev).items():
        assert average_severed(sev_back)[k]["aie"] == pytest.approx(curve["aie"], nan_ok=True)
