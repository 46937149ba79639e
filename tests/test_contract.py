"""The body contract (xvariants/models/contract.py), checked on every registered body.

The cases are read from the registry when this file is collected, so a body registered later
is checked without touching this file; a body whose constructor requires an argument this
file does not know fails loudly (add a small value to ``SMALL``). ``toy`` is a body defined
here and registered only for its own cases: that it passes the same checks unchanged is the
proof that a new variant is one module file (plus one config file, see the last test).
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from xvariants.interpret import hook_names, run_with_cache, run_with_hooks
from xvariants.interpret.hooks import step_prefix
from xvariants.layers.hooks import HookPoint
from xvariants.models import BODIES, build_body, build_language_model, register_body
from xvariants.models.contract import AuxOutput, Body, BodyOutput, map_state
from xvariants.models.registry import body_arguments

pytestmark = pytest.mark.usefixtures("one_thread")

V = 23
B, T = 2, 8


# ---------------------------------------------------------------------- a body defined here
class _MeanMixerLayer(nn.Module):
    """``x + MLP(mean of the projected real positions up to and including this one)``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.value = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, memory: torch.Tensor, keep: torch.Tensor):
        x = self.hook_resid_pre(x)
        v = self.value(self.ln(x)) * keep  # padding contributes nothing
        sums = memory[:, None, :-1] + v.cumsum(1)
        counts = memory[:, None, -1:] + keep.cumsum(1)
        x = self.hook_resid_post(x + self.mlp(sums / counts.clamp(min=1)))
        return x, torch.cat([sums[:, -1], counts[:, -1]], -1)


class ToyMixerBody(Body):
    """Test-only causal, stateful body: every position mixes in the running mean of the real
    positions so far, earlier segments included. The state is, per layer, one ``[B, D + 1]``
    tensor (sum of the values and count of the positions seen).

    :param d_model: width. :param n_layers: layers. :param d_ff: MLP width (default ``2 * d_model``).
    """

    causal = True
    stateful = True

    def __init__(self, d_model: int, n_layers: int, d_ff: int | None = None):
        super().__init__()
        self.d_model = d_model
        self.blocks = nn.ModuleList(_MeanMixerLayer(d_model, d_ff or 2 * d_model) for _ in range(n_layers))

    def init_state(self, batch_size: int, device: torch.device) -> list[torch.Tensor]:
        dtype = next(self.parameters()).dtype
        return [torch.zeros(batch_size, self.d_model + 1, device=device, dtype=dtype) for _ in self.blocks]

    def forward(self, h, state=None, *, padding_mask=None, cache=None, return_attention=False) -> BodyOutput:
        if cache is not None:
            raise ValueError("the toy body carries context in its state: pass cache=None")
        state = self.init_state(h.size(0), h.device) if state is None else state
        keep = torch.ones_like(h[..., :1]) if padding_mask is None else (~padding_mask)[..., None].to(h.dtype)
        new_state = []
        for layer, memory in zip(self.blocks, state):
            h, memory = layer(h, memory, keep)
            new_state.append(memory.detach())
        return BodyOutput(h, new_state, AuxOutput(attentions=[] if return_attention else None))


#: bodies defined by this file, registered only while their own cases run
TEST_BODIES = {"toy": ToyMixerBody}


@contextlib.contextmanager
def registered(name: str):
    """Register a test body for the duration of the block, then leave the registry as it was."""
    if name not in TEST_BODIES or name in BODIES:
        yield
        return
    register_body(name)(TEST_BODIES[name])
    try:
        yield
    finally:
        del BODIES[name]


# ---------------------------------------------------------------------- cases
#: small values for every constructor argument a body may require (and a few optional ones
#: that keep the cases small and deterministic, passed only to bodies that accept them)
SMALL = {"d_model": 16, "n_heads": 2, "n_layers": 2, "mem_len": 16, "d_ff": 32, "dropout": 0.0, "attn_dropout": 0.0}
#: halting spread out over steps: larger weights make the halting logits differ per position
_ACT = {"act": True, "max_steps": 5, "halting_bias_init": -0.5, "init_std": 0.3}
#: modes of a body that the contract must hold in separately (default: the body's defaults)
VARIANTS = {
    "vanilla": {"decoder": {}, "encoder": {"causal": False}},
    "universal": {
        "fixed": {"act": False, "num_steps": 3},
        "act": _ACT,
        "act-dense": {**_ACT, "act_compute": "dense"},
        "act-encoder": {**_ACT, "causal": False},
    },
    "universal_xl": {"fixed": {"act": False, "num_steps": 3}, "act": _ACT},
}


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    overrides: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name if self.variant == "default" else f"{self.name}-{self.variant}"

    def kwargs(self) -> dict:
        """Small constructor arguments; fails when the body requires one this file does not know."""
        params = body_arguments(self.name)
        required = [k for k, p in params.items() if p.default is p.empty]
        unknown = [k for k in required if k not in SMALL and k not in self.overrides]
        if unknown:
            pytest.fail(f"body {self.name!r} requires {unknown}: add small values to SMALL in tests/test_contract.py")
        kwargs = {k: v for k, v in SMALL.items() if k in params}
        kwargs.update(self.overrides)
        return kwargs


