"""Universal Transformer body (xvariants/models/universal.py): fixed and adaptive modes,
equivalence with a vanilla block, causality and row independence including halting,
freeze, sparse == dense compute, compute following the ponder steps, hooks, bad input."""

from __future__ import annotations

import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.models import build_body, build_language_model
from xvariants.models.universal import UniversalBody
from xvariants.models.vanilla import VanillaBody

D, H = 32, 4


def make(spread: float = 1.5, bias: float = -0.5, **kw) -> UniversalBody:
    """An ACT body whose positions halt at different steps (spread-out halting weights)."""
    torch.manual_seed(0)
    args = dict(d_model=D, n_heads=H, dropout=0.0, act=True, max_steps=6, halting_bias_init=bias, signal_scale=0.1)
    args.update(kw)
    body = build_body("universal", **args)
    if body.halting is not None:
        torch.nn.init.normal_(body.halting.proj.weight, std=spread / D**0.5)
    return body.eval()


def test_registered_and_built_from_flat_config():
    cfg = {"body": "universal", "d_model": D, "n_heads": H, "act": True, "max_steps": 4, "max_len": 64}
    lm = build_language_model(cfg, vocab_size=11)
    assert isinstance(lm.body, UniversalBody)
    assert lm.embed.pos is None  # owns_positions: the body adds positions at every step
    tokens = torch.randint(0, 11, (2, 7))
    out = lm(tokens, tokens)
    assert torch.isfinite(out.loss) and "ponder_cost" in out.aux.losses
    (out.loss + out.aux.total_loss()).backward()
    seq = lm.generate(tokens[:, :3], 4, temperature=0)
    assert seq.shape == (2, 7)
    lm.double()  # moving / casting the model works and the ACT loop follows the dtype
    assert lm(tokens).logits.dtype == torch.float64


def test_parameters_are_shared_across_steps():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    a = build_body("universal", d_model=D, n_heads=H, num_steps=2)
    b = build_body("universal", d_model=D, n_heads=H, num_steps=12)
    v = VanillaBody(D, 1, H)
    assert n(a) == n(b) == n(v)


def _vanilla_with(body: UniversalBody) -> VanillaBody:
    v = VanillaBody(D, 1, H, dropout=0.0).eval()
    v.blocks[0].load_state_dict(body.block.state_dict())
    v.ln_f.load_state_dict(body.ln_f.state_dict())
    return v


@pytest.mark.parametrize("mode", ["fixed", "act"])
def test_one_step_without_halting_equals_one_vanilla_block(mode):
    kw = {"num_steps": 1} if mode == "fixed" else {"act": True, "max_steps": 1}
    body = build_body(
        "universal", d_model=D, n_heads=H, dropout=0.0, step_signal="none", position_signal="none", **kw
    ).eval()
    v = _vanilla_with(body)
    h = torch.randn(3, 9, D)
    assert torch.allclose(body(h).hidden, v(h).hidden, atol=1e-6)
    if mode == "act":
        out = body(h)
        assert torch.all(out.aux.maps["n_updates"] == 1) and torch.all(out.aux.maps["remainders"] == 1)


def test_signals_are_added_before_the_step():
    body = build_body(
        "universal", d_model=D, n_heads=H, dropout=0.0, num_steps=1, step_signal="sinusoidal", signal_scale=1.0
    ).eval()
    v = _vanilla_with(body)
    h = torch.randn(2, 5, D)
    from xvariants.layers.positions import sinusoid_table

    sig = sinusoid_table(torch.arange(5), D) + sinusoid_table(torch.arange(1), D)[0]
    assert torch.allclose(body(h).hidden, v(h + sig).hidden, atol=1e-5)
    auto = build_body("universal", d_model=D, n_heads=H, num_steps=1)
    assert auto.signal_scale == pytest.approx(0.02 * (2 * D) ** 0.5)  # default: embedding scale


ACT_VARIANTS = [
    {"halted_update": "freeze", "act_compute": "sparse"},
    {"halted_update": "freeze", "act_compute": "dense"},
    {"halted_update": "t2t", "act_compute": "sparse"},
    {"halted_update": "t2t", "act_compute": "dense", "act_weighting": "t2t"},
]


