"""Interpretability layer: canonical hook names, ``run_with_hooks`` / ``run_with_cache``, and
attention-flow analysis (threshold traces, rollout, max-flow, model comparison, views).

See docs/interpretability.md. Heavy pieces (matplotlib views, the Hugging Face adapter) are imported
on use.
"""

from xvariants.interpret.compare import Comparison, attention_difference, compare
from xvariants.interpret.flow import Edge, TraceGraph, trace
from xvariants.interpret.hooks import (
    ActivationCache,
    HookSite,
    HookTable,
    act_name,
    hook_names,
    hooks,
    run_with_cache,
    run_with_hooks,
)
from xvariants.interpret.importance import Attribution, attention_flow, head_importance, rollout
from xvariants.interpret.record import AttentionRecord, record_attention


def plot_trace(*args, **kwargs):
    """See :func:`xvariants.interpret.views.plot_trace`."""
    from xvariants.interpret.views import plot_trace as f

    return f(*args, **kwargs)


def write_html(*args, **kwargs):
    """See :func:`xvariants.interpret.views.write_html`."""
    from xvariants.interpret.views import write_html as f

    return f(*args, **kwargs)


__all__ = [
    "ActivationCache",
    "AttentionRecord",
    "Attribution",
    "Comparison",
    "Edge",
    "HookSite",
    "HookTable",
    "TraceGraph",
    "act_name",
    "attention_difference",
    "attention_flow",
    "compare",
    "head_importance",
    "hook_names",
    "hooks",
    "plot_trace",
    "record_attention",
    "rollout",
    "run_with_cache",
    "run_with_hooks",
    "trace",
    "write_html",
]
