"""Editing facts in language models (issue 12): ROME, MEMIT, constrained fine-tuning (FT-L)
and CounterFact-style metrics, as plain ``torch.nn``-level functions (no Lightning, no Hydra).
They run on every framework body (vanilla, Transformer-XL on its current segment, the
Universal Transformer's shared MLP) and on the Hugging Face adapter
(:class:`~xvariants.interpret.hf_causal.HookedCausalLM`).

Public functions:

* ``EditRequest(prompt, subject, target_new, target_true=None)`` /
  ``EditRequest.from_record(counterfact_record)``; bad requests raise :class:`EditError`.
* ``key_stats(model, layer, ids, *, corpus, n_tokens, seq_len=128, batch_size=16, step=None,
  cache_dir=None) -> KeyStats``: C = E[kkᵀ] of a layer's keys, float64, cached as safetensors;
  ``collect_key_stats(model, layer, batches, ...)`` for any batch iterable; too few keys or an
  ill-conditioned C raise :class:`StatsError` with the count needed.
* ``rome_edit(model, tokenizer, request, *, layer, stats, options=ROMEOptions(), apply=True,
  prefixes=None)``; for a Universal Transformer ``ROMEOptions.key_step`` is a step, ``"peak"``
  (``peak_step(model, tokenizer, request)``, a causal trace of the bare prompt) or ``"mean"``.
* ``memit_edit(model, tokenizer, requests, *, layers, stats, options=MEMITOptions(), apply=True,
  prefix_groups=None)``
* ``ft_edit(model, tokenizer, requests, *, layer, options=FTOptions(), apply=True)``
  All three return an :class:`EditResult` (``deltas``: ΔW per weight path in float64,
  ``info``: keys, targets, losses, seconds); ``result.restore()`` or ``with result:`` puts the
  original weights back bit for bit; ``preserved(...)`` wraps a sequence of edits.
* ``record_metrics(model, tokenizer, record, fluency=False) -> RecordMetrics`` (ES/PS/NS,
  EM/PM/NM, n-gram-entropy fluency) and ``aggregate(records)`` (×100 with 95% CIs and S).
"""

from xvariants.editing.deltas import EditResult, WeightSnapshot, preserved
from xvariants.editing.finetune import FTOptions, ft_edit
from xvariants.editing.memit import MEMITOptions, memit_edit
from xvariants.editing.metrics import RecordMetrics, aggregate, ngram_entropy, record_metrics, target_nll
from xvariants.editing.requests import EditError, EditRequest
from xvariants.editing.rome import ROMEOptions, peak_step, rome_edit
from xvariants.editing.stats import KeyStats, StatsError, collect_key_stats, key_stats, model_fingerprint
from xvariants.editing.values import TargetOptions

__all__ = [
    "EditError", "EditRequest", "EditResult", "FTOptions", "KeyStats", "MEMITOptions", "ROMEOptions",
    "RecordMetrics", "StatsError", "TargetOptions", "WeightSnapshot", "aggregate", "collect_key_stats",
    "ft_edit", "key_stats", "memit_edit", "model_fingerprint", "ngram_entropy", "peak_step", "preserved",
    "record_metrics", "rome_edit", "target_nll",
]
