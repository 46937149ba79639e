"""Running a language model for the editors: where a layer's MLP memory is (:class:`EditSite`),
batched reads of keys and values at chosen tokens, logits at chosen positions with hooks
attached, sampling, and the context prefixes ROME averages its key over.

Every run goes through the canonical hook names (:mod:`xvariants.interpret.hooks`), so the same
code serves the vanilla and Transformer-XL bodies (``blocks.{l}``), the Universal Transformer's
shared block (``steps.{n}``: one weight, one hook name per application step) and the Hugging
Face adapter. Batches are right-padded without a mask: the models are causal, so padding after
a row's last real token cannot change that row's earlier positions. Stateful bodies
(Transformer-XL) run on the current segment alone (memory ``None``).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xvariants.data.tokenizers import WordTokenizer
from xvariants.editing.requests import EditError
from xvariants.interpret.hooks import HookTable, find_body, hooks, unwrap_model
from xvariants.interpret.mlp_memory import MLPMemory, mlp_memory
from xvariants.interpret.patching import lm_logits
from xvariants.modes import eval_modes

_KEY = re.compile(r"^(?:blocks|steps)\.(\d+)\.mlp\.hook_post$")


@dataclass(frozen=True)
class EditSite:
    """Where an edit reads keys and writes values.

    :param memory: the MLP output projection (one weight; shared by every step of a UT).
    :param steps: the layers/steps whose keys (and values) are averaged: one for layered
        bodies, one or all steps of a Universal Transformer.
    :param key_hooks, value_hooks: per step, the hook names of the key (``mlp.hook_post``) and
        of the MLP output (``hook_mlp_out``).
    :param active_hooks: per step, the ACT running mask (``steps.{n}.hook_active``) or None.
    """

    memory: MLPMemory
    steps: tuple[int, ...]
    key_hooks: tuple[str, ...]
    value_hooks: tuple[str, ...]
    active_hooks: tuple[str | None, ...]


def mlp_steps(model: nn.Module) -> int:
    """Number of layers (steps) with an MLP key hook point; 0 when the model has none."""
    found = [int(m.group(1)) for name in HookTable(model) if (m := _KEY.match(name))]
    return max(found) + 1 if found else 0


def check_causal(model: nn.Module) -> None:
    body = find_body(model)
    if body is not None and getattr(body, "causal", True) is False:
        raise EditError("model: a bidirectional encoder has no next-token prediction to edit; use a causal LM")


def edit_site(model: nn.Module, layer: int, steps: Sequence[int] | None = None) -> EditSite:
    """The :class:`EditSite` of ``layer`` (a UT: the weight shared by every step), reading the
    keys of ``steps`` (default: ``layer`` itself). One message per problem, nothing changed."""
    check_causal(model)
    n = mlp_steps(model)
    if n == 0:
        body = find_body(model)
        what = type(unwrap_model(model)).__name__ + (f" (body {type(body).__name__})" if body is not None else "")
        raise EditError(
            f"model: {what} has no MLP key hook points ('blocks.{{l}}.mlp.hook_post'); ROME/MEMIT edit the "
            "output projection of an MLP in each block"
        )
    for value in (layer, *(steps or ())):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise EditError(f"layer {value!r} is out of range: this model has {n} MLP layers/steps (0..{n - 1})")
    try:
        memory = mlp_memory(model, layer)
    except (KeyError, ValueError) as e:
        raise EditError(f"model: layer {layer} has no editable MLP output projection ({e})") from None
    steps = (layer,) if steps is None else tuple(steps)
    table = HookTable(model)
    keys, values, active = [], [], []
    for s in steps:
        other = mlp_memory(model, s) if s != layer else memory
        if other.weight is not memory.weight:
            raise EditError(f"step {s} does not use the weight of layer {layer}; key steps must share the edited weight")
        keys.append(other.key_hook)
        values.append(other.value_hook)
        name = f"steps.{s}.hook_active"
        active.append(name if name in table else None)
    return EditSite(memory, steps, tuple(keys), tuple(values), tuple(active))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped network in eval mode (no dropout), then every submodule back to its own
    mode (:func:`xvariants.modes.eval_modes`)."""
    with eval_modes(unwrap_model(model)) as inner:
        yield inner


