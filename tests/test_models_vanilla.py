"""Vanilla body and the LanguageModel around it: the properties that make results trustworthy."""

from __future__ import annotations

import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.models import SequenceClassifier, VanillaBody, build_body, build_language_model, sample_next

V = 37


def lm(**kw):
    cfg = {"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0, "max_len": 64}
    cfg.update(kw)
    torch.manual_seed(0)
    return build_language_model(cfg, V).eval()


POSITION_KINDS = {
    "learned": {"positions": "learned"},
    "sinusoidal": {"positions": "sinusoidal"},
    "rotary": {"positions": "none", "rotary": True},
}


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("positions", sorted(POSITION_KINDS))
def test_decoder_is_causal(norm_first, positions):
    model = lm(norm_first=norm_first, **POSITION_KINDS[positions])
    x = torch.randint(0, V, (3, 20))
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, V, y[:, t + 1 :].shape)
        y[:, t + 1 :] = (y[:, t + 1 :] + 1) % V  # guarantee a change after t
        a, b = model(x).logits, model(y).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
        if t < 19:
            assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4  # the future did change


def test_encoder_sees_both_directions():
    model = lm(causal=False)
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V
    assert (model(x).logits[:, 0] - model(y).logits[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_decoding_equals_full_forward(norm_first, positions):
    model = lm(norm_first=norm_first, **POSITION_KINDS[positions])
    x = torch.randint(0, V, (2, 24))
    full = model(x).logits
    cache = model.body.new_cache()
    steps = [model(x[:, :5], cache=cache).logits]  # a prompt, then one token at a time
    for t in range(5, 24):
        steps.append(model(x[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 24


@pytest.mark.parametrize("causal", [True, False])
def test_padding_has_no_effect_on_real_positions(causal):
    model = lm(causal=causal)
    x = torch.randint(0, V, (2, 10))
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[:, 10:] = True
    junk = torch.randint(0, V, (2, 6))
    padded = torch.cat([x, junk], 1)
    out = model(padded, padding_mask=pad).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :10], model(x).logits, atol=1e-5, rtol=1e-5)
    other = model(torch.cat([x, (junk + 3) % V], 1), padding_mask=pad).logits
    torch.testing.assert_close(other[:, :10], out[:, :10], atol=1e-6, rtol=0)


def test_loss_is_mean_nll_and_ignores_minus_100():
    model = lm()
    x = torch.randint(0, V, (2, 8))
    tgt = torch.randint(0, V, (2, 8))
    tgt[0, :3] = -100
    out = model(x, tgt)
    logp = model(x).logits.log_softmax(-1)
    keep = tgt != -100
    ref = -logp[keep].gather(-1, tgt[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    assert out.n_tokens == int(keep.sum()) and (out.nll[~keep] == 0).all()


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied, untied = lm(), lm(tie_embeddings=False)
    assert tied.head.weight is tied.embed.tok.weight
    assert untied.head.weight is not untied.embed.tok.weight


def test_gpt2_init_scales_residual_projections():
    model = lm(n_layers=8, d_model=64, init_std=0.02)
    blk = model.body.blocks[0]
    assert abs(blk.attn.qkv.weight.std().item() - 0.02) < 0.003
    assert abs(blk.attn.out.weight.std().item() - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert blk.attn.qkv.bias.abs().max() == 0


def test_generate_greedy_matches_argmax_chain_and_respects_lengths():
    model = lm()
    prompt = torch.randint(0, V, (2, 3))
    out = model.generate(prompt, 10, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :3], prompt)
    seq = prompt
    for _ in range(10):  # the reference: full recompute every step
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    # past max_len the model keeps generating on a sliding window
    assert lm(max_len=8).generate(prompt, 12, temperature=0).shape == (2, 15)


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    # p(0)=0.72, p(1)=0.27: top_p=0.5 keeps only the first token
    assert {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} == {0}
    assert {int(sample_next(logits, 1.0, top_p=0.9, generator=g)) for _ in range(300)} == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


def test_vanilla_body_refuses_state():
    model = lm()
    with pytest.raises(ValueError, match="stateless"):
        model(torch.zeros(1, 4, dtype=torch.long), state=[torch.zeros(1)])


def test_return_attention_gives_row_stochastic_causal_maps():
    model = lm()
    out = model(torch.randint(0, V, (2, 6)), return_attention=True)
    assert len(out.aux.attentions) == 2
    a = out.aux.attentions[0]
    assert a.shape == (2, 4, 6, 6)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 6))
    assert a.triu(1).abs().max() == 0


def test_encoder_classifier_cls_pooling_trains():
    torch.manual_seed(0)
    body = VanillaBody(d_model=16, n_layers=1, n_heads=2, dropout=0.0, causal=False)
    clf = SequenceClassifier(body, vocab_size=10, n_classes=2, pooling="cls", max_len=16)
    x = torch.randint(2, 10, (32, 8))
    x[:, 0] = 1  # [CLS]
    y = (x[:, 1:] == 5).any(1).long()  # is there a 5 anywhere after [CLS]?
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    first = clf(x, y).loss.item()
    for _ in range(60):
        opt.zero_grad()
        clf(x, y).loss.backward()
        opt.step()
    assert clf(x, y).loss.item() < 0.3 * first
    with pytest.raises(ValueError, match="bidirectional"):
        SequenceClassifier(VanillaBody(d_model=32, n_layers=1, n_heads=4), 10, 2)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"n_heads": 5}, "model.n_heads"),
        ({"body": "nope"}, "model.body"),
        ({"n_layer": 3}, "model.n_layer"),
        ({"positions": "rotary"}, "model.positions"),
        ({"rotary": True, "rotary_fraction": 0.0}, "model.rotary_fraction"),
        ({"rotary": True, "rotary_fraction": 0.05}, "model.rotary_fraction"),
        ({"rotary": True, "rotary_base": 1.0}, "model.rotary_base"),
        ({"activation": "tanh"}, "model.activation"),
        ({"n_layers": 0}, "model.n_layers"),
    ],
)
def test_bad_model_config_names_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        lm(**bad)
    assert str(e.value).startswith(field)


