"""Transformer-XL segment memory: equivalence with one long sequence, contents, no autograd
graph, checkpoint safety, changeable lengths and the bad-input messages."""

from __future__ import annotations

import io

import pytest
import torch

from xvariants.config_errors import ConfigError
from xvariants.layers.memory import check_eval_segment, update_memory, validate_memory
from xvariants.models import LanguageModel
from xvariants.models.xl import XLBody


pytestmark = pytest.mark.usefixtures("one_thread")

V = 50


def make_lm(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_layers=2, n_heads=4, mem_len=8, dropout=0.0, init_std=0.2)
    args.update(kw)
    body = XLBody(**args)
    lm = LanguageModel(body, V, embed_scale=True, init_std=0.2)
    return lm.to(dtype).eval()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("untie_r", [False, True], ids=["shared_uv", "untied_uv"])
def test_memory_equivalence_with_one_long_sequence(norm_first, untie_r):
    lm = make_lm(norm_first=norm_first, untie_r=untie_r, mem_len=10)
    tokens = torch.randint(0, V, (3, 15))
    with torch.no_grad():
        full = lm(tokens).hidden
        s1 = lm(tokens[:, :7])
        s2 = lm(tokens[:, 7:], state=s1.state)
        cold = lm(tokens[:, 7:]).hidden
    torch.testing.assert_close(s1.hidden, full[:, :7], rtol=0, atol=1e-5)
    torch.testing.assert_close(s2.hidden, full[:, 7:], rtol=0, atol=1e-5)
    # the test can fail: segment 2 without its memory is a different computation
    assert (cold - full[:, 7:]).abs().max() > 1e-2


def test_memory_equivalence_three_segments_float64():
    lm = make_lm(dtype=torch.float64, mem_len=12, n_layers=3)
    tokens = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = lm(tokens).hidden
        state, outs = None, []
        for seg in tokens.split(4, dim=1):
            o = lm(seg, state=state)
            state, outs = o.state, outs + [o.hidden]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)


def test_memory_contents_are_layer_inputs_most_recent_kept():
    lm = make_lm(mem_len=5)
    tokens = torch.randint(0, V, (2, 7))
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in lm.body.blocks]
    with torch.no_grad():
        out = lm(tokens[:, :4])
        out2 = lm(tokens[:, 4:], state=out.state)
    for h in hooks:
        h.remove()
    state = out.state
    assert isinstance(state, list) and len(state) == 3  # n_layers + 1
    assert all(s.shape == (2, 4, 32) for s in state)  # 4 < mem_len: everything kept
    emb = lm.embed(tokens[:, :4])
    torch.testing.assert_close(state[0], emb)  # entry 0 = embedding output
    torch.testing.assert_close(state[1], inputs[1])  # entry 1 = input of layer 2 = output of layer 1
    # second segment: 4 + 3 = 7 positions seen, the most recent 5 kept
    assert all(s.shape == (2, 5, 32) for s in out2.state)
    torch.testing.assert_close(out2.state[0], lm.embed(tokens)[:, 2:])


def test_update_memory_detaches_and_truncates():
    hids = [torch.randn(2, 6, 4, requires_grad=True) * 2 for _ in range(3)]
    new = update_memory(None, hids, mem_len=4)
    assert all(not m.requires_grad and m.grad_fn is None for m in new)
    assert all(m.shape == (2, 4, 4) for m in new)
    torch.testing.assert_close(new[1], hids[1][:, 2:].detach())
    # a sliced memory owns just its own storage, not the whole segment's
    assert new[0].untyped_storage().nbytes() == new[0].numel() * new[0].element_size()
    again = update_memory(new, [h[:, :1] for h in hids], mem_len=4)
    torch.testing.assert_close(again[2], torch.cat([hids[2][:, 3:], hids[2][:, :1]], 1).detach())
    assert [m.size(1) for m in update_memory(new, hids, mem_len=0)] == [0, 0, 0]


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_memory_holds_no_graph_and_stays_flat_over_training_steps():
    torch.manual_seed(0)
    lm = make_lm(mem_len=6, dropout=0.1)
    lm.train()
    opt = torch.optim.Adam(lm.parameters(), lr=1e-3)
    stream = torch.randint(0, V, (2, 6 * 12 + 1))
    state, sizes, nbytes = None, [], []
    for i in range(12):
        seg = stream[:, i * 6 : i * 6 + 7]
        out = lm(seg[:, :-1], seg[:, 1:], state=state)
        sizes.append(_graph_size(out.loss))
        out.loss.backward()  # a second backward through a freed graph would raise here
        opt.step()
        opt.zero_grad()
        state = out.state  # NOT detached by us: the body must return a graph-free memory
        assert all(not s.requires_grad and s.grad_fn is None for s in state)
        nbytes.append(sum(s.untyped_storage().nbytes() for s in state))
    assert len(set(sizes[1:])) == 1, sizes  # the graph does not grow with the number of segments
    assert sizes[1] > sizes[0]  # (it does include the memory path from step 2 on)
    assert len(set(nbytes)) == 1, nbytes  # memory buffers stay the same size


