"""Relative multi-head attention of Transformer-XL: rel_shift, masks, the fused path, hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xvariants.layers.positions import sinusoid_table
from xvariants.layers.relative_attention import (
    RelativeMultiHeadAttention,
    rel_shift,
    relative_positions,
    xl_attention_mask,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _shift_by_gather(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit re-indexing: column c of ``x`` is distance ``k-1-c``; entry (i, j) wants
    distance ``m + i - j`` (m = k - q). Returns (values, valid) with invalid (future) entries 0."""
    q, k = x.shape[-2:]
    m = k - q
    i = torch.arange(q)[:, None]
    j = torch.arange(k)[None, :]
    dist = m + i - j
    valid = dist >= 0
    col = (k - 1 - dist).clamp(0, k - 1).expand(*x.shape[:-2], q, k)
    return torch.gather(x, -1, col) * valid, valid


@pytest.mark.parametrize("q,k", [(1, 1), (4, 4), (3, 7), (5, 12), (6, 6)])
def test_rel_shift_equals_explicit_gather(q, k):
    torch.manual_seed(0)
    x = torch.randn(2, 3, q, k)
    out = rel_shift(x)
    ref, valid = _shift_by_gather(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out * valid, ref, rtol=0, atol=0)
    # the original's formula, entry by entry
    m = k - q
    for i in range(q):
        for j in range(m + i + 1):
            assert out[1, 2, i, j] == x[1, 2, i, j + q - 1 - i]


def test_rel_shift_matches_original_pad_reshape():
    """Our strided view equals the original's cat/view/slice/view (time-major [q, k, b, h])."""
    torch.manual_seed(1)
    q, k = 5, 9
    x = torch.randn(q, k, 2, 3)
    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]))
    x_padded = torch.cat([zero_pad, x], dim=1).view(x.size(1) + 1, x.size(0), *x.size()[2:])
    original = x_padded[1:].view_as(x)
    ours = rel_shift(x.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
    torch.testing.assert_close(ours, original, rtol=0, atol=0)


def test_rel_shift_gradient_flows_only_to_used_entries():
    x = torch.randn(1, 1, 3, 5, requires_grad=True)
    (rel_shift(x) * xl_attention_mask(3, 2)).sum().backward()
    # every valid output reads a distinct input entry: gradient 1 there, 0 elsewhere
    assert x.grad.sum() == int(xl_attention_mask(3, 2).sum())
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}


def test_relative_positions_layout_and_clamp():
    R = relative_positions(6, 8)
    dist = torch.arange(5, -1, -1.0)
    torch.testing.assert_close(R, sinusoid_table(dist, 8))
    # sines first, then cosines; distance 0 (the last row) = [0]*4 + [1]*4
    torch.testing.assert_close(R[-1], torch.tensor([0.0] * 4 + [1.0] * 4))
    Rc = relative_positions(6, 8, clamp_len=2)
    for d in range(6):
        torch.testing.assert_close(Rc[5 - d], sinusoid_table(torch.tensor([float(min(d, 2))]), 8)[0])


def test_default_mask_is_causal_over_memory():
    allowed = xl_attention_mask(4, 3)
    for i in range(4):
        assert allowed[i].tolist() == [j <= 3 + i for j in range(7)]


@pytest.mark.parametrize("q,m,mem_len", [(4, 6, 6), (4, 0, 6), (4, 3, 6), (8, 0, 5), (3, 5, 5), (1, 5, 5)])
def test_same_length_mask_key_counts(q, m, mem_len):
    allowed = xl_attention_mask(q, m, same_length=True, mem_len=mem_len)
    counts = allowed.sum(-1)
    assert (counts <= mem_len).all()
    for i in range(q):
        assert allowed[i, m + i]  # every query sees itself
        assert not allowed[i, m + i + 1 :].any()  # never the future
    if m == mem_len:  # steady state: exactly mem_len keys, the most recent ones
        assert (counts == mem_len).all()
        for i in range(q):
            assert allowed[i].nonzero().squeeze(1).tolist() == list(range(i + 1, i + 1 + mem_len))


def _reference_attention(attn, x, mem, u, v, clamp_len=-1, allowed=None):
    """Score by explicit distances: position term for (i, j) uses R[m + i - j] directly."""
    B, T, D = x.shape
    H, Dh = attn.n_heads, attn.d_head
    cat = torch.cat([mem, x], 1)
    M = mem.size(1)
    S = M + T
    Wq, Wk, Wv = attn.qkv.weight.split(H * Dh)
    q = (x @ Wq.T).view(B, T, H, Dh)
    k = (cat @ Wk.T).view(B, S, H, Dh)
    val = (cat @ Wv.T).view(B, S, H, Dh)
    dist = (M + torch.arange(T)[:, None] - torch.arange(S)[None, :]).clamp(min=0)
    if clamp_len > 0:
        dist = dist.clamp(max=clamp_len)
    R = sinusoid_table(torch.arange(S).double(), D).to(x.dtype)  # indexed by distance
    Rk = attn.r_net(R).view(S, H, Dh)[dist]  # [T, S, H, Dh]
    ac = torch.einsum("bihd,bjhd->bhij", q + u, k)
    bd = torch.einsum("bihd,ijhd->bhij", q + v, Rk)
    scores = (ac + bd) / math.sqrt(Dh)
    if allowed is None:
        allowed = dist.new_ones(T, S, dtype=torch.bool) & (torch.arange(S)[None] <= M + torch.arange(T)[:, None])
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = torch.einsum("bhij,bjhd->bihd", p, val).reshape(B, T, H * Dh)
    return attn.out(y), p


