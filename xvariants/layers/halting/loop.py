"""The recurrence over depth that both universal bodies run: fixed-step, or adaptive (ACT).

One loop, :func:`run_steps`. A body supplies ``step_fn(x, n, running)`` that applies its
shared block once; the loop owns everything around it: which positions run, the halting
probabilities and their book-keeping, the ``"freeze"`` rule for halted states, and the
per-step hook points (``hook_active``, ``hook_resid_post``, ``hook_halting_prob``, fired in
that order around the block's own hooks).

A step may be computed densely (every position, ``(halting_input, new_state)``) or sparsely
(only the running positions, a :class:`SparseStep`); the loop merges either into the state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from xvariants.layers.halting.unit import ACTResult, AdaptiveHalting


@dataclass
class SparseStep:
    """A step computed at some positions only (the others keep their state).

    ``index`` ``(batch, position)`` of those positions; ``s`` ``[N, D]`` their halting inputs;
    ``new`` ``[N, D]`` their new states; ``state`` ``[B, T, D]`` the states before the step,
    which the loop updates in place at ``index``: the step passes a tensor it may write into
    (its own copy of ``x``, not the caller's input nor a tensor autograd saved).
    """

    index: tuple[torch.Tensor, torch.Tensor]
    s: torch.Tensor
    new: torch.Tensor
    state: torch.Tensor


StepResult = Union[tuple[torch.Tensor, torch.Tensor], SparseStep]
#: ``(x [B, T, D], step n, running [B, T] or None in fixed-step mode) -> StepResult``
StepFn = Callable[[torch.Tensor, int, Union[torch.Tensor, None]], StepResult]


def running_rows(running: torch.Tensor) -> torch.Tensor | None:
    """Indices of the batch rows with a running position; None when that is every row (so the
    caller can skip the gather)."""
    rows = running.any(1)
    return None if bool(rows.all()) else rows.nonzero().squeeze(1)


def run_steps(
    step_fn: StepFn,
    x: torch.Tensor,
    n_steps: int,
    *,
    halting: "AdaptiveHalting | None" = None,
    padding_mask: torch.Tensor | None = None,
    step_hooks: Sequence[nn.Module] | None = None,
) -> tuple[torch.Tensor, "ACTResult | None"]:
    """Apply ``step_fn`` ``n_steps`` times, or under ACT (``halting``) until every position
    has halted (at most ``halting.max_steps``).

    :param step_fn: ``(x, n, running) -> (halting_input, new_x)`` or a :class:`SparseStep`;
        ``running`` is None without ACT. Under ``halted_update="freeze"`` the entries of
        ``new_x`` at halted positions are ignored (their state is copied forward).
    :param x: initial states ``[B, T, D]``.
    :param padding_mask: ``[B, T]`` True at padding (starts halted under ACT).
    :param step_hooks: per-step modules; ``step_hooks[n]``'s ``hook_active`` /
        ``hook_resid_post`` / ``hook_halting_prob`` fire at step ``n`` where they exist.
    :returns: the state after the last step and, under ACT, the loop's :class:`ACTResult`.
    """
    if halting is None:
        for n in range(n_steps):
            _, x = step_fn(x, n, None)
            x = _fire(step_hooks, n, "hook_resid_post", x)
        return x, None
    hs = halting.start(x, padding_mask)
    freeze = halting.halted_update == "freeze"
    for n in range(halting.max_steps):
        running = hs.running
        if not bool(running.any()):
            break
        running = _fire(step_hooks, n, "hook_active", halting.hook_active(running))
        out = step_fn(x, n, running)
        if isinstance(out, SparseStep):
            p = torch.zeros(running.shape, dtype=out.s.dtype, device=out.s.device)
            p = p.index_put(out.index, halting.halting_prob(out.s))
            p = _fire(step_hooks, n, "hook_halting_prob", halting.hook_halting_prob(p))
            new = out.new.to(x.dtype)
            halting.update(hs, p, new, index=out.index)
            x = out.state.index_put_(out.index, new)
            continue
        s, new = out
        if freeze and not bool(running.all()):
            new = torch.where(running.unsqueeze(-1), new, x)
        new = _fire(step_hooks, n, "hook_resid_post", new)
        p = _fire(step_hooks, n, "hook_halting_prob", halting.hook_halting_prob(halting.halting_prob(s)))
        halting.update(hs, p, new)
        x = new
    if halting.training:
        halting.tick()
    return x, halting.result(hs, x)


def _fire(step_hooks: Sequence[nn.Module] | None, n: int, name: str, t: torch.Tensor) -> torch.Tensor:
    hook = None if step_hooks is None else getattr(step_hooks[n], name, None)
    return t if hook is None else hook(t)