def test_learned_positions_refuse_sequences_past_max_len():
    model = lm(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_fused_cross_entropy_matches_autograd_reference():
    from xvariants.models.heads import token_nll

    torch.manual_seed(0)
    logits = torch.randn(12, 9, requires_grad=True)
    targets = torch.randint(0, 9, (12,))
    targets[[2, 7]] = -100
    weights = torch.rand(12)
    ours = token_nll(logits, targets)
    (ours * weights).sum().backward()
    g_ours = logits.grad.clone()
    logits.grad = None
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, logits.grad)
    assert (ours[[2, 7]] == 0).all() and (g_ours[[2, 7]] == 0).all()


def test_rotary_scores_depend_on_distance_only():
    from xvariants.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    rope = RotaryEmbedding(16, fraction=0.75)
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    scores = lambda off: rope(q, off) @ rope(k, off).transpose(-1, -2)  # noqa: E731
    torch.testing.assert_close(scores(0), scores(37), atol=1e-4, rtol=1e-4)  # shifting both: same scores
    assert (scores(0) - q @ k.transpose(-1, -2)).abs().max() > 1e-2  # and positions do matter
    torch.testing.assert_close(rope(q, 5)[..., 12:], q[..., 12:])  # channels past the fraction pass through
    torch.testing.assert_close(rope(q, 5).norm(dim=-1), q.norm(dim=-1))  # a rotation keeps norms


def test_rotary_model_has_no_length_limit_and_sees_order():
    model = lm(positions="none", rotary=True, max_len=8)
    x = torch.randint(0, V, (1, 40))
    assert model(x).logits.shape == (1, 40, V)  # no position table to run out of
    swapped = x.clone()
    swapped[0, [3, 4]] = x[0, [4, 3]]
    assert (model(x).logits[0, 10] - model(swapped).logits[0, 10]).abs().max() > 1e-4  # order matters


def test_bidirectional_body_offers_no_decoding_cache():
    enc = build_body("vanilla", d_model=16, n_layers=1, n_heads=2, causal=False)
    assert enc.new_cache() is None
    with pytest.raises(ValueError, match="no decoding cache"):
        enc(torch.randn(1, 3, 16), cache=build_body("vanilla", d_model=16, n_layers=1, n_heads=2).new_cache())