CASES = [
    Case(name, variant, overrides)
    for name in [*sorted(BODIES), *sorted(set(TEST_BODIES) - set(BODIES))]
    for variant, overrides in VARIANTS.get(name, {"default": {}}).items()
]


#: (check, case id) -> what the body does wrong; strict, so the fix makes the entry fail and go
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}  # none today


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    reason = KNOWN_VIOLATIONS.get((request.function.__name__, request.param.id))
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    with registered(request.param.name):
        yield request.param


def make_body(case: Case) -> Body:
    torch.manual_seed(0)
    return build_body(case.name, **case.kwargs()).double().eval()


def make_lm(case: Case):
    torch.manual_seed(0)
    return build_language_model({"body": case.name, **case.kwargs()}, V).double().eval()


def hidden(d_model: int, length: int = T, batch: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def previous_state(body: Body):
    """A state from an earlier segment for stateful bodies (None for the others), so the checks
    run with memory as well as without."""
    return body(hidden(body.d_model, 5, seed=7)).state if body.stateful else None


def tensors(state) -> list[torch.Tensor]:
    """The tensors of a state nest, in order."""
    found: list[torch.Tensor] = []
    map_state(state, found.append)
    return found


def assert_same_state(a, b) -> None:
    assert type(a) is type(b)
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


close = dict(atol=1e-10, rtol=0)


# ---------------------------------------------------------------------- the contract
@torch.no_grad()
def test_output_and_aux_types(case):
    body = make_body(case)
    h = hidden(body.d_model)
    out = body(h, previous_state(body))
    assert isinstance(out, BodyOutput) and isinstance(out.aux, AuxOutput)
    assert out.hidden.shape == h.shape and out.hidden.dtype == h.dtype and torch.isfinite(out.hidden).all()
    assert (out.state is None) == (not body.stateful)
    for name, loss in out.aux.losses.items():
        assert isinstance(name, str) and isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    for name, stat in out.aux.stats.items():
        assert isinstance(name, str) and isinstance(stat, torch.Tensor) and stat.numel() == 1 and torch.isfinite(stat)
    for name, m in out.aux.maps.items():
        assert isinstance(name, str) and isinstance(m, torch.Tensor) and tuple(m.shape[:2]) == (B, T)
    total = out.aux.total_loss()
    assert (isinstance(total, torch.Tensor) and total.dim() == 0) or total == 0.0
    assert out.aux.attentions is None  # only on request


@torch.no_grad()
def test_attention_maps_on_request(case):
    body = make_body(case)
    out = body(hidden(body.d_model), previous_state(body), return_attention=True)
    maps = out.aux.attentions
    assert isinstance(maps, list)
    if any(n.endswith("attn.hook_pattern") for n in hook_names(body)):
        assert maps, "a body with attention returns its maps when asked"
    for w in maps:
        assert w.dim() == 4 and w.shape[0] == B and w.shape[2] == T and w.shape[3] >= T
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]), atol=1e-6, rtol=0)


def test_extra_losses_are_differentiable_in_training(case):
    body = make_body(case).train()
    out = body(hidden(body.d_model), previous_state(body))
    assert out.hidden.requires_grad
    for name, loss in out.aux.losses.items():
        assert loss.requires_grad, f"aux loss {name!r} is added to the objective but has no gradient"


@torch.no_grad()
def test_causal(case):
    body = make_body(case)
    if not body.causal:
        pytest.skip("bidirectional body")
    state = previous_state(body)
    h = hidden(body.d_model)
    k = 3
    later = h.clone()
    later[:, k:] = hidden(body.d_model, T - k, seed=2)
    a, b = body(h, state), body(later, state)
    torch.testing.assert_close(a.hidden[:, :k], b.hidden[:, :k], **close)
    assert not torch.allclose(a.hidden[:, k:], b.hidden[:, k:]), "changed inputs must change the outputs there"


@torch.no_grad()
def test_right_padding_leaves_real_positions_as_without_it(case):
    body = make_body(case)
    state = previous_state(body)
    h = hidden(body.d_model, 6)
    padded = torch.cat([h, hidden(body.d_model, 3, seed=3)], 1)
    pad = torch.zeros(B, 9, dtype=torch.bool)
    pad[:, 6:] = True
    out = body(padded, state, padding_mask=pad)
    assert torch.isfinite(out.hidden).all()
    torch.testing.assert_close(out.hidden[:, :6], body(h, state).hidden, **close)