def device_of(model: nn.Module) -> torch.device:
    return next(unwrap_model(model).parameters()).device


def pad(seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Right-padded ``[B, T]`` (pad id 0; causal models never see it from a real position)."""
    width = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out.to(device)


def logits_at(model: nn.Module, batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              fwd_hooks: Sequence = ()) -> torch.Tensor:
    """Next-token logits ``[N, V]`` at ``(rows[i], cols[i])``, with ``fwd_hooks`` attached.
    Framework models form logits only there (the head is the largest matrix)."""
    inner = unwrap_model(model)
    with hooks(inner, fwd_hooks):
        if hasattr(inner, "hidden_states") and hasattr(inner, "head"):
            hidden = inner.hidden_states(batch).hidden
            return inner.head.logits(hidden[rows, cols])
        logits, _ = lm_logits(inner, batch, True)
        return logits[rows, cols]


@torch.no_grad()
def read_at(model: nn.Module, names: Sequence[str], seqs: Sequence[Sequence[int]], lookups: Sequence[int],
            batch_rows: int = 64) -> dict[str, torch.Tensor]:
    """Activation ``name`` at token ``lookups[i]`` of row ``i`` for each name, on the CPU
    (float64 for float activations), read in batches of ``batch_rows`` rows; a name that
    never fired (an ACT mask of a fixed-step run, a step every position halted before) is
    absent, and rows of a batch in which it did not fire are zeros (under ACT: not running)."""
    parts: dict[str, list[torch.Tensor | int]] = {}
    with eval_mode(model) as inner:
        dev = device_of(inner)
        for at in range(0, len(seqs), batch_rows):
            chunk = seqs[at : at + batch_rows]
            batch = pad(chunk, dev)
            rows = torch.arange(len(chunk), device=dev)
            cols = torch.as_tensor(list(lookups[at : at + batch_rows]), device=dev)
            got: dict[str, torch.Tensor] = {}

            def grab(act, hook, got=got, rows=rows, cols=cols):
                picked = act[rows, cols]
                got[hook.name] = (picked.double() if picked.is_floating_point() else picked).cpu()

            with hooks(inner, [(n, grab) for n in dict.fromkeys(names)]):
                lm_logits(inner, batch, False)
            for name in dict.fromkeys(names):  # a row count stands for a batch where it did not fire
                parts.setdefault(name, []).append(got.get(name, len(chunk)))
    out = {}
    for name, chunks in parts.items():
        fired = [c for c in chunks if isinstance(c, torch.Tensor)]
        if fired:
            like = fired[0]
            out[name] = torch.cat([c if isinstance(c, torch.Tensor) else like.new_zeros((c, *like.shape[1:]))
                                   for c in chunks])
    return out


def read_site(model: nn.Module, site: EditSite, seqs: Sequence[Sequence[int]], lookups: Sequence[int],
              batch_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys [N, d_mlp], values [N, d_model], ok [N])`` in float64 at ``lookups[i]`` of row
    ``i``, averaged over the site's steps at which that token was still running (ACT); ``ok`` is
    False for a row whose token ran none of them (its key and value are then NaN)."""
    active = [n for n in site.active_hooks if n is not None]
    got = read_at(model, [*site.key_hooks, *site.value_hooks, *active], seqs, lookups, batch_rows)
    n = len(seqs)
    ran = [name for name in site.key_hooks if name in got]
    if not ran:
        raise EditError(f"no row ran step(s) {list(site.steps)}: no key to read there")
    zeros = torch.zeros_like(got[ran[0]])

    def weight(key: str, act: str | None) -> torch.Tensor:
        if key not in got:  # a step no row ran
            return torch.zeros(n, dtype=torch.float64)
        return got[act].double() if act is not None and act in got else torch.ones(n, dtype=torch.float64)

    w = torch.stack([weight(key, a) for key, a in zip(site.key_hooks, site.active_hooks)])
    total = w.sum(0)
    k = (w[..., None] * torch.stack([got.get(name, zeros) for name in site.key_hooks])).sum(0) / total[:, None]
    d_v = next(got[name] for name in site.value_hooks if name in got)
    v = (w[..., None] * torch.stack([got.get(name, torch.zeros_like(d_v)) for name in site.value_hooks])).sum(0) \
        / total[:, None]
    return k, v, total > 0


# ---------------------------------------------------------------------- sampling
def start_ids(tokenizer: Any) -> list[int]:
    """What generated context prefixes start from (ROME: GPT-2's ``<|endoftext|>``): the
    tokenizer's end-of-text / BOS token, else the encoding of a newline."""
    for name in ("eos_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return [value]
    ids = [int(i) for i in tokenizer.encode("\n")]
    if not ids:
        raise EditError("tokenizer: no start token to generate context prefixes from; pass the prefixes explicitly")
    return ids[:1]


@torch.no_grad()
def sample(model: nn.Module, prompts: Sequence[Sequence[int]], n_new: int, *, top_k: int = 5,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """Top-k sampled continuations (``n_new`` tokens each, prompt not included). Framework models
    use their own ``generate`` (memory and caches); others recompute the window each token."""
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    with eval_mode(model) as inner:
        dev = device_of(inner)
        for length, idx in by_len.items():
            batch = pad([prompts[i] for i in idx], dev)
            if hasattr(inner, "generate") and hasattr(inner, "body"):
                seq = inner.generate(batch, n_new, top_k=top_k, generator=generator)
            else:
                seq = batch
                for _ in range(n_new):
                    logits, _ = lm_logits(inner, seq, False)
                    probs = torch.softmax(logits.double(), -1)
                    top = probs.topk(min(top_k, probs.size(-1)), -1)
                    pick = torch.multinomial(top.values.cpu(), 1, generator=generator).to(dev)
                    seq = torch.cat([seq, top.indices.gather(1, pick)], 1)
            for j, i in enumerate(idx):
                out[i] = seq[j, length:].tolist()
    return out  # type: ignore[return-value]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:  # our tokenizers take no options
        return tokenizer.decode(list(ids))


def separator(tokenizer: Any) -> str:
    """What joins a generated prefix to the prompt: ROME's ``". "``; the word tokenizer needs
    the full stop as a word of its own (``" . "``)."""
    return " . " if isinstance(tokenizer, WordTokenizer) else ". "


_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def context_prefixes(model: nn.Module, tokenizer: Any, lengths: Sequence[tuple[int, int]], *, top_k: int = 5,
                     seed: int = 0) -> list[list[str]]:
    """Groups of context prefixes: ``[[""], group per (length, count)]``; each prefix is a
    sampled text of ``length - 1`` tokens after the start token (ROME's ``max_out_len``
    counts the start token) and the separator. Cached per model and arguments, as the
    original caches them once: later edits reuse the unedited model's prefixes."""
    key = (id(tokenizer), tuple(map(tuple, lengths)), top_k, seed)
    inner = unwrap_model(model)
    cache = _PREFIXES.setdefault(inner, {})
    if key not in cache:
        g = torch.Generator().manual_seed(seed)
        start, sep = start_ids(tokenizer), separator(tokenizer)
        groups: list[list[str]] = [[""]]
        for length, count in lengths:
            texts = sample(inner, [start] * count, max(length - len(start), 1), top_k=top_k, generator=g)
            groups.append([" ".join(decode(tokenizer, t).split()) + sep for t in texts])
        cache[key] = groups
    return [list(g) for g in cache[key]]
