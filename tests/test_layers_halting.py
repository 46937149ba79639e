"""ACT halting unit (xvariants/layers/halting.py): the numbers of the issue, forced halts,
weights summing to 1, freeze, gradient of the ponder cost, padding, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.layers.halting import AdaptiveHalting

D = 8


def constant_unit(bias: float, **kw) -> AdaptiveHalting:
    """A halting unit whose p is sigmoid(bias) everywhere (zero weights)."""
    unit = AdaptiveHalting(D, **kw)
    with torch.no_grad():
        unit.proj.weight.zero_()
        unit.proj.bias.fill_(bias)
    return unit


def counting_step(x, n, running):
    """Step n's state is n + 1 everywhere (so the output reveals the weights)."""
    return x, torch.full_like(x, float(n + 1))


def test_constant_sigmoid_one_halts_at_step_two():
    unit = constant_unit(1.0, max_steps=10)
    res = unit(counting_step, torch.zeros(2, 3, D))
    p = 1 / (1 + math.exp(-1))
    assert torch.all(res.n_updates == 2)
    assert torch.allclose(res.remainders, torch.full((2, 3), 1 - p))
    assert abs(res.remainders[0, 0].item() - 0.2689) < 1e-4
    assert abs(res.ponder_cost.item() - 2.2689) < 1e-4
    # Graves: weights p, R, summing to 1; output = sum w_n h_n = 1 * p + 2 * R
    assert torch.allclose(res.step_weights[:, 0, 0], torch.tensor([p, 1 - p]))
    assert torch.allclose(res.step_weights.sum(0), torch.ones(2, 3))
    assert torch.allclose(res.output, torch.full((2, 3, D), p + 2 * (1 - p)))
    assert res.halting_probs.shape[0] == 2  # the loop stopped when everything halted


def test_t2t_interpolation_weights_do_not_sum_to_one():
    unit = constant_unit(1.0, max_steps=10, weighting="t2t")
    res = unit(counting_step, torch.zeros(1, 1, D))
    p = 1 / (1 + math.exp(-1))
    # out = h2 * R + (h1 * p) * (1 - R): effective weights (p * p, R) = (0.534, 0.269)
    expected = 1 * p * p + 2 * (1 - p)
    assert torch.allclose(res.output, torch.full((1, 1, D), expected), atol=1e-6)
    assert abs(p * p + (1 - p) - 0.8034) < 1e-3


def test_p_above_threshold_halts_at_step_one_with_remainder_one():
    unit = constant_unit(5.0, max_steps=10)  # sigmoid(5) = 0.9933 > 0.99
    res = unit(counting_step, torch.zeros(2, 4, D))
    assert torch.all(res.n_updates == 1)
    assert torch.all(res.remainders == 1.0)
    assert abs(res.ponder_cost.item() - 2.0) < 1e-6
    assert res.halting_probs.shape[0] == 1


def test_forced_halt_at_max_steps_gets_remainder():
    unit = constant_unit(-5.0, max_steps=4)  # p = 0.0067: never reaches the threshold
    res = unit(counting_step, torch.zeros(2, 3, D))
    p = 1 / (1 + math.exp(5))
    assert torch.all(res.n_updates == 4)
    assert torch.allclose(res.remainders, torch.full((2, 3), 1 - 3 * p))
    assert torch.allclose(res.step_weights.sum(0), torch.ones(2, 3))
    assert res.halting_probs.shape[0] == 4


