"""Hook names, run_with_hooks / run_with_cache on every body: hooks see what the forward used,
replacements take effect, names_filter is honoured, and no hook = the plain forward, bit for bit."""

from __future__ import annotations

import pytest
import torch

from xvariants.interpret import act_name, hook_names, run_with_cache, run_with_hooks
from xvariants.interpret.hooks import HookTable
from xvariants.layers.hooks import HookPoint
from xvariants.models import build_language_model

V = 41
CFGS = {
    "vanilla": {"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "max_len": 64},
    "universal": {"body": "universal", "d_model": 32, "n_heads": 4, "dropout": 0.0, "num_steps": 3},
    "universal_act": {"body": "universal", "d_model": 32, "n_heads": 4, "dropout": 0.0, "act": True, "max_steps": 4},
    "xl": {"body": "xl", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "mem_len": 6},
}


def model(name: str):
    torch.manual_seed(0)
    return build_language_model(dict(CFGS[name]), V).eval()


def inputs(name: str, m):
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 9))
    kw = {}
    if name == "xl":
        with torch.no_grad():
            kw["state"] = m(torch.randint(0, V, (2, 5))).state
            # the xl body reuses the memory's keys/values when it gets back the very state it
            # returned (exact up to float rounding); a throwaway call moves that cache on, so
            # every call below takes the same path
            m(x[:, :1], state=[s.clone() for s in kw["state"]])
    return x, kw


def no_hooks_left(m) -> bool:
    return not any(p.has_hooks() for p in m.modules() if isinstance(p, HookPoint))


def test_canonical_names():
    v = hook_names(model("vanilla"))
    for n in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern",
              "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"):
        assert n in v
    t = HookTable(model("vanilla"))
    assert t.resolve("steps.1.attn.hook_pattern") == "blocks.1.attn.hook_pattern"  # a layer is a step
    assert t.resolve("body.blocks.1.attn.hook_pattern") == "blocks.1.attn.hook_pattern"  # module path
    with pytest.raises(KeyError, match="did you mean"):
        t.resolve("blocks.1.attn.hook_patern")
    u = hook_names(model("universal_act"))
    for s in range(4):
        for n in ("attn.hook_pattern", "mlp.hook_post", "hook_resid_pre", "hook_resid_post", "hook_halting_prob",
                  "hook_active", "block.hook_resid_post", "hook_attn_out"):
            assert f"steps.{s}.{n}" in u
    assert "hook_act_output" in u
    x = hook_names(model("xl"))
    for n in ("blocks.0.attn.hook_mem", "blocks.1.attn.hook_content_score", "blocks.1.attn.hook_position_score"):
        assert n in x
    assert act_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert act_name("post", 2, model("universal")) == "steps.2.mlp.hook_post"


@pytest.mark.parametrize("name", list(CFGS))
def test_no_hooks_is_bit_identical_to_plain_forward(name):
    m = model(name)
    x, kw = inputs(name, m)
    with torch.no_grad():
        plain = m(x, **kw).logits
        assert torch.equal(run_with_hooks(m, x, [], **kw).logits, plain)
        run_with_cache(m, x, None, **kw)  # every point hooked (attention materialised) ...
        assert no_hooks_left(m)
        assert torch.equal(m(x, **kw).logits, plain)  # ... and afterwards the same code path again


def test_hooks_removed_on_exception():
    m = model("vanilla")
    x, _ = inputs("vanilla", m)

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(m, x, [("blocks.1.attn.hook_pattern", boom)])
    assert no_hooks_left(m)


