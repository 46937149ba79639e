"""Adaptive Computation Time (Graves, 2016) as a module of its own, reusable around any block.

Per position and step ``n`` the halting unit reads the step input ``s_n`` and emits
``p_n = sigmoid(w . s_n + b)``. A position halts at the first step ``N`` where the cumulative
probability reaches the threshold ``1 - epsilon``, or at ``max_steps`` (a *forced* halt).
At its halting step it gets the remainder ``R = 1 - sum_{n<N} p_n``; every earlier step gets
``p_n``. So, unlike tensor2tensor (see docs/universal-transformer.md), by default:

* the step weights sum to exactly 1 per position and the output is Graves' weighted sum
  ``sum_n w_n h_n`` (``weighting="graves"``; ``"t2t"`` gives tensor2tensor's interpolation
  ``out = w h + (1 - w) out``, whose weights do not sum to 1);
* a position still running at ``max_steps`` is halted there and receives its remainder, so
  its weights sum to 1 and the ponder cost still has a gradient for it;
* padding starts halted: it never runs, never keeps the loop alive and is excluded from the
  ponder cost;
* the ponder cost ``mean(N + R)`` over real positions is differentiable through ``R``
  (``N`` is piecewise constant), i.e. it trains the halting unit.

``halted_update`` says what happens to a halted position's *state* (its output is fixed by
the weights either way): ``"freeze"`` copies it forward unchanged, ``"t2t"`` keeps
transforming it (tensor2tensor), which only matters to the positions that attend to it
(exact rules: :class:`~xvariants.layers.halting.options.ACTOptions`).

The "t2t" values are not tensor2tensor's ``universal_transformer_act``: with
``act_weighting="t2t"``, ``halted_update="t2t"``, ``halting_bias_init=1``, ``step_signal=
learned`` and ``halting_logit_scale=1`` the update rules are t2t's ``basic`` ACT (after the fix
of t2t#1004), but the forced halt above, the padding rule and ``>=`` (t2t: ``>``) at the
threshold stay. The forced halt matters only to positions that reach ``max_steps`` below the
threshold: rare with t2t's +1 bias (p ~ 0.73 halts at step 2), every position at the
deep-start init (bias -3, p ~ 0.047, 8 steps): t2t gives them R = 0, weights summing to 0.32
(interpolation; 0.38 accumulated) and a ponder cost ``N = max_steps`` with zero gradient, so
the ponder cost cannot shorten the computation from there; here they get R = 0.67, weights
summing to 0.76 (interpolation; 1 for Graves) and d(ponder)/d(bias) = -0.32.

Low-level API: :meth:`AdaptiveHalting.start`, :meth:`halting_prob`, :meth:`update`,
:meth:`ponder_cost`. High-level API: ``forward(step_fn, x, padding_mask)`` runs the whole loop
(:func:`~xvariants.layers.halting.loop.run_steps`) around any
``step_fn(x, step, running) -> (halting_input, new_x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.layers.halting.loop import StepFn, run_steps
from xvariants.layers.halting.options import DEFAULT_HALTING_BIAS, ACTOptions
from xvariants.layers.hooks import HookPoint

@dataclass
class HaltingState:
    """Book-keeping of one ACT loop; every per-position tensor is ``[B, T]``.

    ``cum_prob`` is the sum of the halting probabilities taken so far (1 after halting);
    ``n_updates`` is N (steps taken), ``remainders`` R (0 until a position halts);
    ``halted`` is True once a position has halted (padding from the start); ``output`` is
    the ACT output accumulated so far; ``probs``/``weights`` hold each step's ``p`` and
    weight (0 where the position did not run).
    """

    cum_prob: torch.Tensor
    n_updates: torch.Tensor
    remainders: torch.Tensor
    halted: torch.Tensor
    real: torch.Tensor
    output: torch.Tensor | None = None
    step: int = 0
    probs: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)

    @property
    def running(self) -> torch.Tensor:
        """Positions that take the next step."""
        return ~self.halted


@dataclass
class ACTResult:
    """Outcome of :meth:`AdaptiveHalting.forward`.

    ``output`` ``[B, T, D]`` the halting-weighted combination of the step states; ``state`` the
    carried state after the last step; ``ponder_cost`` the unweighted ``mean(N + R)`` over
    real positions (differentiable); ``n_updates``/``remainders`` ``[B, T]``;
    ``halting_probs``/``step_weights`` ``[S, B, T]`` for the ``S`` steps that ran.
    """

    output: torch.Tensor
    state: torch.Tensor
    ponder_cost: torch.Tensor
    n_updates: torch.Tensor
    remainders: torch.Tensor
    halting_probs: torch.Tensor
    step_weights: torch.Tensor
    real: torch.Tensor


class AdaptiveHalting(nn.Module):
    """The ACT halting unit and its book-keeping.

    :param d_model: width of the halting unit's input.
    :param max_steps: most steps a position may take; a position still running there halts
        and receives its remainder.
    :param epsilon: halting threshold is ``1 - epsilon``; must lie in (0, 1).
    :param halting_bias_init: initial bias of the halting unit (see :data:`DEFAULT_HALTING_BIAS`).
    :param weighting: ``"graves"`` (weighted sum, weights sum to 1) or ``"t2t"`` (interpolation).
    :param halted_update: ``"freeze"`` (halted states are copied forward) or ``"t2t"``
        (halted states keep being transformed); used by :meth:`forward`. Bad options raise
        :class:`~xvariants.config_errors.ConfigError` naming the :class:`ACTOptions` field
        (``act_epsilon`` for ``epsilon``, ``act_weighting`` for ``weighting``).
    :param ponder_weight: weight of the ponder cost in the objective (see :meth:`current_ponder_weight`).
    :param ponder_warmup_steps: the weight ramps linearly from 0 over this many training
        forward passes (counted in the ``ponder_calls`` buffer, so it survives checkpoints).
    :param halting_warmup_steps: for this many training forward passes the halting unit gets
        no gradient (its probabilities are detached), so with the deep-start bias every position
        runs ``max_steps`` while the block learns; afterwards halting is trained. Without it the
        task loss alone drives the halting to 2-3 steps within a few hundred Adam steps when
        shallow outputs fit the early loss better (measured: docs/universal-transformer.md).
    :param init_std: std of the halting unit's weight init.
    :param halting_logit_scale: the logit is ``halting_logit_scale * (w . s) + b``. Adam moves
        every weight by about the learning rate per step, all in a consistent direction, so the
        ``w . s`` term of a ``d``-wide unit moves ~``d`` times faster than the bias; a scale of
        ``1 / sqrt(d)`` slows that path down to width-independent speed (the bodies default to 1).
    """

    def __init__(
        self,
        d_model: int,
        *,
        max_steps: int = 8,
        epsilon: float = 0.01,
        halting_bias_init: float = DEFAULT_HALTING_BIAS,
        weighting: str = "graves",
        halted_update: str = "freeze",
        ponder_weight: float = 0.01,
        ponder_warmup_steps: int = 0,
        halting_warmup_steps: int = 0,
        init_std: float = 0.02,
        halting_logit_scale: float = 1.0,
    ):
        super().__init__()
        ACTOptions(
            max_steps=max_steps,
            act_epsilon=epsilon,
            ponder_weight=ponder_weight,
            ponder_warmup_steps=ponder_warmup_steps,
            halting_bias_init=halting_bias_init,
            halting_warmup_steps=halting_warmup_steps,
            act_weighting=weighting,
            halted_update=halted_update,
            halting_logit_scale=halting_logit_scale,
        )  # validation only
        self.logit_scale = float(halting_logit_scale)
        self.max_steps, self.epsilon = max_steps, float(epsilon)
        self.halting_warmup_steps = halting_warmup_steps
        self.threshold = 1.0 - float(epsilon)
        self.weighting, self.halted_update = weighting, halted_update
        self.ponder_weight, self.ponder_warmup_steps = float(ponder_weight), ponder_warmup_steps
        self.halting_bias_init = float(halting_bias_init)
        self.proj = nn.Linear(d_model, 1)
        self.init_std = init_std
        self.reset_parameters()
        self.register_buffer("ponder_calls", torch.zeros((), dtype=torch.long))
        # fire at every step; bodies add per-step copies (steps.{n}.hook_*) for step-resolved access
        self.hook_halting_prob = HookPoint()
        self.hook_active = HookPoint()

    @classmethod
    def from_options(cls, d_model: int, opts: ACTOptions, init_std: float = 0.02) -> "AdaptiveHalting":
        """The halting unit for ``opts`` (already validated)."""
        return cls(
            d_model,
            max_steps=opts.max_steps,
            epsilon=opts.act_epsilon,
            halting_bias_init=opts.halting_bias_init,
            weighting=opts.act_weighting,
            halted_update=opts.halted_update,
            ponder_weight=opts.ponder_weight,
            ponder_warmup_steps=opts.ponder_warmup_steps,
            halting_warmup_steps=opts.halting_warmup_steps,
            init_std=init_std,
            halting_logit_scale=opts.halting_logit_scale,
        )

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=self.init_std)
        nn.init.constant_(self.proj.bias, self.halting_bias_init)

    def extra_repr(self) -> str:
        return (
            f"max_steps={self.max_steps}, epsilon={self.epsilon}, weighting={self.weighting}, "
            f"halted_update={self.halted_update}, ponder_weight={self.ponder_weight}, logit_scale={self.logit_scale:g}"
        )

    # ------------------------------------------------------------------ low-level API
    def halting_prob(self, s: torch.Tensor) -> torch.Tensor:
        """``p = sigmoid(w . s + b)``: ``[..., D] -> [...]`` (last axis squeezed explicitly);
        detached during the halting warm-up."""
        logit = F.linear(s, self.proj.weight).squeeze(-1)
        if self.logit_scale != 1.0:
            logit = logit * self.logit_scale
        p = torch.sigmoid(logit + self.proj.bias)
        return p.detach() if self.halting_frozen() else p

    def halting_frozen(self) -> bool:
        """True while training within the first ``halting_warmup_steps`` forward passes."""
        return self.training and self.halting_warmup_steps > 0 and int(self.ponder_calls) < self.halting_warmup_steps

    def start(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> HaltingState:
        """Fresh book-keeping for states ``x`` ``[B, T, D]``; padding (True) starts halted."""
        B, T = x.shape[:2]
        real = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if padding_mask is not None:
            if padding_mask.shape != (B, T):
                raise ValueError(f"padding_mask must be [B, T] = {(B, T)}, got {tuple(padding_mask.shape)}")
            real = ~padding_mask.bool()
        zeros = torch.zeros(B, T, dtype=x.dtype, device=x.device)
        return HaltingState(
            cum_prob=zeros, n_updates=zeros, remainders=zeros, halted=~real, real=real, output=torch.zeros_like(x)
        )

    def update(
        self,
        hs: HaltingState,
        p: torch.Tensor,
        new_state: torch.Tensor | None = None,
        index: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Take one step: ``p`` ``[B, T]`` the halting probabilities of this step, ``new_state``
        ``[B, T, D]`` this step's states (accumulated into ``hs.output`` when given). With
        ``index`` (``(batch, position)`` of the running positions), ``new_state`` is ``[N, D]``,
        the states of those positions only, and ``hs.output`` is updated in place there.

        Updates ``hs`` and returns this step's weights ``[B, T]``: ``p`` for positions that keep
        running, ``R`` for those that halt now, 0 for those already halted.
        """
        if hs.step >= self.max_steps:
            raise RuntimeError(f"ACT already took max_steps={self.max_steps} steps")
        running = ~hs.halted
        run_f = running.to(p.dtype)
        p = p * run_f
        cum_next = hs.cum_prob + p
        last = hs.step + 1 >= self.max_steps
        halt_now = running & ((cum_next >= self.threshold) | last)
        keep = running & ~halt_now
        remainder = 1.0 - hs.cum_prob  # R = 1 - sum of the earlier p's; differentiable
        w = torch.where(keep, p, torch.where(halt_now, remainder, torch.zeros_like(p)))
        hs.remainders = torch.where(halt_now, remainder, hs.remainders)
        hs.cum_prob = torch.where(halt_now, torch.ones_like(cum_next), cum_next)
        hs.n_updates = hs.n_updates + run_f
        hs.halted = hs.halted | halt_now
        hs.step += 1
        hs.probs.append(p)
        hs.weights.append(w)
        if new_state is not None and index is not None:
            wi = w[index].unsqueeze(-1).to(new_state.dtype)
            if self.weighting == "graves":
                hs.output.index_put_(index, wi * new_state, accumulate=True)
            else:
                hs.output.index_put_(index, wi * new_state + (1.0 - wi) * hs.output[index])
        elif new_state is not None:
            wd = w.unsqueeze(-1).to(new_state.dtype)
            if hs.output is None:
                hs.output = torch.zeros_like(new_state)
            if self.weighting == "graves":
                hs.output = torch.addcmul(hs.output, wd, new_state)
            else:  # tensor2tensor: interpolate towards the new state
                hs.output = wd * new_state + (1.0 - wd) * hs.output
        return w

    @staticmethod
    def ponder_cost(hs: HaltingState) -> torch.Tensor:
        """Unweighted ponder cost ``mean(N + R)`` over real positions (0 if there are none)."""
        rho = (hs.n_updates + hs.remainders) * hs.real.to(hs.remainders.dtype)
        return rho.sum() / hs.real.sum().clamp(min=1)

    def current_ponder_weight(self) -> float:
        """``ponder_weight``, ramped linearly over the first ``ponder_warmup_steps`` training calls."""
        if self.ponder_warmup_steps <= 0:
            return self.ponder_weight
        return self.ponder_weight * min(1.0, float(self.ponder_calls) / self.ponder_warmup_steps)

    def tick(self) -> None:
        """Count one training forward pass (drives the ponder-weight warm-up)."""
        self.ponder_calls += 1

    # ------------------------------------------------------------------ high-level API
    def forward(
        self,
        step_fn: StepFn,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        step_hooks: Sequence[nn.Module] | None = None,
    ) -> ACTResult:
        """Run ACT around ``step_fn`` until every position has halted (at most ``max_steps``).

        :param step_fn: ``(x, step, running) -> (halting_input, new_x)``; ``step`` counts from 0,
            ``running`` ``[B, T]`` marks the positions that take this step (the function may
            skip work for the others; their entries of ``new_x`` are ignored under "freeze").
            It may also return a :class:`~xvariants.layers.halting.loop.SparseStep`.
        :param x: initial states ``[B, T, D]``.
        :param padding_mask: ``[B, T]`` True at padding.
        :param step_hooks: optional per-step modules with ``hook_halting_prob`` / ``hook_active``
            (and optionally ``hook_resid_post``) hook points (``step_hooks[n]`` fires at step ``n``).
        """
        _, res = run_steps(step_fn, x, self.max_steps, halting=self, padding_mask=padding_mask, step_hooks=step_hooks)
        return res

    def result(self, hs: HaltingState, state: torch.Tensor) -> ACTResult:
        """Pack the book-keeping of a finished loop."""
        B, T = hs.real.shape
        empty = hs.cum_prob.new_zeros(0, B, T)
        return ACTResult(
            output=hs.output,
            state=state,
            ponder_cost=self.ponder_cost(hs),
            n_updates=hs.n_updates,
            remainders=hs.remainders,
            halting_probs=torch.stack(hs.probs) if hs.probs else empty,
            step_weights=torch.stack(hs.weights) if hs.weights else empty,
            real=hs.real,
        )

    def report(self, res: ACTResult) -> dict[str, dict[str, torch.Tensor]]:
        """What a body reports about a finished loop (the fields of its ``AuxOutput``): the
        weighted ponder cost as a loss, :meth:`statistics`, and the per-position maps
        ``n_updates``, ``remainders`` ``[B, T]``, ``halting_probs``, ``step_weights``
        ``[B, T, steps run]`` (all detached)."""
        maps = {
            "n_updates": res.n_updates.detach(),
            "remainders": res.remainders.detach(),
            "halting_probs": res.halting_probs.detach().permute(1, 2, 0),
            "step_weights": res.step_weights.detach().permute(1, 2, 0),
        }
        losses = {"ponder_cost": self.current_ponder_weight() * res.ponder_cost}
        return {"losses": losses, "stats": self.statistics(res), "maps": maps}

    def statistics(self, res: ACTResult) -> dict[str, torch.Tensor]:
        """Detached scalars for logging: ponder steps mean/max, fraction halting at step 1 and
        at ``max_steps``, mean remainder, unweighted ponder cost, steps the loop ran."""
        real = res.real
        n = res.n_updates.detach()[real]
        r = res.remainders.detach()[real]
        zero = res.n_updates.new_zeros(())
        if n.numel() == 0:
            n, r = zero[None], zero[None]
        return {
            "ponder_cost_unweighted": res.ponder_cost.detach(),
            "ponder_weight": zero.new_tensor(self.current_ponder_weight()),
            "ponder_steps_mean": n.mean(),
            "ponder_steps_max": n.max(),
            "halt_step1_frac": (n == 1).float().mean(),
            "halt_max_frac": (n == self.max_steps).float().mean(),
            "remainder_mean": r.mean(),
            "act_steps_run": zero.new_tensor(float(res.halting_probs.size(0))),
        }
