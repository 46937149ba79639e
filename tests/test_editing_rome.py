"""ROME (xvariants/editing/rome.py) on tiny random models: the rank-one algebra, the equality
constraint W' k0 = v*, exact undo, every body (XL runs on its current segment), and GPT-2's
Conv1D layout through the Hugging Face adapter."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from tests.editing_common import FAST_ROME, IDS, RECORDS, STATS_IDS, TOK, make_lm, same_weights, weights
from xvariants.editing import EditRequest, EditResult, collect_key_stats, key_stats, preserved, rome_edit
from xvariants.editing.requests import encode_request
from xvariants.editing.stats import stream_batches
from xvariants.interpret import run_with_cache
from xvariants.interpret.mlp_memory import mlp_memory

pytestmark = pytest.mark.usefixtures("one_thread")
REQUEST = EditRequest.from_record(RECORDS[0])


def stats_of(lm, layer=0):
    return key_stats(lm, layer, STATS_IDS, corpus="facts_tiny+random", n_tokens=3072, seq_len=64)


def bare_key_value(lm, mem, request=REQUEST):
    """The key and MLP output at the subject's last token of the bare prompt, read directly."""
    enc = encode_request(TOK, request)
    _, cache = run_with_cache(lm, torch.tensor([enc.ids]), [mem.key_hook, mem.value_hook])
    return cache[mem.key_hook][0, enc.lookup].double(), cache[mem.value_hook][0, enc.lookup].double()


@pytest.mark.parametrize("body", ["vanilla", "xl", "universal-act"])
def test_rank_one_update_maps_k0_to_v_star_and_undoes_exactly(body):
    lm = make_lm(body)
    before = weights(lm)
    st = stats_of(lm)
    result = rome_edit(lm, TOK, REQUEST, layer=0, stats=st, options=FAST_ROME)
    mem = mlp_memory(lm, 0)
    (delta,) = result.deltas.values()
    assert result.rank() == 1 and torch.linalg.matrix_rank(delta).item() == 1
    assert delta.abs().max() > 0
    k0, v0 = bare_key_value(lm, mem)
    assert torch.allclose(k0, result.info["k0"], atol=1e-10)
    edited = mem.apply(k0.to(mem.weight.dtype)).double()
    assert torch.allclose(edited, result.info["v_star"], atol=1e-8)
    assert torch.allclose(v0, result.info["v_star"], atol=1e-8)  # the model now writes v* there
    # the direction is C⁻¹k*: ΔW x = 0 for every x with (C⁻¹k*)·x = 0
    u = torch.linalg.solve(st.moment, result.info["k_star"])
    x = torch.randn(u.numel(), dtype=torch.float64)
    x -= (x @ u) / (u @ u) * u
    assert (delta @ x).abs().max() < 1e-10 * delta.abs().max() * x.norm()
    result.restore()
    assert same_weights(lm, before)


def test_universal_xl_without_the_second_moment():
    """The random universal_xl's ReLU MLP has units that fire on a handful of tokens (C is
    singular on them); without mom2_adjustment ROME needs no C and the constraint still holds."""
    lm = make_lm("universal_xl")
    before = weights(lm)
    opts = replace(FAST_ROME, mom2_adjustment=False)
    mem = mlp_memory(lm, 1)
    k0, _ = bare_key_value(lm, mem)  # step 1's key moves once step 0 uses the edited weight: read it first
    with rome_edit(lm, TOK, REQUEST, layer=1, stats=None, options=opts) as result:
        assert torch.allclose(k0, result.info["k0"], atol=1e-12)
        assert torch.allclose(mem.apply(k0), result.info["v_star"], atol=1e-8)
        assert torch.allclose(result.info["u"], result.info["k_star"] / result.info["k_star"].norm())
    assert same_weights(lm, before)


def test_float32_edit_and_context_manager_restore_bit_for_bit():
    lm = make_lm("vanilla", torch.float32)
    before = weights(lm)
    with rome_edit(lm, TOK, RECORDS[3], layer=0, stats=stats_of(lm), options=FAST_ROME) as result:
        assert result.applied and not same_weights(lm, before)
        mem = mlp_memory(lm, 0)
        k0, _ = bare_key_value(lm, mem, EditRequest.from_record(RECORDS[3]))
        assert torch.allclose(mem.apply(k0.float()).double(), result.info["v_star"], rtol=1e-4, atol=1e-4)
    assert not result.applied and same_weights(lm, before)


def test_apply_false_leaves_the_model_and_apply_later_gives_the_same_weights():
    lm = make_lm()
    before = weights(lm)
    st = stats_of(lm, 1)
    applied = rome_edit(lm, TOK, REQUEST, layer=1, stats=st, options=FAST_ROME)
    after = weights(lm)
    applied.restore()
    lazy = rome_edit(lm, TOK, REQUEST, layer=1, stats=st, options=FAST_ROME, apply=False)
    assert same_weights(lm, before) and not lazy.applied
    lazy.apply()
    assert same_weights(lm, after)
    with pytest.raises(RuntimeError, match="already applied"):
        lazy.apply()
    lazy.restore()
    assert same_weights(lm, before)


def test_sequential_edits_restore_with_preserved():
    lm = make_lm()
    before = weights(lm)
    st = stats_of(lm)
    with preserved(mlp_memory(lm, 0)):
        results = [rome_edit(lm, TOK, r, layer=0, stats=st, options=FAST_ROME) for r in RECORDS[:3]]
        assert all(isinstance(r, EditResult) for r in results)
        assert not same_weights(lm, before)
    assert same_weights(lm, before)