@pytest.mark.parametrize("max_steps", [1, 3, 7])
def test_random_halting_respects_max_steps_and_weights_sum_to_one(max_steps):
    torch.manual_seed(0)
    unit = AdaptiveHalting(D, max_steps=max_steps, halting_bias_init=-1.0)
    torch.nn.init.normal_(unit.proj.weight, std=1.0)

    def step(x, n, running):
        new = x + torch.randn_like(x)
        return new, new

    res = unit(step, torch.randn(4, 9, D))
    assert res.n_updates.max() <= max_steps and res.n_updates.min() >= 1
    assert torch.allclose(res.step_weights.sum(0), torch.ones(4, 9), atol=1e-6)
    assert torch.all(res.remainders > 0) and torch.all(res.remainders <= 1)
    # a position halted at N has weights only on steps 1..N
    steps = torch.arange(1, res.step_weights.size(0) + 1)[:, None, None]
    assert torch.all(res.step_weights[steps > res.n_updates[None]] == 0)


def test_freeze_keeps_halted_state_unchanged():
    torch.manual_seed(1)
    unit = AdaptiveHalting(D, max_steps=6, halting_bias_init=-1.0)
    torch.nn.init.normal_(unit.proj.weight, std=2.0)
    states = []

    def step(x, n, running):
        new = x + torch.randn_like(x)
        states.append(torch.where(running[..., None], new, x))
        return x, new

    res = unit(step, torch.randn(3, 11, D))
    assert res.n_updates.min() < res.n_updates.max()  # the test needs positions halting at different steps
    for n in range(1, len(states)):
        halted_before = res.n_updates <= n  # halted after step n (1-based), i.e. before step n + 1
        assert torch.equal(states[n][halted_before], states[n - 1][halted_before])
    assert torch.equal(res.state, states[-1])


def test_t2t_update_keeps_transforming_halted_states():
    unit = constant_unit(5.0, max_steps=3, halted_update="t2t")
    res = unit(counting_step, torch.zeros(1, 2, D))
    assert torch.all(res.state == 1.0)


def test_ponder_cost_gradient_reaches_halting_unit():
    torch.manual_seed(2)
    unit = constant_unit(1.0, max_steps=5)
    torch.nn.init.normal_(unit.proj.weight, std=0.1)
    res = unit(lambda x, n, r: (x, x + 1), torch.randn(2, 5, D))
    res.ponder_cost.backward()
    assert unit.proj.bias.grad is not None and unit.proj.bias.grad.abs().item() > 0
    assert unit.proj.weight.grad.abs().sum().item() > 0
    # dR/db = -sigmoid'(1) per position halting at step 2 -> mean over positions
    p = 1 / (1 + math.exp(-1))
    assert unit.proj.bias.grad.item() == pytest.approx(-p * (1 - p), rel=0.05)


def test_forced_halt_keeps_ponder_gradient():
    """t2t gives a position stopped by max_steps R = 0 and no gradient; ours assigns R."""
    unit = constant_unit(-4.0, max_steps=3)
    res = unit(counting_step, torch.zeros(1, 2, D))
    res.ponder_cost.backward()
    assert unit.proj.bias.grad.item() < 0


def test_padding_starts_halted_and_is_excluded_from_ponder_cost():
    torch.manual_seed(3)
    unit = AdaptiveHalting(D, max_steps=5, halting_bias_init=0.0)
    torch.nn.init.normal_(unit.proj.weight, std=1.0)
    x = torch.randn(2, 6, D)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    step = lambda x, n, r: (x, x * 0.5 + 1)  # noqa: E731
    res = unit(step, x, pad)
    assert torch.all(res.n_updates[pad] == 0) and torch.all(res.remainders[pad] == 0)
    assert torch.all(res.step_weights[:, pad] == 0)
    real = ~pad
    expected = (res.n_updates + res.remainders)[real].mean()
    assert torch.allclose(res.ponder_cost, expected)
    # the same as running the real positions alone
    alone = unit(step, x[1:, :3])
    assert torch.allclose(alone.n_updates, res.n_updates[1:, :3])
    all_pad = unit(step, x, torch.ones(2, 6, dtype=torch.bool))
    assert all_pad.halting_probs.shape[0] == 0 and all_pad.ponder_cost.item() == 0.0


