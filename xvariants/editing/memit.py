"""MEMIT (Meng et al. 2023): many edits at once, spread over several MLP layers, as the original.

1. Per request a target z_i = h_i^L + δ_i for the residual stream after the last critical layer
   L = layers[-1] at the subject's last token (:func:`~xvariants.editing.values.fit_target`
   with δ at ``hook_resid_post`` of L; defaults from the GPT-J hparams: clamp 0.75, 25 steps).
2. For each critical layer l, ascending, with the updates of earlier layers in place:
   K (the keys at l, averaged within each prefix group, then over the groups: the bare prompt
   weighs one half), R = Z − H^L (H^L recomputed on the bare prompts), and
   ΔW_l = (R / (number of layers left)) Kᵀ (λ·C_l + K Kᵀ)⁻¹, solved in float64.
   C_l = E[kkᵀ] (the mean, ``SecondMoment.moment()``), so λ = ``mom2_update_weight`` counts as
   that many corpus keys against each edited key.

Universal Transformer: the critical "layers" are steps of one shared weight; each step's ΔW is
added to the same matrix (and acts at every step), the next step's residual sees its effect.
A failure part-way restores every weight before the error propagates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from xvariants.editing.deltas import EditResult, WeightSnapshot, write_delta
from xvariants.editing.requests import EditError, EditRequest, encode_request
from xvariants.editing.rome import as_request, check_stats
from xvariants.editing.runs import context_prefixes, edit_site, read_at, read_site
from xvariants.editing.stats import MAX_CONDITION, KeyStats, solve_live
from xvariants.editing.values import TargetOptions, fit_target
from xvariants.interpret.hooks import HookTable, act_name


@dataclass(frozen=True)
class MEMITOptions(TargetOptions):
    """MEMIT's hyper-parameters (defaults: the original's GPT-J ``hparams/MEMIT``).

    :param mom2_update_weight: λ. :param context_lengths: ``(length, count)`` of the sampled
        prefix group (the original: 5 texts of 10 tokens). :param prefix_seed, top_k: sampling.
    :param batch_rows: rows per forward pass when reading keys. :param max_condition: of C.
    """

    clamp_norm_factor: float = 0.75
    v_num_grad_steps: int = 25
    mom2_update_weight: float = 15000.0
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    prefix_seed: int = 0
    top_k: int = 5
    batch_rows: int = 64
    max_condition: float = MAX_CONDITION


def group_mean(keys: torch.Tensor, groups: Sequence[Sequence[str]], n_requests: int) -> torch.Tensor:
    """``[n_requests, d]`` from ``[n_requests * n_prefixes, d]`` (request-major): the mean within
    each prefix group, then over the groups (``compute_ks``)."""
    sizes = [len(g) for g in groups]
    per = keys.reshape(n_requests, sum(sizes), -1)
    return torch.stack([chunk.mean(1) for chunk in per.split(sizes, dim=1)]).mean(0)


def memit_edit(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | dict], *, layers: Sequence[int],
               stats: Mapping[int, KeyStats] | Sequence[KeyStats] | None, options: MEMITOptions = MEMITOptions(),
               apply: bool = True, prefix_groups: Sequence[Sequence[str]] | None = None) -> EditResult:
    """Write ``requests`` into the MLPs of ``layers`` at once.

    :param layers: the critical layers (a UT: steps of its shared MLP).
    :param stats: key statistics per layer (a mapping layer -> stats, or a sequence in the
        order of ``layers``).
    :param apply: leave the edit applied (``result.restore()`` undoes it bit for bit).
    :param prefix_groups: context prefix groups, the first ``[""]`` (default: sampled).
    """
    t0 = time.perf_counter()
    requests = [as_request(r) for r in requests]
    if not requests:
        raise EditError("requests: nothing to edit")
    layers = list(layers)
    if not layers or sorted(set(layers)) != layers:
        raise EditError(f"layers must be a non-empty ascending list without repeats, got {layers}")
    sites = {layer: edit_site(model, layer) for layer in layers}
    if stats is None:
        stats = {}
    elif not isinstance(stats, Mapping):
        stats = dict(zip(layers, stats))
    for layer in layers:
        check_stats(stats.get(layer), sites[layer], options.max_condition)
    z_name = act_name("resid_post", layers[-1], model)
    if z_name not in HookTable(model):
        raise EditError(f"model: no {z_name!r} hook point to set MEMIT's targets at")
    for r in requests:  # every bad request fails before any work
        encode_request(tokenizer, r, target=r.target_new)
    groups = [list(g) for g in prefix_groups] if prefix_groups is not None else context_prefixes(
        model, tokenizer, options.context_lengths, top_k=options.top_k, seed=options.prefix_seed)
    if groups[0] != [""]:
        raise EditError("prefix_groups: the first group must be [''] (the bare prompt)")
    flat = [p for g in groups for p in g]

    fits = [fit_target(model, tokenizer, r, flat, [z_name], options) for r in requests]
    z = torch.stack([f.target for f in fits])
    bare = [encode_request(tokenizer, r) for r in requests]
    prefixed = [encode_request(tokenizer, r, p) for r in requests for p in flat]

    memories = {sites[layer].memory.path: sites[layer].memory for layer in layers}
    totals = {path: torch.zeros(m.d_model, m.d_mlp, dtype=torch.float64) for path, m in memories.items()}
    snapshot = WeightSnapshot(m.weight for m in memories.values())
    per_layer: list[dict[str, float]] = []
    try:
        for i, layer in enumerate(layers):
            site = sites[layer]
            keys, _, _ = read_site(model, site, [list(e.ids) for e in prefixed], [e.lookup for e in prefixed],
                                   options.batch_rows)
            k = group_mean(keys, groups, len(requests))  # [n, d_mlp]
            h = read_at(model, [z_name], [list(e.ids) for e in bare], [e.lookup for e in bare], options.batch_rows)
            resid = (z - h[z_name]) / (len(layers) - i)  # [n, d_model]
            c = stats[layer].moment.double()
            adj = solve_live(options.mom2_update_weight * c + k.T @ k, k.T, stats[layer].live)  # [d_mlp, n]
            delta = resid.T @ adj.T  # [d_model, d_mlp]
            path = site.memory.path
            totals[path] += delta
            write_delta(site.memory, snapshot.original(site.memory.weight), totals[path])
            per_layer.append({"layer": layer, "residual_norm": float(resid.norm(dim=1).mean() * (len(layers) - i)),
                              "delta_norm": float(delta.norm())})
    except BaseException:
        snapshot.restore()
        raise
    h = read_at(model, [z_name], [list(e.ids) for e in bare], [e.lookup for e in bare], options.batch_rows)
    info = {"layers": layers, "z": z, "final_residual_norm": float((z - h[z_name]).norm(dim=1).mean()),
            "per_layer": per_layer, "losses": [f.losses for f in fits], "prefix_groups": groups,
            "options": asdict(options), "seconds": time.perf_counter() - t0}
    result = EditResult("MEMIT", totals, memories, info, snapshot=snapshot)
    if not apply:
        result.restore()
    return result
