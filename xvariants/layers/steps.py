"""Pieces of a weight-shared recurrence over depth (the universal bodies): the per-step hook
points and the timing signals added to the state before every step."""

from __future__ import annotations

import torch
from torch import nn

from xvariants.layers.hooks import HookPoint
from xvariants.layers.positions import sinusoid_table

SIGNALS = ("sinusoidal", "learned", "none")


def default_signal_scale(init_std: float, d_model: int) -> float:
    """Multiplier giving signal components the rms of a sqrt(d)-scaled initial embedding."""
    return init_std * (2.0 * d_model) ** 0.5


def step_signal_table(
    kind: str, n_steps: int, d_model: int, learned: torch.Tensor | None, device, dtype
) -> torch.Tensor | None:
    """Unscaled step ("depth") signals ``[n_steps, D]``: sinusoids of the step index, the
    ``learned`` table, or None for ``kind="none"``."""
    if kind == "none":
        return None
    if kind == "learned":
        return learned
    return sinusoid_table(torch.arange(n_steps, device=device), d_model).to(dtype)


class StepSignal:
    """What is added to the state before step ``n``: ``scale * (pos + steps[n])``.

    :param pos: position signal ``[1 or B, T, D]`` or None.
    :param steps: step signals ``[S, D]`` or None.
    :param scale: multiplier of both.
    """

    def __init__(self, pos: torch.Tensor | None, steps: torch.Tensor | None, scale: float):
        self.pos, self.steps, self.scale = pos, steps, scale
        self._table: dict[int, torch.Tensor | float] = {}

    @property
    def empty(self) -> bool:
        return self.pos is None and self.steps is None

    def __call__(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``x`` ``[B, T, D]`` plus the signal of step ``n``."""
        pos, steps, scale = self.pos, self.steps, self.scale
        if pos is None and steps is None:
            return x
        if pos is None:
            return x + scale * steps[n]
        sig = pos if steps is None else pos + steps[n]  # [1 or B, T, D]: one add on the batch
        return x + (sig if scale == 1.0 else scale * sig)

    def at(self, n: int, b, t) -> torch.Tensor | float:
        """The signal of step ``n`` at positions ``(b, t)`` (index tensors or slices), to add to
        the states gathered there; the scaled table of the current step is kept."""
        if n not in self._table:
            pos, steps, scale = self.pos, self.steps, self.scale
            sig = pos if steps is None else (steps[n] if pos is None else pos + steps[n])
            self._table.clear()
            self._table[n] = 0.0 if sig is None else (sig if scale == 1.0 else scale * sig)
        sig = self._table[n]
        if isinstance(sig, float) or sig.dim() == 1:
            return sig
        return sig[b, t] if sig.size(0) > 1 else sig[0, t]


class StepHooks(nn.Module):
    """Hook points of one application step ``steps.{n}`` (TransformerLens-style names).

    ``hook_resid_pre``: the step input (state + position + step signal) ``[B, T, D]``;
    ``hook_resid_post``: the state after the step (halted positions copied) ``[B, T, D]``;
    ``hook_halting_prob``: p ``[B, T]`` (ACT); ``hook_active``: running mask ``[B, T]`` (ACT).
    The shared block's own hooks (``block.attn.hook_pattern`` ...) fire at every step too;
    ``body.current_step`` tells a hook function which step it is in.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_halting_prob = HookPoint()
        self.hook_active = HookPoint()