def _attn(d_model=16, n_heads=2, d_head=None, own=True, seed=0):
    torch.manual_seed(seed)
    attn = RelativeMultiHeadAttention(d_model, n_heads, d_head, own_biases=own).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return attn


@pytest.mark.parametrize("M,T,clamp", [(0, 5, -1), (4, 3, -1), (6, 6, -1), (7, 4, 3)])
def test_attention_matches_explicit_distance_reference(M, T, clamp):
    attn = _attn(d_head=5)  # d_head need not divide d_model
    x = torch.randn(2, T, 16, dtype=torch.float64)
    mem = torch.randn(2, M, 16, dtype=torch.float64)
    r = relative_positions(M + T, 16, clamp, dtype=torch.float64)
    out_fast, none = attn(x, r, mem=mem)
    with torch.no_grad():  # the no-autograd variant (in-place mask, cached W_R R), twice
        out_nograd = [attn(x, r, mem=mem)[0] for _ in range(2)]
    out_slow, w = attn(x, r, mem=mem, need_weights=True)
    ref, p = _reference_attention(attn, x, mem, attn.r_w_bias, attn.r_r_bias, clamp)
    assert none is None
    torch.testing.assert_close(out_fast, ref, rtol=1e-9, atol=1e-10)
    for o in out_nograd:
        torch.testing.assert_close(o, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_slow, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w, p, rtol=1e-9, atol=1e-12)
    # future keys get exactly zero probability
    future = ~xl_attention_mask(T, M)
    assert (w[..., future] == 0).all()


def test_shared_biases_are_used_and_required():
    attn = _attn(own=False)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    r = relative_positions(3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="u and v"):
        attn(x, r)
    u, v = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    out, _ = attn(x, r, u=u, v=v)
    ref, _ = _reference_attention(attn, x, x[:, :0], u, v)
    torch.testing.assert_close(out, ref)
    out2, _ = attn(x, r, u=u + 1.0, v=v)
    assert not torch.allclose(out, out2)


def test_bad_relative_position_shape():
    attn = _attn()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="relative positions"):
        attn(x, relative_positions(4, 16, dtype=torch.float64), mem=x[:, :0])


def test_hooks_content_position_pattern_mem():
    attn = _attn()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    mem = torch.randn(2, 4, 16, dtype=torch.float64)
    r = relative_positions(7, 16, dtype=torch.float64)
    seen = {}
    for name in ("hook_mem", "hook_q", "hook_k", "hook_content_score", "hook_position_score", "hook_pattern", "hook_z"):
        getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach().clone()))
    out_hooked, _ = attn(x, r, mem=mem)
    assert seen["hook_mem"].shape == (2, 4, 16)  # which keys are memory: the first 4
    assert seen["hook_k"].shape == (2, 2, 7, 8)
    assert seen["hook_content_score"].shape == seen["hook_position_score"].shape == (2, 2, 3, 7)
    allowed = xl_attention_mask(3, 4)
    scores = seen["hook_content_score"] + seen["hook_position_score"]  # both already / sqrt(d_head)
    torch.testing.assert_close(seen["hook_pattern"], scores.masked_fill(~allowed, float("-inf")).softmax(-1))
    # listening did not change the result
    attn2 = _attn()
    torch.testing.assert_close(attn2(x, r, mem=mem)[0], out_hooked)


def test_hook_can_edit_position_term():
    attn = _attn()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    r = relative_positions(4, 16, dtype=torch.float64)
    base, _ = attn(x, r)
    h = attn.hook_position_score.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    edited, _ = attn(x, r)
    h.remove()
    assert not torch.allclose(base, edited)
    # equals attention with W_R = 0 (no position term)
    torch.nn.init.zeros_(attn.r_net.weight)
    torch.nn.init.zeros_(attn.r_r_bias)
    torch.testing.assert_close(attn(x, r)[0], edited)


def test_fast_path_uses_sdpa_and_dropout_only_in_training():
    attn = _attn()
    attn.dropout = 0.5
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    r = relative_positions(6, 16, dtype=torch.float64)
    attn.eval()
    a, _ = attn(x, r)
    b, _ = attn(x, r)
    torch.testing.assert_close(a, b)
    attn.train()
    torch.manual_seed(0)
    c, _ = attn(x, r)
    assert not torch.allclose(a, c)
    calls = []
    orig = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append(kw.get("attn_mask").shape)
        return orig(*args, **kw)

    F.scaled_dot_product_attention = spy
    try:
        attn.eval()
        attn(x, r)
    finally:
        F.scaled_dot_product_attention = orig
    assert calls == [torch.Size([1, 2, 6, 6])]
