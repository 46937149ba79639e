"""ROME (Meng et al. 2022): a rank-one change of one MLP output projection, as the original code.

* k* (``compute_u``): the key at the subject's last token, the flat mean over the context
  prefixes ``[""] + 10 sampled texts of 5 tokens + 10 of 10`` (ROME's ``max_out_len`` counts the
  start token), each joined to the prompt by ". "; u = C⁻¹k* / ‖C⁻¹k*‖ (``mom2_adjustment``).
* v* (``compute_v``): :func:`~xvariants.editing.values.fit_target` at the MLP output.
* ΔW = r uᵀ with r = (v* − W k₀ − b) / (k₀ · u), where k₀ is the key of the bare prompt: the
  edited layer maps k₀ to v* exactly, k* only sets the direction (the paper writes k* in both
  places; the code, followed here, uses k₀ in the constraint). Solved in float64 (the original
  inverts C in float32).

Universal Transformer: the one MLP serves every step, so ΔW changes every step. ``key_step``
chooses whose keys and values the edit uses: one step (an int), ``"peak"`` (the step whose MLP
output, restored at the subject's last token, recovers most of the answer's probability in a
causal trace of the bare prompt), or ``"mean"`` (keys averaged over the steps the token runs,
and the same δ added at every step's MLP output).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from xvariants.editing.deltas import EditResult
from xvariants.editing.requests import EditError, EditRequest, encode_request
from xvariants.editing.runs import EditSite, context_prefixes, edit_site, eval_mode, mlp_steps, read_site
from xvariants.editing.stats import MAX_CONDITION, KeyStats, StatsError, solve_live
from xvariants.editing.values import TargetOptions, fit_target

KEY_STEPS = ("peak", "mean")


@dataclass(frozen=True)
class ROMEOptions(TargetOptions):
    """ROME's hyper-parameters (defaults: the original's GPT-2 XL ``hparams/ROME``).

    :param context_lengths: ``(length, count)`` of sampled context prefixes.
    :param mom2_adjustment: whiten the key direction with C⁻¹ (False: u = k* / ‖k*‖).
    :param key_step: Universal Transformers: an int step, ``"peak"`` or ``"mean"``; None = the
        ``layer`` argument is the step.
    :param prefix_seed: seed of the prefix sampling. :param top_k: sampling's top-k.
    :param max_condition: largest accepted condition number of C.
    """

    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_adjustment: bool = True
    key_step: int | str | None = None
    prefix_seed: int = 0
    top_k: int = 5
    max_condition: float = MAX_CONDITION


def as_request(request: EditRequest | dict) -> EditRequest:
    return request if isinstance(request, EditRequest) else EditRequest.from_record(request)


def check_stats(stats: KeyStats | None, site: EditSite, max_condition: float, needed: bool = True) -> None:
    if stats is None:
        if needed:
            raise StatsError("stats: ROME/MEMIT need the key statistics C of the edited layer (editing.key_stats)")
        return
    if stats.d_mlp != site.memory.d_mlp:
        raise StatsError(f"{stats.describe()} are {stats.d_mlp}-dimensional; layer {site.memory.layer} has "
                         f"d_mlp = {site.memory.d_mlp}")
    if not site.memory.shared and stats.layer != site.memory.layer:
        raise StatsError(f"{stats.describe()} do not belong to the edited layer {site.memory.layer}")
    stats.check(max_condition)


def resolve_site(model: nn.Module, tokenizer: Any, request: EditRequest, layer: int, key_step) -> EditSite:
    """The :class:`EditSite` of ``layer`` with ``key_step`` resolved (Universal Transformers)."""
    site = edit_site(model, layer)
    if key_step is None:
        return site
    if not site.memory.shared:
        raise EditError(f"key_step={key_step!r}: only a Universal Transformer's shared MLP has steps to choose")
    if key_step == "mean":
        return edit_site(model, layer, tuple(range(mlp_steps(model))))
    if key_step == "peak":
        return edit_site(model, layer, (peak_step(model, tokenizer, request),))
    if isinstance(key_step, int) and not isinstance(key_step, bool):
        return edit_site(model, layer, (key_step,))
    raise EditError(f"key_step must be an int step, 'peak' or 'mean', got {key_step!r}")


def peak_step(model: nn.Module, tokenizer: Any, request: EditRequest, *, samples: int = 10, noise_factor: float = 3.0,
              seed: int = 1) -> int:
    """The step whose MLP output, restored at the subject's last token of the corrupted bare
    prompt (noise = 3 σ of the subject's embeddings), gives the clean answer the highest probability."""
    from xvariants.data.spans import token_span
    from xvariants.interpret.causal_trace import embedding_std
    from xvariants.interpret.patching import CORRUPTED, Cell, Patcher, trace_sites

    enc = encode_request(tokenizer, request)
    tokens = torch.as_tensor(enc.ids, dtype=torch.long)
    at = request.subject_at()
    start, end = token_span(tokenizer, request.text(), at, at + len(request.subject))
    sites = trace_sites(model)
    if "mlp" not in sites.names:
        raise EditError("key_step='peak': the model has no MLP output hook points to trace")
    with eval_mode(model) as inner:
        sigma = embedding_std(inner, [(tokens, (start, end))])
        patcher = Patcher(inner, tokens, (start, end), noise_factor * sigma, samples=samples, seed=seed, sites=sites)
        base = patcher.run([CORRUPTED])
        answer = int(base.clean.argmax())
        cells = [Cell(end - 1, (name,)) for name in sites.names["mlp"]]
        run = patcher.run(cells, answer=answer)
    return int(run.probs[:, :, 0].mean(1).argmax())


@torch.no_grad()
def _keys(model, tokenizer, request: EditRequest, site: EditSite, prefixes: list[str]):
    encs = [encode_request(tokenizer, request, p) for p in prefixes]
    keys, values, ok = read_site(model, site, [list(e.ids) for e in encs], [e.lookup for e in encs])
    if not bool(ok[0]):
        raise EditError(f"the subject's last token halts before step(s) {list(site.steps)}: no key to edit there")
    return keys, values, ok


def rome_edit(model: nn.Module, tokenizer: Any, request: EditRequest | dict, *, layer: int, stats: KeyStats | None,
              options: ROMEOptions = ROMEOptions(), apply: bool = True,
              prefixes: list[str] | None = None) -> EditResult:
    """One ROME edit of ``layer``'s MLP output projection.

    :param model: a causal LM (framework model, Lightning task or the Hugging Face adapter).
    :param tokenizer: its tokenizer. :param request: an :class:`EditRequest` or CounterFact record.
    :param layer: the layer (a UT: the step, unless ``options.key_step`` says otherwise).
    :param stats: the layer's key statistics (:func:`~xvariants.editing.stats.key_stats`); may be
        None only with ``mom2_adjustment=False``.
    :param apply: leave the edit applied (undo with ``result.restore()`` or ``with result:``);
        False returns the deltas with the model untouched.
    :param prefixes: context prefixes, first ``""`` (default: sampled, cached per model).
    """
    t0 = time.perf_counter()
    request = as_request(request)
    site = resolve_site(model, tokenizer, request, layer, options.key_step)
    check_stats(stats, site, options.max_condition, needed=options.mom2_adjustment)
    encode_request(tokenizer, request, target=request.target_new)  # bad target / subject: fail before work
    if prefixes is None:
        groups = context_prefixes(model, tokenizer, options.context_lengths, top_k=options.top_k,
                                  seed=options.prefix_seed)
        prefixes = [p for g in groups for p in g]
    keys, values, ok = _keys(model, tokenizer, request, site, prefixes)
    k_star = keys[ok].mean(0)
    k0, v0 = keys[0], values[0]
    if options.mom2_adjustment:
        u = solve_live(stats.moment, k_star, stats.live)
    else:
        u = k_star.clone()
    u = u / u.norm()
    fit = fit_target(model, tokenizer, request, prefixes, site.value_hooks, options, site.active_hooks)
    v_star = fit.target
    denom = float(k0 @ u)
    if abs(denom) < 1e-12 * float(k0.norm()):
        raise EditError("k0 is orthogonal to C⁻¹k*: the rank-one update is undefined for this request")
    r = (v_star - v0) / denom
    mem = site.memory
    path = mem.path
    result = EditResult("ROME", {path: torch.outer(r, u)}, {path: mem}, {
        "layer": mem.layer, "steps": list(site.steps), "k_star": k_star, "k0": k0, "v_init": fit.init,
        "v_star": v_star, "u": u, "r": r, "delta": fit.delta, "losses": fit.losses, "prefixes": list(prefixes),
        "options": asdict(options), "seconds": time.perf_counter() - t0,
    })
    return result.apply() if apply else result
