"""``trace facts=PATH|auto`` (:mod:`.trace_cli`): trace every fact of a known-facts file, skip
and count the facts the model gets wrong (as ROME does), average the effects by token category.

Writes under ``out_dir``: ``facts/<known_id>.json`` per traced fact, ``summary.json`` (exactly
the keys of :meth:`~xvariants.interpret.causal_effects.AverageEffects.summary`, the layout of
``bench/results/causal_trace/summary.json``), ``effects.json`` (every average with its
interval and sample count, the skipped facts, the noise), ``aie_heatmap.png``,
``aie_lines.png`` and with ``severed=true`` ``severed.png``.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

from xvariants.config_errors import ConfigError, DataError
from xvariants.errors import UsageError
from xvariants.interpret.causal_effects import average_effects, average_severed
from xvariants.interpret.causal_trace import WrongPrediction, severed_trace, trace_fact
from xvariants.interpret.trace_args import check_prompt, noise_std
from xvariants.interpret.trace_cli import Settings, Source, load_known, noise_line, noise_scale, write_json

#: a known_id names a file: anything but word characters, dots and dashes (a "/" from the file) becomes "_"
SAFE_NAME = re.compile(r"[^\w.-]")


def facts_path(source: Source, facts: str) -> str:
    """``facts=auto``: the known-facts file the checkpoint recorded; else the path given."""
    if facts != "auto":
        return facts
    if source.facts_file is None:
        raise UsageError(f"facts=auto: {source.name} records no known-facts file (checkpoints trained on "
                         "data=facts do); give facts=PATH")
    if not Path(source.facts_file).is_file():
        raise UsageError(f"facts=auto: the known-facts file {source.name} was trained with is missing: {source.facts_file}")
    return source.facts_file


def select(known: list[dict], split: str, limit: int | None, path: str) -> list[tuple[object, dict]]:
    """``(known_id, entry)`` of the chosen facts: those of ``split``, the first ``limit``."""
    chosen = [(e.get("known_id", i), e) for i, e in enumerate(known) if split == "all" or e.get("split") == split]
    if not chosen:
        raise UsageError(f"split={split}: no fact in {path} has split {split!r}" if split != "all" else f"facts: {path} holds no fact")
    return chosen[:limit] if limit is not None else chosen


def prepare(source: Source, chosen: list[tuple[object, dict]]):
    """Encoded facts ``(known_id, entry, tokens, subject_range, answer_id)`` and the unusable
    ones ``(known_id, reason)``: a subject not in its prompt or covering part of a token, a
    prompt longer than the model's context."""
    from xvariants.data.spans import encode_fact

    ready, unusable = [], []
    for kid, entry in chosen:
        try:
            fact = encode_fact(source.tokenizer, entry["prompt"], entry["subject"], entry["answer"])
            tokens, subject_range = check_prompt(source.model, torch.as_tensor(fact.ids, dtype=torch.long), fact.subject)
        except (DataError, ConfigError) as e:
            unusable.append((kid, str(e)))
            continue
        ready.append((kid, entry, tokens, subject_range, fact.answer_id))
    return ready, unusable


