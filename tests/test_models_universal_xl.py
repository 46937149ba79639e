"""Universal Transformer-XL with adaptive halting (xvariants/models/universal_xl.py): memory
per depth step, segments == one piece, causality and row independence with halting, one
step == one Transformer-XL layer, bad input."""

from __future__ import annotations

import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.models import build_body, build_language_model
from xvariants.models.universal_xl import UniversalXLBody
from xvariants.models.xl import XLBody

D, H = 32, 4


def make(act: bool = True, **kw) -> UniversalXLBody:
    torch.manual_seed(0)
    args = dict(d_model=D, n_heads=H, mem_len=16, dropout=0.0, signal_scale=0.1)
    args.update({"act": True, "max_steps": 5, "halting_bias_init": -0.5} if act else {"num_steps": 3})
    args.update(kw)
    body = build_body("universal_xl", **args)
    if body.halting is not None:
        torch.nn.init.normal_(body.halting.proj.weight, std=1.5 / D**0.5)
    return body.eval()


def test_registered_stateful_and_trains_in_a_language_model():
    lm = build_language_model({"body": "universal_xl", "d_model": D, "n_heads": H, "mem_len": 8, "act": True, "max_steps": 3}, 13)
    assert isinstance(lm.body, UniversalXLBody) and lm.body.stateful and lm.embed.pos is None
    tokens = torch.randint(0, 13, (2, 6))
    out = lm(tokens, tokens)
    assert len(out.state) == 3 and all(m.shape == (2, 6, D) and not m.requires_grad for m in out.state)
    out2 = lm(tokens, tokens, out.state)
    assert all(m.shape == (2, 8, D) for m in out2.state)  # truncated to mem_len
    (out2.loss + out2.aux.total_loss()).backward()
    assert lm.body.halting.proj.bias.grad is not None
    assert lm.generate(tokens[:, :2], 3, temperature=0).shape == (2, 5)
    lm.to(torch.float64).to("cpu")  # module methods (e.g. _apply) are not shadowed
    assert lm.body.block.attn.qkv.weight.dtype == torch.float64


@pytest.mark.parametrize("act", [False, True])
def test_segments_with_memory_equal_one_piece(act):
    body = make(act=act)
    h = torch.randn(2, 16, D)
    full = body(h)
    a = body(h[:, :9])
    b = body(h[:, 9:], a.state)
    assert torch.allclose(torch.cat([a.hidden, b.hidden], 1), full.hidden, atol=1e-5)
    if act:
        n = full.aux.maps["n_updates"]
        assert n.min() < n.max()
        assert torch.equal(torch.cat([a.aux.maps["n_updates"], b.aux.maps["n_updates"]], 1), n)


def test_memory_of_steps_the_segment_did_not_run():
    """Segment 1 halts at step 1 everywhere, segment 2 runs to max_steps: the memory entries of
    the steps segment 1 never ran must hold what its positions present there in one piece."""
    body = make(act=True, signal_scale=0.0)
    with torch.no_grad():
        body.halting.proj.weight.zero_()
        body.halting.proj.weight[0, 0] = 1.0
        body.halting.proj.bias.zero_()
    h = torch.randn(1, 12, D)
    h[:, :6, 0] = 60.0  # p ~ 1: halt at step 1
    h[:, 6:, 0] = -60.0  # p ~ 0: run to max_steps
    full = body(h)
    a = body(h[:, :6])
    assert a.aux.stats["act_steps_run"].item() == 1
    b = body(h[:, 6:], a.state)
    assert full.aux.maps["n_updates"][0, 6:].min() == body.n_steps
    assert torch.allclose(torch.cat([a.hidden, b.hidden], 1), full.hidden, atol=1e-5)


@pytest.mark.parametrize("halted_update", ["freeze", "t2t"])
def test_segments_equal_one_piece_when_a_segment_stops_early(halted_update):
    """Segment 1 stops after 2 steps (row 0 halts at step 1 and is skipped at step 2), segment 2
    runs to max_steps: under t2t the halted states of segment 1 keep being transformed in one
    piece, so its memory must hold them transformed (it held them untransformed: off by 7e-4
    here, up to 0.21 with trained weights)."""
    body = make(act=True, halted_update=halted_update, signal_scale=1.0)
    with torch.no_grad():
        body.halting.proj.weight.zero_()
        body.halting.proj.weight[0, 0] = 1.0
        body.halting.proj.bias.zero_()
    h = torch.randn(2, 12, D)
    h[0, :6, 0] = 60.0  # p ~ 1: halt at step 1
    h[1, :6, 0] = 0.0  # p = 0.5: halt at step 2
    h[:, 6:, 0] = -60.0  # p ~ 0: run to max_steps
    full = body(h)
    a = body(h[:, :6])
    assert a.aux.stats["act_steps_run"].item() == 2
    b = body(h[:, 6:], a.state)
    assert full.aux.maps["n_updates"][:, 6:].min() == body.n_steps
    assert torch.allclose(torch.cat([a.hidden, b.hidden], 1), full.hidden, atol=1e-5)


