"""Causal tracing through segment memory (Transformer-XL, universal_xl): where does a model
keep a fact it read one segment ago?

The subject is stated only in the previous segment (``context``); the prompt is the current
segment. The context is read once for the clean row and ``samples`` corrupted rows (noise on
the subject's token embeddings, as in :func:`~xvariants.interpret.causal_trace.trace_fact`),
which gives each row its memory: per entry ``e`` (xl: the input of layer ``e``, entry 0 = the
embedding, the last entry = the output of the last layer; universal_xl: the input of step
``e``) a state per memory position. A cell restores one entry at one memory position to the
clean row's value in the corrupted rows' memory, and the prompt is read with it; its score is
p(answer) at the prompt's last position. No tool offers this; the state is a plain nest of
tensors (the body contract), so the restoration edits it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xvariants.config_errors import require
from xvariants.interpret.causal_effects import token_categories
from xvariants.interpret.hooks import find_body, hooks, unwrap_model
from xvariants.interpret.patching import draw_noise, lm_logits, trace_sites
from xvariants.interpret.trace_args import EvalMode, WrongPrediction, check_prompt, check_samples, noise_std


@dataclass
class MemoryTraceResult:
    """``scores`` ``[M, E]``: p(answer) with entry ``e`` at memory position ``m`` restored;
    ``positions[m]`` is the context token held there; ``categories`` token categories of the
    memory positions (the subject's range shifted into memory)."""

    context: torch.Tensor
    tokens: torch.Tensor
    subject_range: tuple[int, int]
    answer: int
    p_clean: float
    p_corrupt: float
    noise: float
    samples: int
    positions: list[int]
    scores: torch.Tensor
    categories: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    def indirect_effect(self) -> torch.Tensor:
        """``[M, E]`` restored score - p_corrupt."""
        return self.scores - self.p_corrupt

    def to_dict(self) -> dict:
        """Every number, JSON-ready."""
        return {"context": self.context.tolist(), "tokens": self.tokens.tolist(), "subject_range": list(self.subject_range),
                "answer": self.answer, "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
                "total_effect": self.total_effect, "noise": self.noise, "samples": self.samples,
                "positions": self.positions, "scores": self.scores.tolist(), "categories": self.categories}


@torch.no_grad()
def trace_memory(
    model: nn.Module,
    context: torch.Tensor,
    subject_range: tuple[int, int],
    tokens: torch.Tensor,
    *,
    noise: float | str = 3.0,
    sigma: float | None = None,
    samples: int = 10,
    answer: int | None = None,
    strict: bool = True,
    seed: int = 1,
    batch_rows: int = 1024,
) -> MemoryTraceResult:
    """Trace every (memory position, memory entry) for a fact whose subject (``subject_range``
    of ``context``) is read through memory while ``tokens`` (the prompt) is processed.
    Arguments as for :func:`~xvariants.interpret.causal_trace.trace_fact`."""
    inner = unwrap_model(model)
    body = find_body(inner)
    require(body is not None and getattr(body, "stateful", False), "model",
            "memory tracing needs a body with segment memory (xl, universal_xl)")
    context, (start, end) = check_prompt(inner, context, subject_range)
    tokens, _ = check_prompt(inner, tokens, (0, 1))
    device = next(inner.parameters()).device
    context, tokens = context.to(device), tokens.to(device)
    mem_len = getattr(body, "mem_len", None)
    Tc = context.numel()
    require(mem_len is None or Tc - start <= mem_len, "subject_range",
            f"the subject starts {Tc - start} tokens before the prompt, beyond mem_len={mem_len}: it is not in memory")
    check_samples(samples)
    level = noise_std(noise, sigma)
    embed = trace_sites(inner).embed
    S = samples

    def corrupt(act, site):
        act = act.clone()
        act[1:, start:end] += draw_noise(level, S, end - start, act.size(-1), seed).to(act.device, act.dtype)
        return act

    with EvalMode(inner):
        with hooks(inner, [(embed, corrupt)]):
            state = inner.hidden_states(context.reshape(1, -1).expand(1 + S, -1)).state
        entries = list(state)
        M = entries[0].size(1)

        def run(cells):
            batch_state = _restored(entries, cells, S)
            logits, _ = lm_logits(inner, tokens.reshape(1, -1).expand(batch_state[0].size(0), -1), False, batch_state)
            p = torch.softmax(logits.double(), -1)
            return p[0], p[1:].reshape(len(cells), S, -1)

        clean, corrupted = run([None])
        predicted = int(clean.argmax())
        if answer is None:
            answer = predicted
        elif answer != predicted and strict:
            raise WrongPrediction(int(answer), predicted, float(clean[answer]))
        cells = [(m, e) for m in range(M) for e in range(len(entries))]
        per_pass = max(1, (batch_rows - 1) // S)
        probs = torch.cat([run(cells[i : i + per_pass])[1][..., answer] for i in range(0, len(cells), per_pass)])
    first = Tc - M  # context index held at memory position 0
    return MemoryTraceResult(
        context.cpu(), tokens.cpu(), (start, end), int(answer), float(clean[answer]),
        float(corrupted[0, :, answer].mean()), level, S, list(range(first, Tc)),
        probs.mean(1).reshape(M, len(entries)).cpu(), token_categories((start - first, end - first), M),
    )


def _restored(entries: list[torch.Tensor], cells, S: int) -> list[torch.Tensor]:
    """Memory of one pass: row 0 clean, then per cell the corrupted rows with the cell's
    (position, entry) set to the clean value (None = nothing restored)."""
    k = len(cells)
    out = [torch.cat([e[:1], e[1:].repeat(k, 1, 1)]) for e in entries]
    for c, cell in enumerate(cells):
        if cell is not None:
            m, e = cell
            out[e][1 + c * S : 1 + (c + 1) * S, m] = entries[e][0, m]
    return out
