"""Transformer-XL body: translation invariance, causality, same_length, attention maps,
generation from memory, init, and the configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xvariants.models import LanguageModel, build_language_model
from xvariants.models.xl import XLBody


pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
ROOT = Path(__file__).resolve().parents[1]


def make_lm(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=24, n_layers=2, n_heads=3, mem_len=6, dropout=0.0, init_std=0.2)
    args.update(kw)
    return LanguageModel(XLBody(**args), V, embed_scale=True, init_std=0.2).to(dtype).eval()


def run_stream(lm, tokens, seg_len, return_attention=False):
    state, outs, attn = None, [], []
    with torch.no_grad():
        for seg in tokens.split(seg_len, dim=1):
            o = lm(seg, state=state, return_attention=return_attention)
            state = o.state
            outs.append(o.hidden)
            attn.append(o.aux.attentions)
    return torch.cat(outs, 1), attn


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_translation_invariance(norm_first):
    """A periodic stream: with same_length every query sees the same window of keys at the same
    relative distances, so the output at t and t + period agree wherever the window is
    (positions inside different segments, different absolute offsets)."""
    lm = make_lm(norm_first=norm_first, same_length=True)
    period = torch.randint(0, V, (1, 3))
    tokens = period.repeat(1, 20)  # 60 tokens, segments of 4: a window's offset inside its segment varies
    out, _ = run_stream(lm, tokens, 4)
    steady = slice(14, 57)  # after the receptive field (n_layers * mem_len) is filled
    shifted = slice(17, 60)
    torch.testing.assert_close(out[:, steady], out[:, shifted], rtol=0, atol=1e-9)
    # the test can fail: without same_length the key count depends on the place in the segment
    lm.body.same_length = False
    out2, _ = run_stream(lm, tokens, 4)
    assert (out2[:, steady] - out2[:, shifted]).abs().max() > 1e-3


def test_same_window_same_output_at_any_offset():
    """A window fed after unrelated segments (memory dropped) equals the window fed first:
    nothing in the model depends on absolute positions."""
    lm = make_lm(mem_len=0)
    window = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        first = lm(window).hidden
        state = None
        for _ in range(3):
            state = lm(torch.randint(0, V, (2, 7)), state=state).state
        later = lm(window, state=state).hidden  # mem_len=0: the memory is empty
    torch.testing.assert_close(first, later, rtol=0, atol=1e-12)


@pytest.mark.parametrize("same_length", [False, True])
def test_causality_within_segment_and_memory(same_length):
    lm = make_lm(same_length=same_length)
    a = torch.randint(0, V, (2, 12))
    b = a.clone()
    t = 8
    b[:, t + 1 :] = torch.randint(0, V, (2, 12 - t - 1))
    out_a, _ = run_stream(lm, a, 6)
    out_b, _ = run_stream(lm, b, 6)
    torch.testing.assert_close(out_a[:, : t + 1], out_b[:, : t + 1], rtol=0, atol=0)
    assert (out_a[:, t + 1 :] - out_b[:, t + 1 :]).abs().max() > 1e-3


def test_same_length_every_query_sees_mem_len_keys_in_steady_state():
    mem_len, T = 5, 3
    lm = make_lm(mem_len=mem_len, same_length=True, n_layers=3)
    tokens = torch.randint(0, V, (2, 4 * T))
    _, attns = run_stream(lm, tokens, T, return_attention=True)
    last = attns[-1]  # memory full (9 positions seen before, 5 kept)
    assert len(last) == 3
    for w in last:
        assert w.shape == (2, 3, T, mem_len + T)
        assert ((w > 0).sum(-1) == mem_len).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, T, dtype=w.dtype))
    first = attns[0]  # no memory yet: at most mem_len keys (here all causal ones, T < mem_len)
    for w in first:
        assert ((w > 0).sum(-1) == torch.arange(1, T + 1)).all()
    # without same_length query i sees all mem_len memory keys plus i + 1 segment keys
    lm.body.same_length = False
    _, attns = run_stream(lm, tokens, T, return_attention=True)
    for w in attns[-1]:
        assert ((w > 0).sum(-1) == mem_len + torch.arange(1, T + 1)).all()


def test_attention_maps_only_on_request():
    lm = make_lm()
    x = torch.randint(0, V, (1, 4))
    assert lm(x).aux.attentions is None
    out = lm(x, return_attention=True)
    assert len(out.aux.attentions) == 2 and out.aux.attentions[0].shape == (1, 3, 4, 4)


def test_padding_mask_hides_padded_keys():
    lm = make_lm()
    x = torch.randint(0, V, (1, 6))
    pad = torch.tensor([[False, False, True, False, False, False]])
    with torch.no_grad():
        out = lm(x, padding_mask=pad, return_attention=True)
        x2 = x.clone()
        x2[0, 2] = (x[0, 2] + 1) % V
        out2 = lm(x2, padding_mask=pad)
    for w in out.aux.attentions:
        assert (w[0, :, 3:, 2] == 0).all()  # later queries never read the padded key
    torch.testing.assert_close(out.hidden[:, 3:], out2.hidden[:, 3:])
    with pytest.raises(ValueError, match="padding_mask must be"):
        lm(x, padding_mask=pad[:, :3])


def test_generation_continues_from_memory_without_recomputing_prefix():
    lm = make_lm(mem_len=32, dtype=torch.float32)
    prompt = torch.randint(0, V, (2, 5))
    fed = []
    hook = lm.body.register_forward_pre_hook(lambda m, args: fed.append(args[0].size(1)))
    out = lm.generate(prompt, 8, temperature=0)
    hook.remove()
    assert out.shape == (2, 13)
    assert fed == [5] + [1] * 7  # the prompt once, then one new token per step
    # greedy decoding with memory equals greedy decoding that recomputes everything
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = lm(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generation_with_short_memory_still_one_token_per_step():
    lm = make_lm(mem_len=3, dtype=torch.float32)
    fed = []
    hook = lm.body.register_forward_pre_hook(lambda m, args: fed.append(args[0].size(1)))
    lm.generate(torch.randint(0, V, (1, 4)), 6, temperature=1.0, top_k=5)
    hook.remove()
    assert fed == [4] + [1] * 5


def test_init_follows_original():
    torch.manual_seed(0)
    body = XLBody(d_model=128, n_layers=2, n_heads=4, mem_len=4)
    ln = body.blocks[0].ln1.weight
    assert not torch.all(ln == 1.0) and abs(ln.mean().item() - 1.0) < 0.01 and abs(ln.std().item() - 0.02) < 0.005
    w = body.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert abs(body.blocks[1].attn.out.weight.std().item() - 0.02) < 0.002  # no GPT-2 depth scaling
    assert body.blocks[0].mlp.fc1.bias.abs().max() == 0
    assert abs(body.r_w_bias.std().item() - 0.02) < 0.006
    assert body.blocks[0].attn.qkv.bias is None and body.blocks[0].attn.r_net.bias is None
    # u/v shared across layers by default, owned per layer with untie_r
    names = {n for n, _ in body.named_parameters()}
    assert "r_w_bias" in names and not any(n.endswith("attn.r_w_bias") for n in names)
    untied = {n for n, _ in XLBody(d_model=16, n_layers=2, n_heads=2, mem_len=4, untie_r=True).named_parameters()}
    assert "r_w_bias" not in untied and "blocks.1.attn.r_r_bias" in untied


def test_dropout_sites_active_in_training():
    lm = make_lm(dropout=0.3, dtype=torch.float32)
    x = torch.randint(0, V, (1, 6))
    lm.train()
    a, b = lm(x).hidden, lm(x).hidden
    assert not torch.allclose(a, b)
    lm.eval()
    torch.testing.assert_close(lm(x).hidden, lm(x).hidden)


# ------------------------------------------------------------------- configs
EXPERIMENTS = {
    "xl_shakespeare_char_cpu": 65,
    "xl_ptb_word_cpu": 10000,
    "xl_enwik8_base": 256,
    "xl_text8_base": 27,
    "xl_wt103_base": 267735,
}


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    os.environ.setdefault("XVARIANTS_ROOT", str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.data, resolve=True), cfg


def test_model_xl_config_builds():
    model, data, _ = _compose(["model=xl", "data=ptb_word"])
    assert model["body"] == "xl" and model["mem_len"] == data["seq_len"] and model["embed_scale"] is True
    lm = build_language_model(model, 100)
    assert isinstance(lm.body, XLBody) and lm.embed.pos is None
    assert lm.embed.scale == pytest.approx(128**0.5)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiments_compose_validate_and_build(name):
    from xvariants.training.validate import validate_model

    model, data, cfg = _compose([f"experiment={name}"])
    validate_model(model, data)
    assert data["batching"] == "ordered"
    ev = cfg.eval
    assert {"seq_len", "mem_len", "clamp_len", "same_length"} <= set(ev)
    with torch.device("meta"):  # full-size models: shapes only, no memory
        lm = build_language_model(model, EXPERIMENTS[name])
    n = sum(p.numel() for p in lm.parameters())
    if name == "xl_enwik8_base":
        assert model["n_layers"] == 12 and model["mem_len"] == 512 and (ev.mem_len, ev.clamp_len, ev.seq_len) == (2100, 820, 80)
        assert 40e6 < n < 42e6  # paper: 41M
    if name == "xl_wt103_base":
        assert model["adaptive_cutoffs"] == [20000, 40000, 200000] and (ev.seq_len, ev.mem_len, ev.clamp_len) == (64, 640, 400)
        assert 150e6 < n < 152e6  # paper: 151M
    if name.endswith("_cpu"):
        lm.body.set_eval_lengths(ev.mem_len, ev.clamp_len, ev.same_length)
        assert n < 3e6