def test_state_is_checkpoint_safe_and_continues_identically():
    lm = make_lm()
    tokens = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        s1 = lm(tokens[:, :6])
        buf = io.BytesIO()
        torch.save({"state": s1.state}, buf)
        buf.seek(0)
        restored = torch.load(buf, weights_only=True)["state"]
        a = lm(tokens[:, 6:], state=s1.state).hidden
        b = lm(tokens[:, 6:], state=restored).hidden
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_init_state_is_empty_and_equivalent_to_none():
    lm = make_lm()
    state = lm.body.init_state(3, torch.device("cpu"))
    assert len(state) == 3 and all(s.shape == (3, 0, 32) for s in state)
    tokens = torch.randint(0, V, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(lm(tokens, state=state).hidden, lm(tokens).hidden)


def test_longer_memory_at_evaluation():
    lm = make_lm(mem_len=4)
    body = lm.body
    tokens = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        full = lm(tokens).hidden
        with body.lengths(mem_len=12):
            state = lm(tokens[:, :12]).state
            assert state[0].size(1) == 12
            seg = lm(tokens[:, 12:], state=state).hidden
        assert body.mem_len == 4  # restored
        torch.testing.assert_close(seg, full[:, 12:], rtol=0, atol=1e-5)
        # back at mem_len 4 the long memory is cut to its most recent 4 positions
        short = lm(tokens[:, 12:], state=state)
        assert short.state[0].size(1) == 4
        ref = lm(tokens[:, 12:], state=[s[:, -4:] for s in state]).hidden
        torch.testing.assert_close(short.hidden, ref)
    body.set_eval_lengths(mem_len=20, clamp_len=6, same_length=True)
    assert (body.mem_len, body.clamp_len, body.same_length) == (20, 6, True)
    body.mem_len = 3
    assert body.mem_len == 3


# ------------------------------------------------------------------ bad input
def test_negative_mem_len():
    with pytest.raises(ConfigError, match="model.mem_len: must be an integer >= 0"):
        XLBody(d_model=16, n_layers=1, n_heads=2, mem_len=-1)
    body = XLBody(d_model=16, n_layers=1, n_heads=2, mem_len=4)
    with pytest.raises(ConfigError, match="mem_len"):
        body.mem_len = -3


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_clamp_len_value(bad):
    with pytest.raises(ConfigError, match="model.clamp_len: must be -1 \\(off\\) or an integer >= 1"):
        XLBody(d_model=16, n_layers=1, n_heads=2, mem_len=4, clamp_len=bad)


def test_clamp_len_larger_than_any_distance():
    lm = make_lm(mem_len=4, clamp_len=100)
    with pytest.raises(ConfigError, match="clamp_len=100 never clamps: the longest distance with mem_len=4 and segment length 5 is 8"):
        lm(torch.randint(0, V, (1, 5)))
    lm.body.clamp_len = 8  # the longest distance itself is allowed
    lm(torch.randint(0, V, (1, 5)))


def test_same_length_needs_memory():
    with pytest.raises(ConfigError, match="same_length"):
        XLBody(d_model=16, n_layers=1, n_heads=2, mem_len=0, same_length=True)


def test_memory_from_other_batch_size():
    lm = make_lm()
    state = lm(torch.randint(0, V, (2, 4))).state
    with pytest.raises(ValueError, match="memory holds 2 streams but the batch has 3"):
        lm(torch.randint(0, V, (3, 4)), state=state)


def test_memory_from_other_model():
    lm = make_lm(n_layers=2)
    deeper = make_lm(n_layers=3)
    wider = make_lm(d_model=16, n_heads=2)
    x = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="memory has 4 tensors but this model keeps 3 .*another depth"):
        lm(x, state=deeper(x).state)
    with pytest.raises(ValueError, match="width 16 but this model has d_model=32"):
        lm(x, state=wider(x).state)
    with pytest.raises(ValueError, match="must be a list of 3 tensors"):
        lm(x, state=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="different lengths"):
        validate_memory([torch.zeros(2, 3, 32), torch.zeros(2, 4, 32), torch.zeros(2, 4, 32)],
                        n_tensors=3, batch_size=2, d_model=32)