@pytest.mark.parametrize("name", ["vanilla", "universal", "xl"])
def test_cache_holds_what_the_forward_used(name):
    m = model(name)
    x, kw = inputs(name, m)
    with torch.no_grad():
        out, cache = run_with_cache(m, x, None, **kw)
        last = cache["resid_post", -1]
        # the last residual stream, through the final norm and head, is the logits
        if name == "universal":
            last = cache["hook_act_output"]
        assert torch.equal(m.head.logits(m.body.ln_f(last)), out.logits) or name == "xl"
        if name == "xl":  # the xl body applies dropout (identity in eval) after ln_f
            assert torch.equal(m.head.logits(m.body.drop(m.body.ln_f(last))), out.logits)
        # per head: z = pattern @ v, with the pattern the forward multiplied
        steps = sorted(cache.meta[n]["step"] for n in cache if n.endswith("attn.hook_pattern"))
        for s in steps:
            p, v, z = cache["pattern", s], cache["v", s], cache["z", s]
            torch.testing.assert_close(z, (p @ v).transpose(1, 2), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
            if name != "xl":  # the logits the softmax read
                assert torch.equal(cache["scores", s].softmax(-1), p)
        if name == "xl":
            mem = cache["blocks.0.attn.hook_mem"]
            assert torch.equal(mem, kw["state"][0])  # the memory actually used
            assert cache.meta["blocks.0.attn.hook_pattern"]["n_memory"] == 5
            assert int(cache.meta["blocks.0.attn.hook_pattern"]["is_memory"].sum()) == 5


@pytest.mark.parametrize("name", ["vanilla", "universal"])
def test_replacing_hook_changes_the_output_accordingly(name):
    m = model(name)
    x, kw = inputs(name, m)
    last = 1 if name == "vanilla" else 2
    with torch.no_grad():
        clean = m(x).logits
        zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
        out, cache = run_with_cache(
            m, x, [act_name("resid_mid", last, m), act_name("mlp_out", last, m)], fwd_hooks=[(act_name("mlp_out", last, m), zero)]
        )
        assert torch.equal(cache["mlp_out", last], torch.zeros_like(cache["mlp_out", last]))
        # with the MLP output ablated the last block's output is its residual-mid stream
        expect = m.head.logits(m.body.ln_f(cache["resid_mid", last]))
        torch.testing.assert_close(out.logits, expect, atol=1e-6, rtol=0)
        assert (out.logits - clean).abs().max() > 1e-4
    assert no_hooks_left(m)


def test_names_filter_caches_only_the_named_points():
    m = model("vanilla")
    x, _ = inputs("vanilla", m)
    names = ["blocks.0.hook_resid_post", "steps.1.attn.hook_pattern"]
    _, cache = run_with_cache(m, x, names)
    assert set(cache) == {"blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"}
    _, cache = run_with_cache(m, x, lambda n: n.endswith("mlp.hook_post"))
    assert set(cache) == {"blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"}
    _, cache = run_with_cache(m, x, "hook_embed")
    assert list(cache) == ["hook_embed"]
    assert no_hooks_left(m)
    # caching points other than hook_pattern / hook_scores keeps the fused attention path: same bits
    with torch.no_grad():
        out, _ = run_with_cache(m, x, lambda n: not n.endswith(("hook_pattern", "hook_scores")))
        assert torch.equal(out.logits, m(x).logits)


def test_universal_step_names_fire_at_their_step_only():
    m = model("universal")
    x, _ = inputs("universal", m)
    seen = []
    run_with_hooks(m, x, [("steps.1.attn.hook_pattern", lambda a, h: seen.append(m.body.current_step))])
    assert seen == [1]
    _, cache = run_with_cache(m, x, lambda n: n.endswith("attn.hook_pattern"))
    assert [cache.meta[n]["step"] for n in cache] == [0, 1, 2]
    assert cache.stack("pattern").shape == (3, 2, 4, 9, 9) and torch.equal(cache.stack("pattern")[2], cache["pattern", -1])
    assert not torch.equal(cache["pattern", 0], cache["pattern", 2])
    # a replacement at one step only
    with torch.no_grad():
        clean = m(x).logits
        patched = run_with_hooks(m, x, [("steps.2.hook_resid_post", lambda a, h: a * 0)]).logits
        # the last step's state is zeroed, so every position's output is ln_f(0) through the head
        expect = m.head.logits(m.body.ln_f(torch.zeros(2, 9, 32)))
        torch.testing.assert_close(patched, expect)
        assert (patched - clean).abs().max() > 1e-4


def test_universal_act_halting_hooks_and_active_mask():
    m = model("universal_act")
    x, _ = inputs("universal_act", m)

    def halt_first_three(p, hook):
        p = p.clone()
        p[:, :3] = 1.0
        return p

    _, cache = run_with_cache(m, x, lambda n: n.endswith("hook_active"), fwd_hooks=[("steps.0.hook_halting_prob", halt_first_three)])
    assert cache["steps.0.hook_active"].all()
    assert not cache["steps.1.hook_active"][:, :3].any() and cache["steps.1.hook_active"][:, 3:].all()