@torch.no_grad()
def test_padded_content_never_reaches_real_positions(case):
    body = make_body(case)
    state = previous_state(body)
    h = hidden(body.d_model)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 3:5] = True  # inside the sequence: real positions follow the padding
    other = h.clone()
    other[pad] = hidden(body.d_model, 2, 1, seed=4)[0]
    a, b = body(h, state, padding_mask=pad), body(other, state, padding_mask=pad)
    assert torch.isfinite(a.hidden).all() and torch.isfinite(b.hidden).all()
    torch.testing.assert_close(a.hidden[~pad], b.hidden[~pad], **close)
    # the mask is what hides it: without the mask the padded content would be read
    assert not torch.allclose(body(h, state).hidden[0, 5:], body(other, state).hidden[0, 5:])


@torch.no_grad()
def test_state_is_none_or_continues_the_sequence(case):
    body = make_body(case)
    h = hidden(body.d_model)
    if not body.stateful:
        assert body.init_state(B, h.device) is None and body(h).state is None
        return
    whole = body(h)
    first = body(h[:, :5])
    second = body(h[:, 5:], first.state)
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), whole.hidden, **close)
    assert_same_state(second.state, whole.state)
    start = body(h, body.init_state(B, h.device))
    torch.testing.assert_close(start.hidden, whole.hidden, **close)


def test_state_is_detached_and_checkpoint_safe(case):
    body = make_body(case).train()
    if not body.stateful:
        pytest.skip("stateless body")
    h = hidden(body.d_model).requires_grad_(True)
    first = body(h[:, :5])
    assert first.hidden.grad_fn is not None
    assert tensors(first.state), "a stateful body returns its state"
    for t in tensors(first.state):
        assert t.grad_fn is None and not t.requires_grad
    buf = io.BytesIO()
    torch.save(first.state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_same_state(loaded, first.state)
    body.eval()
    with torch.no_grad():
        torch.testing.assert_close(body(h[:, 5:], loaded).hidden, body(h[:, 5:], first.state).hidden, **close)


@torch.no_grad()
def test_cached_decoding_equals_full_forward(case):
    body = make_body(case)
    if body.new_cache() is None:
        pytest.skip("no decoding cache")
    h = hidden(body.d_model)
    cache = body.new_cache()
    pieces = [body(h[:, :3], cache=cache).hidden]
    for t in range(3, T):
        pieces.append(body(h[:, t : t + 1], cache=cache).hidden)
    torch.testing.assert_close(torch.cat(pieces, 1), body(h).hidden, **close)


@torch.no_grad()
def test_hook_names(case):
    lm = make_lm(case)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    names = hook_names(lm)
    prefix = step_prefix(lm)
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(rf"^{prefix}\.(\d+)\.", n))})
    assert layers and layers == list(range(len(layers)))
    for i in layers:
        assert f"{prefix}.{i}.hook_resid_pre" in names and f"{prefix}.{i}.hook_resid_post" in names
    assert "hook_embed" in names
    wanted = ["hook_embed", f"{prefix}.0.hook_resid_pre", f"{prefix}.0.hook_resid_post"]
    plain = lm(tokens).logits
    out, cache = run_with_cache(lm, tokens, names_filter=wanted)
    # a listener may switch a body to its dense reference path: equal up to rounding
    torch.testing.assert_close(out.logits, plain, **close)
    for name in wanted:
        assert cache[name].shape == (B, T, lm.body.d_model)
    # not a constant shift, which a following LayerNorm would remove
    ramp = torch.linspace(0.0, 1.0, lm.body.d_model, dtype=torch.float64)
    patched = run_with_hooks(lm, tokens, [(f"{prefix}.0.hook_resid_post", lambda a, hook: a + ramp)]).logits
    assert not torch.allclose(patched, plain), "the residual hook sits on the forward path"


def test_builds_from_a_flat_config_and_trains(case):
    lm = make_lm(case).train()
    tokens = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(6))
    out = lm(tokens[:, :-1], tokens[:, 1:], previous_state(lm.body))
    loss = out.loss + out.aux.total_loss()
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.body.parameters())


# ---------------------------------------------------------------------- the toy body
def test_toy_body_is_covered_and_registered_only_for_its_cases():
    assert "toy" in {c.name for c in CASES}
    assert "toy" not in BODIES
    with registered("toy"):
        assert BODIES["toy"] is ToyMixerBody
    assert "toy" not in BODIES


def test_toy_body_is_one_config_file_away_from_training(tmp_path):
    """A ``configs/model/toy.yaml`` beside the real ones composes and builds the toy body."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_train

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "toy.yaml").write_text("body: toy\nd_model: 16\nn_layers: 2\nd_ff: 32\nmax_len: 64\n")
    cfg = compose_train(["model=toy", f"hydra.searchpath=[file://{tmp_path}]"], tmp_path)
    with registered("toy"):
        lm = build_language_model(OmegaConf.to_container(cfg.model, resolve=True), V)
    assert isinstance(lm.body, ToyMixerBody) and len(lm.body.blocks) == 2