def test_decoding_cache_is_refused():
    lm = make_lm()
    assert lm.body.new_cache() is None
    from xvariants.layers.attention import DecodingCache

    with pytest.raises(ValueError, match="not in a decoding cache"):
        lm.body(torch.randn(1, 3, 32), cache=DecodingCache(2))


def test_eval_segment_longer_than_split():
    check_eval_segment(80, 1000)
    with pytest.raises(ConfigError, match="eval.seq_len: segment length 2000 is longer than each evaluation stream \\(1000 tokens\\)"):
        check_eval_segment(2000, 1000)


# ------------------------------------------------- memory key/value reuse (no grad)
def _segments(lm, tokens, seg, state=None):
    outs = []
    with torch.no_grad():
        for s in tokens.split(seg, dim=1):
            o = lm(s, state=state)
            state = o.state
            outs.append(o.hidden)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_memory_kv_reuse_is_exact_and_used(norm_first, monkeypatch):
    from xvariants.layers import memory_kv as ra

    lm = make_lm(dtype=torch.float64, mem_len=7, norm_first=norm_first)
    tokens = torch.randint(0, V, (2, 30))
    lm.body.memory_kv_cache = False
    ref, _ = _segments(lm, tokens, 3)
    lm.body.memory_kv_cache = True
    calls = []
    orig = ra.MemoryKV.append
    monkeypatch.setattr(ra.MemoryKV, "append", lambda self, *a: calls.append(a[0]) or orig(self, *a))
    out, _ = _segments(lm, tokens, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert len(calls) == 2 * 9 and max(calls) == 7  # every segment after the first reused the memory's k/v
    with torch.enable_grad():  # no cache of any kind
        state, outs = None, []
        for seg in tokens.split(3, dim=1):
            o = lm(seg, state=state)
            state, outs = o.state, outs + [o.hidden.detach()]
    torch.testing.assert_close(out, torch.cat(outs, 1), rtol=0, atol=1e-12)
    # one token at a time (generation): the spare room runs out, the buffer is compacted
    # and grown while the memory fills; results stay exact
    tokens = torch.randint(0, V, (2, 40))
    out, _ = _segments(lm, tokens, 1)
    lm.body.memory_kv_cache = False
    ref, _ = _segments(lm, tokens, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_memory_kv_reuse_never_stale():
    lm = make_lm(dtype=torch.float64, mem_len=6)
    a, b, c = (torch.randint(0, V, (2, 4)) for _ in range(3))

    def fresh(tokens, state):  # with gradients on, nothing is cached (memory k/v, R, W_R R)
        with torch.enable_grad():
            return lm(tokens, state=state).hidden.detach()

    with torch.no_grad():
        s1 = lm(a).state
        s2 = lm(b, state=s1).state
        # an older memory passed again (a second continuation of the same prefix)
        torch.testing.assert_close(lm(c, state=s1).hidden, fresh(c, s1), rtol=0, atol=1e-12)
        s2 = lm(b, state=s1).state
        # weights changed in place (as an optimizer step does)
        for p in lm.parameters():
            p.mul_(1.05)
        torch.testing.assert_close(lm(c, state=s2).hidden, fresh(c, s2), rtol=0, atol=1e-12)
        s3 = lm(b, state=s2).state
        # memory edited in place
        for s in s3:
            s.mul_(0.5)
        torch.testing.assert_close(lm(c, state=s3).hidden, fresh(c, s3), rtol=0, atol=1e-12)
        # another batch size with the cache of the old one
        torch.testing.assert_close(lm(c[:1]).hidden, fresh(c[:1], None), rtol=0, atol=1e-12)


def test_memory_kv_cache_off_with_grad_or_hooks_and_not_copied():
    import copy
    import pickle

    lm = make_lm(mem_len=4)
    x = torch.randint(0, V, (1, 4))
    state = lm(x).state  # grad enabled: no cache kept
    assert lm.body._kv_cache is None
    with torch.no_grad():
        state = lm(x, state=state).state
        assert lm.body._kv_cache is not None
        h = lm.body.blocks[0].attn.hook_k.register_forward_hook(lambda m, i, o: o * 2)
        lm(x, state=state)
        assert lm.body._kv_cache is None  # a hook may edit keys: recompute everything
        h.remove()
        lm(x, state=state)
    clone = copy.deepcopy(lm)
    assert clone.body._kv_cache is None and lm.body._kv_cache is not None
    assert pickle.loads(pickle.dumps(lm)).body._kv_cache is None
    lm.body.clear_memory_kv()
    assert lm.body._kv_cache is None