def test_losses_follow_the_original_loop():
    lm = make_lm()
    opts = replace(FAST_ROME, v_num_grad_steps=6, early_stop_loss=-1.0)
    result = rome_edit(lm, TOK, REQUEST, layer=0, stats=stats_of(lm), options=opts, apply=False)
    losses = result.info["losses"]
    assert len(losses) == 6  # no early stop: every iteration is recorded, the last makes no step
    assert losses[0]["kl"] == 0 and losses[0]["weight_decay"] == 0  # δ starts at zero
    assert losses[-1]["nll"] < losses[0]["nll"]
    assert result.info["delta"].norm() <= opts.clamp_norm_factor * result.info["v_init"].norm() + 1e-9
    assert len(result.info["prefixes"]) == 3 and result.info["prefixes"][0] == ""


def test_stats_must_be_of_the_edited_layer_and_width():
    lm = make_lm()
    from xvariants.editing import StatsError

    with pytest.raises(StatsError, match="do not belong to the edited layer 1"):
        rome_edit(lm, TOK, REQUEST, layer=1, stats=stats_of(lm, 0), options=FAST_ROME)
    other = collect_key_stats(make_lm("vanilla"), 0, stream_batches(IDS, 768, 64, 16))
    assert other.count == 768


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_gpt2_conv1d_layout_through_the_hf_adapter():
    import transformers

    from xvariants.interpret.hf_causal import HookedCausalLM

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=TOK.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48)
    lm = HookedCausalLM(transformers.GPT2LMHeadModel(cfg)).eval()
    before = weights(lm)
    st = key_stats(lm, 0, IDS, corpus="facts_tiny", n_tokens=768, seq_len=64)
    mem = mlp_memory(lm, 0)
    assert mem.weight_is_in_out  # Conv1D stores [d_mlp, d_model]
    with rome_edit(lm, TOK, REQUEST, layer=0, stats=st, options=FAST_ROME) as result:
        _, v0 = bare_key_value(lm, mem)
        assert torch.allclose(v0, result.info["v_star"], atol=1e-4)
        assert torch.allclose(mem.w_out_in().double() - before["hf.transformer.h.0.mlp.c_proj.weight"].t().double(),
                              result.deltas[mem.path], atol=1e-6)
    assert same_weights(lm, before)


def test_eval_mode_restores_each_module_to_its_own_mode():
    from xvariants.editing.runs import eval_mode

    lm = make_lm()
    lm.train()
    lm.body.eval()  # a part set apart, like a Hugging Face model in eval mode inside a fresh wrapper
    with eval_mode(lm) as inner:
        assert not any(m.training for m in inner.modules())
    assert lm.training and lm.embed.training and not lm.body.training
    assert not any(m.training for m in lm.body.modules())


def test_multi_token_target_with_a_bpe_tokenizer():
    """A target of many BPE tokens: teacher-forced NLL averaged over its tokens; at δ = 0 the
    optimisation's NLL on the bare prompt equals the metrics' independent target_nll."""
    import numpy as np

    from tests.editing_common import TEXT
    from xvariants.data.tokenizers import BPETokenizer
    from xvariants.editing import target_nll
    from xvariants.models import build_language_model

    tok = BPETokenizer.train(TEXT, vocab_size=300)
    torch.manual_seed(0)
    lm = build_language_model({"body": "vanilla", "d_model": 32, "n_heads": 2, "n_layers": 2, "dropout": 0.0},
                              tok.vocab_size).double().eval()
    ids = np.concatenate([tok.encode(TEXT), np.random.default_rng(1).integers(0, tok.vocab_size, 3000)])
    st = key_stats(lm, 0, ids, corpus="bpe", n_tokens=3072, seq_len=64)
    request = EditRequest(REQUEST.prompt, REQUEST.subject, "Stockholmsberg", REQUEST.target_true)
    enc = encode_request(tok, request, target=request.target_new)
    assert len(enc.target) > 3 and tok.decode(list(enc.target)).strip() == "Stockholmsberg"
    expected = target_nll(lm, tok, [request.text()], request.target_new)[0]
    result = rome_edit(lm, tok, request, layer=0, stats=st, prefixes=[""], apply=False, options=FAST_ROME)
    assert result.info["losses"][0]["nll"] == pytest.approx(expected, rel=1e-10)
    result.apply()
    mem = mlp_memory(lm, 0)
    enc = encode_request(tok, request)
    _, cache = run_with_cache(lm, torch.tensor([enc.ids]), [mem.value_hook])
    assert torch.allclose(cache[mem.value_hook][0, enc.lookup], result.info["v_star"], atol=1e-8)
    result.restore()


def test_hand_written_adam_matches_torch():
    from xvariants.editing.values import Adam

    g = torch.Generator().manual_seed(0)
    ours = torch.zeros(5, dtype=torch.float64)
    theirs = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    mine, ref = Adam(ours, lr=0.5, weight_decay=0.1), torch.optim.Adam([theirs], lr=0.5, weight_decay=0.1)
    for _ in range(7):
        grad = torch.randn(5, dtype=torch.float64, generator=g)
        mine.step(grad)
        theirs.grad = grad.clone()
        ref.step()
    assert torch.allclose(ours, theirs.detach(), rtol=1e-14, atol=1e-15)