@pytest.mark.parametrize("variant", ACT_VARIANTS)
def test_decoder_is_causal_including_halting(variant):
    body = make(causal=True, **variant)
    h = torch.randn(2, 12, D)
    h2 = h.clone()
    h2[:, 7:] = torch.randn(2, 5, D) * 3
    a, b = body(h), body(h2)
    assert torch.allclose(a.hidden[:, :7], b.hidden[:, :7], atol=1e-5)
    for key in ("n_updates", "remainders"):
        assert torch.equal(a.aux.maps[key][:, :7], b.aux.maps[key][:, :7])
    steps = min(a.aux.maps["halting_probs"].size(-1), b.aux.maps["halting_probs"].size(-1))
    assert torch.allclose(a.aux.maps["halting_probs"][:, :7, :steps], b.aux.maps["halting_probs"][:, :7, :steps], atol=1e-6)
    assert not torch.allclose(a.hidden[:, 7:], b.hidden[:, 7:])


@pytest.mark.parametrize("variant", ACT_VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_batch_rows_are_independent(variant, causal):
    body = make(causal=causal, **variant)
    h = torch.randn(3, 10, D)
    h2 = h.clone()
    h2[1] = torch.randn(10, D) * 3
    a, b = body(h), body(h2)
    assert torch.allclose(a.hidden[0], b.hidden[0], atol=1e-5)
    assert torch.allclose(a.hidden[2], b.hidden[2], atol=1e-5)
    assert torch.equal(a.aux.maps["n_updates"][[0, 2]], b.aux.maps["n_updates"][[0, 2]])
    alone = body(h[:1])  # and a row computed alone
    assert torch.allclose(alone.hidden[0], a.hidden[0], atol=1e-5)


@pytest.mark.parametrize("halted_update", ["freeze", "t2t"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_sparse_compute_equals_dense(halted_update, causal, norm_first, padded):
    body = make(causal=causal, norm_first=norm_first, halted_update=halted_update)
    h = torch.randn(3, 11, D)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    if padded:
        pad[1, 6:] = True
        pad[2, 9:] = True
    sparse = body(h, padding_mask=pad if padded else None)
    with torch.no_grad():  # inference updates the frozen keys/values in place
        sparse_ng = body(h, padding_mask=pad if padded else None)
    body.act_compute = "dense"
    dense = body(h, padding_mask=pad if padded else None)
    n = sparse.aux.maps["n_updates"]
    assert n[~pad].min() < n.max()  # positions halt at different steps
    real = ~pad
    assert torch.allclose(sparse.hidden[real], dense.hidden[real], atol=1e-5)
    assert torch.allclose(sparse_ng.hidden[real], dense.hidden[real], atol=1e-5)
    assert torch.equal(n, dense.aux.maps["n_updates"])


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_sparse_compute_has_the_dense_gradients(norm_first, padded):
    grads = {}
    for mode in ("sparse", "dense"):
        body = make(causal=True, norm_first=norm_first, act_compute=mode, ponder_weight=0.1)
        h = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(5), requires_grad=True)
        pad = torch.zeros(2, 9, dtype=torch.bool)
        if padded:
            pad[1, 6:] = True
        out = body(h, padding_mask=pad)
        ((out.hidden[~pad] ** 2).sum() + out.aux.losses["ponder_cost"]).backward()
        grads[mode] = [h.grad] + [p.grad for p in body.parameters()]
    for a, b in zip(grads["sparse"], grads["dense"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_freeze_never_changes_a_halted_state():
    body = make(causal=False)
    states = []
    for n, hooks in enumerate(body.steps):
        hooks.hook_resid_post.register_forward_hook(lambda m, i, o: states.append(o.detach().clone()))
    out = body(torch.randn(2, 10, D))
    n_upd = out.aux.maps["n_updates"]
    assert n_upd.min() < n_upd.max() and len(states) >= 2
    checked = 0
    for n in range(1, len(states)):
        halted = n_upd <= n  # halted at step n (1-based) or earlier
        assert torch.equal(states[n][halted], states[n - 1][halted])
        checked += int(halted.sum())
    assert checked > 0


def test_halted_positions_are_still_attended_to():
    """Position i is made to halt at step 1; patching its state after that step (which only
    the others can see, through its frozen keys/values) changes the others' outputs."""
    body = make(causal=False)
    i = 3
    body.steps[0].hook_halting_prob.register_forward_hook(lambda m, inp, p: p.index_fill(1, torch.tensor([i]), 1.0))
    h = torch.randn(1, 8, D)
    a = body(h)
    n = a.aux.maps["n_updates"][0]
    assert n[i] == 1 and (n > 1).sum() >= 5
    handle = body.steps[0].hook_resid_post.register_forward_hook(
        lambda m, inp, x: x.index_add(1, torch.tensor([i]), torch.randn(1, 1, D))
    )
    b = body(h)
    handle.remove()
    others = n > 1
    assert not torch.allclose(a.hidden[0, others], b.hidden[0, others])


def test_compute_follows_ponder_steps():
    """The feed-forward runs once per real position per step it takes, not max_steps times."""
    body = make(causal=True)
    rows = []
    body.block.mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    out = body(torch.randn(2, 12, D), padding_mask=pad)
    n = out.aux.maps["n_updates"]
    assert sum(rows) == int(n.sum())
    assert int(n.sum()) < body.n_steps * int((~pad).sum())


def test_loop_stops_when_everything_halted():
    body = make(bias=8.0, spread=0.0)
    fired = []
    for s, hooks in enumerate(body.steps):
        hooks.hook_halting_prob.register_forward_hook(lambda m, i, o, s=s: fired.append(s))
    out = body(torch.randn(2, 5, D))
    assert fired == [0] and out.aux.stats["act_steps_run"].item() == 1
    assert out.aux.stats["halt_step1_frac"].item() == 1.0


def test_deep_start_default_runs_to_max_steps():
    body = build_body("universal", d_model=D, n_heads=H, act=True, max_steps=5).eval()
    out = body(torch.randn(2, 6, D))
    assert out.aux.stats["halt_max_frac"].item() == 1.0
    assert torch.allclose(out.aux.maps["step_weights"].sum(-1), torch.ones(2, 6))


def test_padding_excluded_and_does_not_change_real_positions():
    body = make(causal=False)
    h = torch.randn(1, 7, D)
    padded = torch.cat([h, torch.randn(1, 3, D)], 1)
    pad = torch.zeros(1, 10, dtype=torch.bool)
    pad[0, 7:] = True
    a, b = body(h), body(padded, padding_mask=pad)
    assert torch.allclose(a.hidden, b.hidden[:, :7], atol=1e-5)
    assert torch.all(b.aux.maps["n_updates"][pad] == 0)
    assert torch.allclose(a.aux.stats["ponder_cost_unweighted"], b.aux.stats["ponder_cost_unweighted"])


def test_ponder_gradient_reaches_halting_unit_through_the_body():
    body = make(ponder_weight=0.05)
    body.train()
    out = body(torch.randn(2, 6, D))
    assert out.aux.losses["ponder_cost"].requires_grad
    out.aux.losses["ponder_cost"].backward()
    assert body.halting.proj.weight.grad.abs().sum() > 0 and body.halting.proj.bias.grad.abs() > 0
    assert out.aux.losses["ponder_cost"].item() == pytest.approx(0.05 * out.aux.stats["ponder_cost_unweighted"].item())


def test_aux_stats_and_maps():
    body = make()
    out = body(torch.randn(2, 6, D), return_attention=True)
    for key in ("ponder_cost_unweighted", "ponder_steps_mean", "ponder_steps_max", "halt_step1_frac", "halt_max_frac", "remainder_mean"):
        assert out.aux.stats[key].dim() == 0
    steps = int(out.aux.stats["act_steps_run"])
    assert out.aux.maps["n_updates"].shape == (2, 6) and out.aux.maps["halting_probs"].shape == (2, 6, steps)
    assert len(out.aux.attentions) == steps and out.aux.attentions[0].shape == (2, H, 6, 6)


def test_block_hooks_fire_per_step_and_can_tell_the_step():
    body = make()
    seen = []
    body.block.hook_resid_post.register_forward_hook(lambda m, i, o: seen.append(body.current_step))
    out = body(torch.randn(1, 5, D))
    assert seen == list(range(int(out.aux.stats["act_steps_run"])))


def test_hooks_can_patch_halting():
    body = make()
    body.steps[0].hook_halting_prob.register_forward_hook(lambda m, i, o: torch.ones_like(o))
    out = body(torch.randn(2, 5, D))
    assert torch.all(out.aux.maps["n_updates"] == 1)


def test_fixed_mode_runs_num_steps():
    body = build_body("universal", d_model=D, n_heads=H, num_steps=3, step_signal="learned", causal=False)
    fired = []
    body.block.hook_resid_pre.register_forward_hook(lambda m, i, o: fired.append(1))
    out = body(torch.randn(2, 4, D))
    assert len(fired) == 3 and out.aux.losses == {}


def test_learned_positions_limit_and_random_offsets():
    body = build_body("universal", d_model=D, n_heads=H, num_steps=2, position_signal="learned", max_positions=8)
    with pytest.raises(ValueError, match="max_positions"):
        body(torch.randn(1, 9, D))
    body = build_body("universal", d_model=D, n_heads=H, num_steps=2, dropout=0.0, position_offset_max=50)
    h = torch.randn(1, 6, D)
    body.eval()
    assert torch.equal(body(h).hidden, body(h).hidden)  # no offsets at evaluation
    body.train()
    assert not torch.allclose(body(h).hidden, body(h).hidden)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"act": True, "act_epsilon": 0.0}, "model.act_epsilon"),
        ({"act": True, "act_epsilon": 1.5}, "model.act_epsilon"),
        ({"act": True, "max_steps": 0}, "model.max_steps"),
        ({"act": True, "ponder_weight": -1.0}, "model.ponder_weight"),
        ({"act": True, "num_steps": 4}, "model.num_steps"),
        ({"act": False, "max_steps": 4}, "model.max_steps"),
        ({"act": False, "ponder_weight": 0.1}, "model.ponder_weight"),
        ({"act": False, "halted_update": "t2t"}, "model.halted_update"),
        ({"act": True, "act_compute": "fast"}, "model.act_compute"),
        ({"act": True, "halted_update": "copy"}, "model.halted_update"),
        ({"num_steps": 0}, "model.num_steps"),
        ({"step_signal": "rope"}, "model.step_signal"),
        ({"position_signal": "alibi"}, "model.position_signal"),
    ],
)
def test_bad_input_one_clear_message(kwargs, field):
    with pytest.raises(ConfigError) as err:
        build_body("universal", d_model=D, n_heads=H, **kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_state_is_refused():
    body = make()
    with pytest.raises(ValueError, match="stateless"):
        body(torch.randn(1, 3, D), state=[torch.zeros(1)])


@pytest.mark.parametrize("signals", [("sinusoidal", "sinusoidal"), ("learned", "learned")])
def test_fixed_step_cached_decoding_equals_full_forward(signals):
    from xvariants.models import build_language_model

    step_signal, position_signal = signals
    cfg = {"body": "universal", "d_model": D, "n_heads": H, "num_steps": 3, "dropout": 0.0,
           "step_signal": step_signal, "position_signal": position_signal, "max_positions": 32}
    torch.manual_seed(0)
    lm = build_language_model(cfg, 17).eval()
    x = torch.randint(0, 17, (2, 20))
    full = lm(x).logits
    cache = lm.body.new_cache()
    steps = [lm(x[:, :6], cache=cache).logits]  # a prompt, then one token at a time
    for t in range(6, 20):
        steps.append(lm(x[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20 and len(cache.layers) == 3  # one key/value cache per step
    greedy = lm.generate(x[:, :4], 5, temperature=0)
    chain = x[:, :4]
    for _ in range(5):  # the cached generate() matches recomputing the whole prefix
        chain = torch.cat([chain, lm(chain).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, chain)


def test_encoder_and_t2t_act_bodies_have_no_decoding_cache():
    assert build_body("universal", d_model=D, n_heads=H, num_steps=2, causal=False).new_cache() is None
    t2t = make(halted_update="t2t")  # a halted state keeps changing: nothing to freeze in a cache
    assert t2t.new_cache() is None
    with pytest.raises(ValueError, match="no decoding cache"):
        t2t(torch.randn(1, 3, D), cache=make().new_cache())


@pytest.mark.parametrize("norm_first", [True, False])
def test_act_cached_decoding_equals_full_forward(norm_first):
    """Each token halts on its own; later tokens attend to earlier tokens' frozen keys at every
    later step, including steps the earlier tokens' own forward never ran."""
    body = make(causal=True, norm_first=norm_first)
    h = torch.randn(2, 16, D)
    full = body(h)
    n_full = full.aux.maps["n_updates"]
    assert n_full.min() < n_full.max()  # halting varies over positions
    cache = body.new_cache()
    parts = [body(h[:, :5], cache=cache)]  # a prompt, then one position at a time
    for t in range(5, 16):
        parts.append(body(h[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat([p.hidden for p in parts], 1), full.hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([p.aux.maps["n_updates"] for p in parts], 1), n_full)
    assert {layer.length for layer in cache.layers} == {16}  # every step holds every token


def test_act_generate_uses_the_cache_and_matches_recomputing():
    from xvariants.models import build_language_model

    cfg = {"body": "universal", "d_model": D, "n_heads": H, "act": True, "max_steps": 5, "dropout": 0.0,
           "halting_bias_init": -0.5, "signal_scale": 0.1}
    torch.manual_seed(0)
    lm = build_language_model(cfg, 13).eval()
    torch.nn.init.normal_(lm.body.halting.proj.weight, std=1.5 / D**0.5)
    prompt = torch.randint(0, 13, (2, 4))
    greedy = lm.generate(prompt, 8, temperature=0)
    chain = prompt
    for _ in range(8):
        chain = torch.cat([chain, lm(chain).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, chain)