def run_batch(source: Source, s: Settings) -> dict:
    from xvariants.interpret.trace_views import plot_aie_lines, plot_average_heatmap, plot_severed

    path = facts_path(source, s.facts)
    ready, unusable = prepare(source, select(load_known(path), s.split, s.limit, path))
    if not ready:
        raise UsageError(f"facts: none of the chosen facts of {path} can be traced; first reason: {unusable[0][1]}")
    sigma, sigma_from = noise_scale(source, s.noise, path, None)
    kwargs = s.trace_kwargs(sigma)
    results, severed, wrong = [], [], []
    started = time.perf_counter()
    for i, (kid, entry, tokens, subject_range, answer_id) in enumerate(ready, 1):
        try:
            r = trace_fact(source.model, tokens, subject_range, window=s.window, kinds=s.kinds, answer=answer_id, **kwargs)
        except WrongPrediction:
            wrong.append(kid)
            continue
        results.append(r)
        sev = severed_trace(source.model, tokens, subject_range, answer=r.answer, **kwargs) if s.severed else None
        if sev is not None:
            severed.append(sev)
        write_json(s.out_dir / "facts" / f"{SAFE_NAME.sub('_', str(kid))}.json", {
            "known_id": kid, **{k: entry.get(k) for k in ("subject", "relation", "prompt", "answer", "template_id", "split")},
            "labels": source.labels(tokens.tolist()), "trace": r.to_dict(),
            "indirect_effect": {k: r.indirect_effect(k) for k in r.scores},
            "severed": None if sev is None else sev.to_dict()})
        if i % 10 == 0 or i == len(ready):
            print(f"traced {i}/{len(ready)} facts ({len(wrong)} skipped), {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    if not results:
        raise UsageError(f"facts: {source.name} predicts the answer of none of the {len(ready)} facts traced from {path}; "
                         "nothing to average")
    effects = average_effects(results)
    summary = effects.summary()
    sev_avg = average_severed(severed) if severed else None
    word = source.layer_word
    out = s.out_dir
    plot_average_heatmap(effects, out / "aie_heatmap.png", layer_word=word, title=f"{source.name}: {_headline(effects)}")
    plot_aie_lines(effects, out / "aie_lines.png", layer_word=word, title=f"{source.name}: {_headline(effects)}")
    written = [out / "aie_heatmap.png", out / "aie_lines.png"]
    if sev_avg is not None:
        plot_severed(sev_avg, out / "severed.png", layer_word=word,
                     title=f"{source.name}: restoring the last subject token's state, {len(severed)} facts (95% CI)")
        written.append(out / "severed.png")
    written.append(write_json(out / "summary.json", summary))
    written.append(write_json(out / "effects.json", {
        "model": source.name, "description": source.description, "facts_file": path, "split": s.split, "limit": s.limit,
        "n_chosen": len(ready) + len(unusable), "n_traced": len(results), "skipped_wrong": wrong,
        "unusable": [{"known_id": k, "reason": why} for k, why in unusable], "layer_word": word,
        "noise": {"spec": s.noise, "sigma": sigma, "sigma_from": sigma_from, "std": noise_std(s.noise, sigma)},
        "seed": s.seed, "samples": s.samples, "window": s.window, "effects": effects.to_dict(), "severed": sev_avg}))
    _print(source, s, path, effects, (len(ready) + len(unusable), wrong, unusable),
           (sigma, sigma_from, noise_std(s.noise, sigma)), written)
    return summary


def _headline(effects) -> str:
    return (f"{effects.n_facts} facts, p clean {effects.p_clean:.3f}, p corrupted {effects.p_corrupt:.3f}, "
            f"ATE {effects.ate:.3f}")


def _print(source, s, path, effects, counts, noise, written) -> None:
    n_chosen, wrong, unusable = counts
    lines = [
        f"model: {source.name} ({source.description})",
        f"facts: {path} (split {s.split}" + (f", first {s.limit}" if s.limit else "") + f"): {n_chosen} chosen, "
        f"{effects.n_facts} traced, {len(wrong)} skipped (the model predicts another answer), {len(unusable)} unusable"
        + (f" (first: {unusable[0][0]}: {unusable[0][1]})" if unusable else ""),
        noise_line(s, *noise),
        (f"p(answer): clean {effects.p_clean:.4f}, corrupted {effects.p_corrupt:.4f}; "
         f"ATE {effects.ate:.4f} ± {effects.ate_ci:.4f} (95% CI)"),
    ]
    for kind in effects.aie:
        aie, category, layer = effects.peak(kind)
        lines.append(f"peak AIE {kind}: {aie:+.4f} at {category}, {source.layer_word} {layer}")
    lines += [f"wrote {p}" for p in written] + [f"wrote {s.out_dir / 'facts'}/<known_id>.json ({effects.n_facts} files)"]
    print("\n".join(lines), flush=True)