@pytest.mark.parametrize("halted_update", ["freeze", "t2t"])
def test_causal_including_halting_and_memory(halted_update):
    body = make(halted_update=halted_update)
    mem = body(torch.randn(2, 5, D)).state
    h = torch.randn(2, 10, D)
    h2 = h.clone()
    h2[:, 6:] = torch.randn(2, 4, D) * 3
    a, b = body(h, mem), body(h2, mem)
    assert torch.allclose(a.hidden[:, :6], b.hidden[:, :6], atol=1e-5)
    assert torch.equal(a.aux.maps["n_updates"][:, :6], b.aux.maps["n_updates"][:, :6])


def test_batch_rows_independent():
    body = make()
    h = torch.randn(3, 8, D)
    h2 = h.clone()
    h2[1] = torch.randn(8, D) * 3
    a, b = body(h), body(h2)
    assert torch.allclose(a.hidden[[0, 2]], b.hidden[[0, 2]], atol=1e-5)
    assert torch.equal(a.aux.maps["n_updates"][[0, 2]], b.aux.maps["n_updates"][[0, 2]])


@pytest.mark.parametrize("act", [False, True])
def test_one_step_equals_one_transformer_xl_layer(act):
    kw = {"act": True, "max_steps": 1} if act else {"num_steps": 1}
    body = build_body("universal_xl", d_model=D, n_heads=H, mem_len=8, dropout=0.0, step_signal="none", norm_first=False, **kw).eval()
    xl = XLBody(D, 1, H, mem_len=8, dropout=0.0, untie_r=True).eval()
    xl.blocks[0].load_state_dict(body.block.state_dict())
    h1, h2 = torch.randn(2, 5, D), torch.randn(2, 4, D)
    a1, x1 = body(h1), xl(h1)
    a2, x2 = body(h2, a1.state), xl(h2, x1.state)
    assert torch.allclose(a1.hidden, x1.hidden, atol=1e-5) and torch.allclose(a2.hidden, x2.hidden, atol=1e-5)


def test_padding_starts_halted():
    body = make()
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    out = body(torch.randn(2, 7, D), padding_mask=pad)
    assert torch.all(out.aux.maps["n_updates"][pad] == 0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"causal": False}, "model.causal"),
        ({"mem_len": -1}, "model.mem_len"),
        ({"act": True, "num_steps": 3}, "model.num_steps"),
        ({"act": True, "act_epsilon": 1.0}, "model.act_epsilon"),
        ({"max_steps": 3}, "model.max_steps"),
        ({"step_signal": "rope"}, "model.step_signal"),
        ({"clamp_len": 0}, "model.clamp_len"),
    ],
)
def test_bad_input(kwargs, field):
    args = dict(d_model=D, n_heads=H, mem_len=4)
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        build_body("universal_xl", **args)
    assert err.value.field == field


def test_memory_from_another_model_is_refused():
    body = make()
    with pytest.raises(ValueError, match="tensors"):
        body(torch.randn(1, 3, D), [torch.zeros(1, 2, D)] * 2)


@pytest.mark.parametrize("kind", ["universal_xl", "xl"])
def test_evaluation_lengths_are_set_and_restored_on_both_memory_bodies(kind):
    from xvariants.evaluation.procedures import body_lengths

    body = make() if kind == "universal_xl" else XLBody(d_model=D, n_layers=2, n_heads=H, mem_len=16)
    with body_lengths(body, mem_len=40, clamp_len=12, same_length=True):
        assert (body.mem_len, body.clamp_len, body.same_length) == (40, 12, True)
        out = body(torch.randn(2, 6, D))
        assert all(m.size(1) == 6 for m in out.state)
    assert (body.mem_len, body.clamp_len, body.same_length) == (16, -1, False)
    with pytest.raises(ConfigError, match="model.clamp_len"):
        body.clamp_len = 0
    with pytest.raises(ConfigError, match="model.same_length"):
        body.set_eval_lengths(mem_len=0, same_length=True)
    assert (body.mem_len, body.same_length) == (16, False)  # a refused change leaves nothing half-set