def test_ponder_weight_warmup():
    unit = AdaptiveHalting(D, ponder_weight=0.1, ponder_warmup_steps=4)
    assert unit.current_ponder_weight() == 0.0
    unit.train()
    for _ in range(2):
        unit(counting_step, torch.zeros(1, 1, D))
    assert unit.current_ponder_weight() == pytest.approx(0.05)
    unit.eval()
    unit(counting_step, torch.zeros(1, 1, D))  # evaluation does not advance the warm-up
    assert unit.current_ponder_weight() == pytest.approx(0.05)
    assert "ponder_calls" in unit.state_dict()


def test_halting_warmup_detaches_the_halting_unit():
    unit = constant_unit(1.0, max_steps=4, halting_warmup_steps=2).train()
    step = lambda x, n, r: (x, x + 1)  # noqa: E731
    for expect_grad in (False, False, True):
        unit.zero_grad()
        res = unit(step, torch.randn(1, 3, D))
        if res.ponder_cost.requires_grad:
            res.ponder_cost.backward()
        has = unit.proj.bias.grad is not None and unit.proj.bias.grad.abs().item() > 0
        assert has == expect_grad
    unit.eval()
    assert not unit.halting_frozen()


def test_statistics():
    unit = constant_unit(1.0, max_steps=4)
    res = unit(counting_step, torch.zeros(2, 3, D))
    stats = unit.statistics(res)
    assert stats["ponder_steps_mean"].item() == 2 and stats["ponder_steps_max"].item() == 2
    assert stats["halt_step1_frac"].item() == 0 and stats["halt_max_frac"].item() == 0
    assert stats["remainder_mean"].item() == pytest.approx(0.2689, abs=1e-4)
    assert stats["act_steps_run"].item() == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"epsilon": 0.0}, "act_epsilon"),
        ({"epsilon": 1.0}, "act_epsilon"),
        ({"epsilon": -0.5}, "act_epsilon"),
        ({"max_steps": 0}, "max_steps"),
        ({"ponder_weight": -0.01}, "ponder_weight"),
        ({"ponder_warmup_steps": -1}, "ponder_warmup_steps"),
        ({"halting_warmup_steps": -1}, "halting_warmup_steps"),
        ({"halting_bias_init": float("nan")}, "halting_bias_init"),
        ({"weighting": "accumulate"}, "act_weighting"),
        ({"halted_update": "copy"}, "halted_update"),
        ({"halting_logit_scale": 0.0}, "halting_logit_scale"),
        ({"halting_logit_scale": float("inf")}, "halting_logit_scale"),
    ],
)
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        AdaptiveHalting(D, **kwargs)
    assert err.value.field == field
    assert field in str(err.value)


def test_halting_logit_scale_scales_only_the_weight_path_and_slows_adam():
    torch.manual_seed(0)
    s = torch.randn(4, 6, D)
    units = {scale: AdaptiveHalting(D, halting_logit_scale=scale) for scale in (1.0, D**-0.5)}
    with torch.no_grad():
        for unit in units.values():
            unit.proj.weight.normal_(std=0.3)
            unit.proj.bias.fill_(-1.0)
        units[D**-0.5].proj.weight.copy_(units[1.0].proj.weight)
    small = units[D**-0.5]
    expected = torch.sigmoid(D**-0.5 * (s @ small.proj.weight[0]) - 1.0)
    torch.testing.assert_close(small.halting_prob(s), expected)
    moved = {}
    for scale, unit in units.items():  # one Adam step pushing every p up: how far do the logits move?
        opt = torch.optim.Adam(unit.parameters(), lr=1e-3)
        before = torch.logit(unit.halting_prob(s).detach())
        (-unit.halting_prob(s).sum()).backward()
        opt.step()
        moved[scale] = (torch.logit(unit.halting_prob(s).detach()) - before).abs().mean().item()
    assert moved[D**-0.5] < moved[1.0] / 2  # the weight path dominates unscaled, and scaling slows it
