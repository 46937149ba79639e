"""Long-context evaluation procedures: plain functions over a token array, no Lightning.

The split is cut into contiguous streams (:func:`~xvariants.evaluation.streams.make_streams`);
the *targets* are stream positions ``1 .. L-1``, each scored exactly once by every procedure,
so results of different procedures and models on the same streams are per-token comparable
(RECL needs that).

* :func:`sliding_window` (stateless bodies): windows of ``W`` input tokens; the first window
  scores all its ``W`` targets, every later window advances by ``stride`` and scores only its
  last ``stride`` targets (the last window is moved back to end at the stream's last token and
  scores what is left). Stride 1 gives every token (after the first window) the full ``W``
  tokens of context; larger strides are faster and give less context on average (reported
  as ``mean_context``). ``W >= L-1`` is one full forward of each stream.
* :func:`segments_with_memory` (stateful bodies, Transformer-XL): consecutive segments of
  ``tgt_len`` tokens, the state carried from one to the next, ``mem_len = attention_length -
  tgt_len`` and an optional ``clamp_len`` set on the body for the duration of the call.

Both return an :class:`EvalResult` with per-target NLL (nats), the position of each target
inside the attended window (= tokens of context it could attend to directly, minus one) and
how often each target was scored (all ones).
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from xvariants.config_errors import ConfigError, require
from xvariants.evaluation.streams import EvalResult, check_attention_length, sliding_plan
from xvariants.models.contract import detach_state
from xvariants.modes import eval_modes

PROCEDURES = ("auto", "sliding", "segments")
#: input tokens per sliding-window forward (windows of all streams are batched up to this)
MAX_BATCH_TOKENS = 8192


# --------------------------------------------------------------------------- forward helpers
class _StatMean:
    """Token-weighted means of scalar aux stats (e.g. ACT ponder steps)."""

    KEYS = ("ponder_steps_mean", "halt_step1_frac", "halt_max_frac")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, aux, weight: float) -> None:
        stats = getattr(aux, "stats", None) or {}
        if not any(k in stats for k in self.KEYS):
            return
        self.weight += weight
        for k in self.KEYS:
            if k in stats:
                self.sums[k] = self.sums.get(k, 0.0) + float(stats[k]) * weight

    def result(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def _eval_mode(model):
    # not inference_mode: bodies may inspect tensor versions (xl kv cache)
    with eval_modes(model), torch.no_grad():
        yield


@contextlib.contextmanager
def body_lengths(body, mem_len: int | None = None, clamp_len: int | None = None, same_length: bool | None = None):
    """Set a stateful body's memory/clamp length (and ``same_length``) for the duration.

    Uses the body's ``lengths`` context manager or ``set_eval_lengths`` when it has one
    (the xl body does); a stateful body without them must already have the lengths asked for.
    """
    if mem_len is None and clamp_len is None and same_length is None:
        yield
        return
    if hasattr(body, "lengths"):
        with body.lengths(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length):
            yield
        return
    if hasattr(body, "set_eval_lengths"):
        old = (getattr(body, "mem_len", None), getattr(body, "clamp_len", None), getattr(body, "same_length", None))
        body.set_eval_lengths(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        try:
            yield
        finally:
            body.set_eval_lengths(mem_len=old[0], clamp_len=old[1], same_length=old[2])
        return
    current = getattr(body, "mem_len", None)
    if mem_len is not None and current is not None and current != mem_len:
        raise ConfigError(
            "eval.procedure",
            f"the {type(body).__name__} body cannot change its memory length after construction "
            f"(has mem_len={current}, the attention length needs {mem_len})",
        )
    yield


def _segment_clamp(body, seg_len: int):
    """Clamp off for a segment too short for any distance to reach ``clamp_len`` (the last
    segment of a stream): the result is the same, and the xl bodies refuse such a clamp because
    in a training config it is a mistake. The body says when that is (``clamp_unused``)."""
    unused = getattr(body, "clamp_unused", None)
    return body.lengths(clamp_len=-1) if unused is not None and unused(seg_len) else contextlib.nullcontext()


def _context_limit(model) -> int | None:
    return getattr(model, "max_context", None)


def _check_context(model, length: int, what: str) -> None:
    limit = _context_limit(model)
    if limit is not None and length > limit:
        raise ConfigError(
            "eval.attention_lengths",
            f"{what} of {length} tokens is longer than this model's learned positions reach (max_len={limit}); "
            "a model with sinusoidal or relative positions can be evaluated beyond its training length",
            f"<= {limit}",
        )


# --------------------------------------------------------------------------- procedures
def sliding_window(
    model,
    streams: torch.Tensor,
    window: int,
    stride: int,
    *,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    progress: bool = False,
    desc: str = "sliding",
) -> EvalResult:
    """Sliding-window evaluation of a stateless model (see the module docstring).

    Windows of all streams are independent and batched together, up to ``max_batch_tokens``
    input tokens per forward; logits are computed only at scored positions.
    """
    B, L = streams.shape
    n_targets = L - 1
    check_attention_length(window, streams)
    require(isinstance(stride, int) and stride >= 1, "eval.stride", f"must be an integer >= 1, got {stride!r}")
    stride = min(stride, window)
    _check_context(model, window, "a window")
    plan = sliding_plan(n_targets, window, stride)
    starts = torch.tensor([s for s, _ in plan], dtype=torch.long)
    firsts = torch.tensor([f for _, f in plan], dtype=torch.long)
    # every (stream, window) pair, window-major so that a batch shares window positions
    w_idx = torch.arange(len(plan)).repeat_interleave(B)
    b_idx = torch.arange(B).repeat(len(plan))
    per_batch = max(1, max_batch_tokens // window)
    nll = torch.zeros(B, n_targets, dtype=torch.float64)
    pos = torch.zeros(B, n_targets, dtype=torch.int32)
    count = torch.zeros(B, n_targets, dtype=torch.int32)
    offs = torch.arange(window)
    stats = _StatMean()
    device = next(model.parameters()).device
    forwards = 0
    t0 = time.perf_counter()
    body = model.body
    ctx = body_lengths(body, mem_len=0, same_length=False) if getattr(body, "stateful", False) else contextlib.nullcontext()
    with _eval_mode(model), ctx, _progress(B * n_targets, desc, progress) as bar:
        for i in range(0, len(w_idx), per_batch):
            wi, bi = w_idx[i : i + per_batch], b_idx[i : i + per_batch]
            s, f = starts[wi], firsts[wi]
            cols = s[:, None] + offs[None, :]  # input positions
            x = streams[bi[:, None], cols]
            y = streams[bi[:, None], cols + 1]
            out = model.hidden_states(x.to(device))
            forwards += 1
            stats.add(out.aux, float(x.numel()))
            scored = offs[None, :] >= f[:, None]  # [n, W]
            r, c = scored.nonzero(as_tuple=True)
            vals = model.nll_at(out.hidden, y.to(device), r.to(device), c.to(device)).double().cpu()
            tcol = s[r] + c  # target t = s + c + 1 -> column t - 1
            nll[bi[r], tcol] = vals
            pos[bi[r], tcol] = c.to(torch.int32)
            count.index_put_((bi[r], tcol), torch.ones_like(tcol, dtype=torch.int32), accumulate=True)
            if bar is not None:
                bar.update(int(r.numel()))
    seconds = time.perf_counter() - t0
    return EvalResult(
        procedure="sliding",
        attention_length=window,
        nll=nll.numpy(),
        position=pos.numpy(),
        count=count.numpy(),
        seconds=seconds,
        window=window,
        stride=stride,
        forwards=forwards,
        stats=stats.result(),
    )


def segments_with_memory(
    model,
    streams: torch.Tensor,
    tgt_len: int,
    mem_len: int,
    *,
    clamp_len: int | None = None,
    same_length: bool | None = None,
    progress: bool = False,
    desc: str = "segments",
) -> EvalResult:
    """Segment-by-segment evaluation of a stateful model carrying its state (memory).

    Segment ``k`` holds inputs ``k*tgt_len .. (k+1)*tgt_len - 1`` of every stream (the last one
    shorter); the state returned by segment ``k`` is passed to segment ``k+1``. The body's
    ``mem_len`` (and ``clamp_len`` when given; ``-1`` = off) are set for the call. A target's
    position is the memory actually held (``min(tokens seen, mem_len)``) plus its offset in
    the segment.
    """
    B, L = streams.shape
    n_targets = L - 1
    require(isinstance(tgt_len, int) and tgt_len >= 1, "eval.tgt_len", f"must be an integer >= 1, got {tgt_len!r}")
    require(isinstance(mem_len, int) and mem_len >= 0, "eval.attention_lengths",
            f"attention length minus segment length (mem_len) must be >= 0, got {mem_len}")
    check_attention_length(tgt_len + mem_len, streams)
    body = model.body
    if not getattr(body, "stateful", False) and mem_len > 0:
        raise ConfigError(
            "eval.procedure",
            f"segments with memory need a stateful body; {type(body).__name__} keeps no state (use sliding)",
            ["sliding", "auto"],
        )
    if clamp_len is not None and clamp_len != -1:
        require(isinstance(clamp_len, int) and clamp_len >= 1, "eval.clamp_len",
                f"must be -1 (off) or an integer >= 1, got {clamp_len!r}")
        if clamp_len >= mem_len + tgt_len:
            clamp_len = -1  # never clamps at this attention length: identical to off
    nll = torch.zeros(B, n_targets, dtype=torch.float64)
    pos = torch.zeros(B, n_targets, dtype=torch.int32)
    count = torch.zeros(B, n_targets, dtype=torch.int32)
    stats = _StatMean()
    device = next(model.parameters()).device
    forwards = 0
    has_mem_len = hasattr(body, "mem_len")
    set_lengths = body_lengths(body, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length) if getattr(body, "stateful", False) else contextlib.nullcontext()
    t0 = time.perf_counter()
    with _eval_mode(model), set_lengths, _progress(B * n_targets, desc, progress) as bar:
        state = None
        for start in range(0, n_targets, tgt_len):
            end = min(start + tgt_len, n_targets)
            T = end - start
            x = streams[:, start:end].to(device)
            y = streams[:, start + 1 : end + 1].to(device)
            with _segment_clamp(body, T):
                out = model.hidden_states(x, state)
            state = detach_state(out.state)
            forwards += 1
            stats.add(out.aux, float(x.numel()))
            vals = model.nll_at(out.hidden, y).double().cpu()
            nll[:, start:end] = vals
            held = min(start, mem_len) if has_mem_len else start
            pos[:, start:end] = (held + torch.arange(T, dtype=torch.int32))[None, :]
            count[:, start:end] += 1
            if bar is not None:
                bar.update(B * T)
    seconds = time.perf_counter() - t0
    return EvalResult(
        procedure="segments",
        attention_length=tgt_len + mem_len,
        nll=nll.numpy(),
        position=pos.numpy(),
        count=count.numpy(),
        seconds=seconds,
        tgt_len=tgt_len,
        mem_len=mem_len,
        clamp_len=clamp_len,
        forwards=forwards,
        stats=stats.result(),
    )


def pick_procedure(model, procedure: str = "auto") -> str:
    """``auto``: segments with memory for stateful bodies, sliding window otherwise
    (decided from the body's capabilities, never from its name)."""
    require(procedure in PROCEDURES, "eval.procedure", f"unknown procedure {procedure!r}", PROCEDURES)
    if procedure != "auto":
        return procedure
    return "segments" if getattr(model.body, "stateful", False) else "sliding"


def resolve_stride(window: int, stride: int | None, stride_fraction: float | None) -> int:
    """``stride`` (tokens) wins; else ``stride_fraction`` of the window (at least 1)."""
    if stride is not None:
        require(isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1, "eval.stride",
                f"must be an integer >= 1 (tokens) or null, got {stride!r}")
        return min(stride, window)
    frac = 1.0 if stride_fraction is None else stride_fraction
    require(isinstance(frac, (int, float)) and 0 < frac <= 1, "eval.stride_fraction",
            f"must be in (0, 1] (fraction of the window), got {frac!r}")
    return max(1, min(window, int(round(window * frac))))


def evaluate_tokens(
    model,
    streams: torch.Tensor,
    attention_length: int,
    *,
    procedure: str = "auto",
    stride: int | None = None,
    stride_fraction: float | None = 0.25,
    tgt_len: int | None = None,
    clamp_len: int | None = None,
    same_length: bool | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    progress: bool = False,
    desc: str = "",
) -> EvalResult:
    """Evaluate ``model`` on ``streams`` at ``attention_length`` with the right procedure.

    :param procedure: ``auto`` (from the body's capabilities), ``sliding`` or ``segments``.
    :param stride, stride_fraction: sliding window advance (tokens, or fraction of the window).
    :param tgt_len: segment length for ``segments`` (default: the attention length, i.e. no
        memory, unless the caller passes the training segment length); capped at the attention
        length; ``mem_len = attention_length - tgt_len``.
    :param clamp_len: relative-distance clamp for ``segments`` (None = keep the body's).
    :param same_length: every query sees the same number of keys (``segments``; None = keep).
    """
    check_attention_length(attention_length, streams)
    proc = pick_procedure(model, procedure)
    if proc == "sliding":
        s = resolve_stride(attention_length, stride, stride_fraction)
        return sliding_window(model, streams, attention_length, s, max_batch_tokens=max_batch_tokens,
                              progress=progress, desc=desc or f"sliding {attention_length}")
    tgt = attention_length if tgt_len is None else min(tgt_len, attention_length)
    return segments_with_memory(model, streams, tgt, attention_length - tgt, clamp_len=clamp_len,
                                same_length=same_length, progress=progress, desc=desc or f"segments {attention_length}")
