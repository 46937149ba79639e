"""``trace`` on one fact (:mod:`.trace_cli`): the paper's heatmap, every number as JSON, and
the headline numbers printed."""

from __future__ import annotations

import torch

from xvariants.errors import UsageError
from xvariants.interpret.causal_trace import WrongPrediction, severed_trace, trace_fact
from xvariants.interpret.trace_args import check_prompt, noise_std
from xvariants.interpret.trace_cli import Settings, Source, noise_line, noise_scale, peaks, write_json


def wrong_prediction(source: Source, err: WrongPrediction, answer: str) -> UsageError:
    """The message for a fact the model does not know (ROME traces only facts it knows)."""
    said = source.labels([err.predicted])[0]
    return UsageError(
        f"answer: {source.name} predicts {said!r} (token {err.predicted}), not {answer!r} (token {err.expected}, "
        f"p={err.p_expected:.3g}); causal tracing needs a fact the model knows. Leave answer= out to trace what it predicts"
    )


def run_single(source: Source, s: Settings, prompt: str, subject: str, answer: str | None) -> dict:
    """Trace ``subject`` in ``prompt``; write ``trace.png``, ``trace.json`` (and ``severed.png``)."""
    from xvariants.data.spans import encode_fact
    from xvariants.interpret.trace_views import plot_fact, plot_severed, severed_effects

    fact = encode_fact(source.tokenizer, prompt, subject, answer)  # SpanError: not in the prompt, part of a token
    tokens, subject_range = check_prompt(source.model, torch.as_tensor(fact.ids, dtype=torch.long), fact.subject)
    sigma, sigma_from = noise_scale(source, s.noise, source.facts_file, (tokens, subject_range))
    kwargs = s.trace_kwargs(sigma)
    try:
        result = trace_fact(source.model, tokens, subject_range, window=s.window, kinds=s.kinds,
                            answer=fact.answer_id, **kwargs)
    except WrongPrediction as e:
        raise wrong_prediction(source, e, answer) from None
    severed = severed_trace(source.model, tokens, subject_range, answer=result.answer, **kwargs) if s.severed else None
    labels = source.labels(tokens.tolist())
    answer_text = answer if answer is not None else source.labels([result.answer])[0]
    top = peaks(result, labels)
    payload = {
        "model": source.name, "description": source.description, "prompt": prompt, "subject": subject,
        "answer_text": answer_text, "labels": labels, "layer_word": source.layer_word,
        "noise": {"spec": s.noise, "sigma": sigma, "sigma_from": sigma_from, "std": noise_std(s.noise, sigma)},
        "seed": s.seed, "trace": result.to_dict(),
        "indirect_effect": {k: result.indirect_effect(k) for k in result.scores}, "peaks": top,
        "severed": None if severed is None else severed.to_dict(),
    }
    s.out_dir.mkdir(parents=True, exist_ok=True)
    png, js = s.out_dir / "trace.png", s.out_dir / "trace.json"
    plot_fact(result, labels, png, answer=answer_text, model_name=source.name, layer_word=source.layer_word)
    written = [png]
    if severed is not None:
        written.append(s.out_dir / "severed.png")
        plot_severed(severed_effects(severed), written[-1], layer_word=source.layer_word,
                     title=f"{source.name}: restoring the state at {labels[severed.token]!r} with MLP or attention severed")
    written.append(write_json(js, payload))
    _print(source, s, payload, result, severed, labels, written)
    return payload


def _print(source, s, payload, result, severed, labels, written) -> None:
    start, end = result.subject_range
    n_layers = max(v.size(1) for v in result.scores.values())
    noise = payload["noise"]
    lines = [
        f"model: {source.name} ({source.description}, {n_layers} {source.layer_word}s, {len(labels)} tokens)",
        f"fact: {payload['prompt']!r} -> {payload['answer_text']!r}; subject {payload['subject']!r} = tokens {start}..{end - 1}",
        noise_line(s, noise["sigma"], noise["sigma_from"], noise["std"]),
        f"p(answer): clean {result.p_clean:.4f}, corrupted {result.p_corrupt:.4f} (total effect {result.total_effect:+.4f})",
    ]
    for kind, p in payload["peaks"].items():
        lines.append(f"peak {kind}: p={p['p']:.4f} (IE {p['indirect_effect']:+.4f}) restoring token {p['token']} "
                     f"{p['token_text']!r} ({p['category']}), {source.layer_word} {p['layer']}")
    if result.ponder is not None:
        lines.append(f"ponder (ACT): {result.ponder['clean'].mean():.2f} steps per position clean, "
                     f"{result.ponder['corrupt'].mean():.2f} corrupted; n/a cells: "
                     + ", ".join(f"{k} {int(v.sum())}" for k, v in result.na.items()))
    if severed is not None:
        best = {k: float((v - severed.p_corrupt).masked_fill(severed.na, float("nan")).nan_to_num(float("-inf")).max())
                for k, v in severed.curves.items()}
        lines.append(f"severed at token {severed.token} {labels[severed.token]!r}, best IE per curve: "
                     + ", ".join(f"{k} {v:+.4f}" for k, v in best.items()))
    lines += [f"wrote {p}" for p in written]
    print("\n".join(lines), flush=True)
