"""ACT options: one dataclass with the defaults, validated once, and the rule that decides
between fixed-step and adaptive recurrence.

Errors name the option itself (``max_steps``); a body wraps construction in
``config_scope("model.")`` so that users see ``model.max_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from xvariants.config_errors import ConfigError, require

WEIGHTINGS = ("graves", "t2t")
#: What happens to a halted position's state; see :class:`ACTOptions` for the exact rules.
HALTED_UPDATES = ("freeze", "t2t")
ACT_COMPUTE = ("sparse", "dense")

#: Default halting-bias init. p = sigmoid(-3) ~ 0.047, so at initialisation every position
#: runs to ``max_steps`` ("deep start") and the ponder cost then removes the steps that do
#: not help. tensor2tensor's +1 (p ~ 0.73) and a zero bias (p = 0.5) both halt every
#: position at step 2 at init, the collapse reported in t2t#1723.
DEFAULT_HALTING_BIAS = -3.0

#: Steps of a universal body without ACT when ``num_steps`` is not set.
DEFAULT_NUM_STEPS = 6


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class ACTOptions:
    """Options of adaptive halting (the names are the config keys of the universal bodies).

    :param max_steps: most steps a position may take; one still running there halts (forced)
        and receives its remainder.
    :param act_epsilon: a position halts once its summed halting probability reaches ``1 - eps``.
    :param ponder_weight: weight of the ponder cost ``mean(N + R)`` in the objective.
    :param ponder_warmup_steps: the ponder weight ramps linearly from 0 over this many training
        forward passes.
    :param halting_warmup_steps: training forward passes during which the halting unit gets no
        gradient (with the deep-start bias every position runs ``max_steps`` meanwhile).
    :param halting_bias_init: initial bias of the halting unit (:data:`DEFAULT_HALTING_BIAS`).
    :param halted_update: what a halted position's *state* does at later steps (its output is
        fixed by the step weights either way). ``"freeze"``: the state is copied forward
        unchanged, and the keys/values it shows the positions still running are frozen too,
        computed once from its final state plus the timing signal of the step after it halted.
        (The paper's copy rule, taken literally, would re-add each later step's timing signal to
        the copied state, so its keys would change from step to step.) ``"t2t"``: the state keeps
        being transformed by the shared block like everyone else's, as tensor2tensor's
        ``universal_transformer_act`` does.
    :param act_weighting: ``"graves"`` (output ``sum_n w_n h_n``, weights sum to 1) or ``"t2t"``
        (tensor2tensor's interpolation ``out = w h + (1 - w) out``).
    :param act_compute: ``"sparse"`` (work only for the positions a step changes) or ``"dense"``
        (every position every step, same results); used by the universal body.
    :param halting_logit_scale: the halting logit is ``scale * (w . s) + b``.
    """

    max_steps: int = 8
    act_epsilon: float = 0.01
    ponder_weight: float = 0.01
    ponder_warmup_steps: int = 0
    halting_warmup_steps: int = 0
    halting_bias_init: float = DEFAULT_HALTING_BIAS
    halted_update: str = "freeze"
    act_weighting: str = "graves"
    act_compute: str = "sparse"
    halting_logit_scale: float = 1.0

    def __post_init__(self) -> None:
        require(self.act_compute in ACT_COMPUTE, "act_compute", f"unknown mode {self.act_compute!r}", ACT_COMPUTE)
        m = self.max_steps
        require(_is_int(m) and m >= 1, "max_steps", f"must be an integer >= 1, got {m!r}")
        eps = self.act_epsilon
        require(_is_finite(eps) and 0.0 < eps < 1.0, "act_epsilon", f"must lie strictly between 0 and 1, got {eps!r}")
        pw = self.ponder_weight
        require(_is_finite(pw) and pw >= 0.0, "ponder_weight", f"must be a finite number >= 0, got {pw!r}")
        for name in ("ponder_warmup_steps", "halting_warmup_steps"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
        b = self.halting_bias_init
        require(_is_finite(b), "halting_bias_init", f"must be a finite number, got {b!r}")
        s = self.halting_logit_scale
        require(_is_finite(s) and s > 0, "halting_logit_scale", f"must be a finite number > 0, got {s!r}")
        w = self.act_weighting
        require(w in WEIGHTINGS, "act_weighting", f"unknown weighting {w!r}", WEIGHTINGS)
        u = self.halted_update
        require(u in HALTED_UPDATES, "halted_update", f"unknown halted update {u!r}", HALTED_UPDATES)


def act_arguments(arguments: dict) -> dict:
    """The :class:`ACTOptions` fields among a body constructor's ``arguments`` (its ``locals()``):
    the bodies take every ACT option as a typed, documented argument (the config keys are the
    signature) and hand them on with ``resolve_step_options(act, num_steps, **act_arguments(locals()))``."""
    return {f.name: arguments[f.name] for f in fields(ACTOptions) if f.name in arguments}


def resolve_step_options(act: bool, num_steps: int | None, **act_opts) -> tuple[int, ACTOptions | None]:
    """The step count of a universal body and its ACT options (None without ACT).

    ``act_opts`` are :class:`ACTOptions` fields, None meaning "not set": setting one without
    ``act=true`` is an error, and so is ``num_steps`` with ``act=true`` (ACT counts steps with
    ``max_steps``). Returns ``(loop bound, options)``.
    """
    names = {f.name for f in fields(ACTOptions)}
    unknown = set(act_opts) - names
    if unknown:
        raise TypeError(f"unknown ACT options {sorted(unknown)}")
    if not act:
        for name, value in act_opts.items():
            if value is not None:
                raise ConfigError(
                    name,
                    "is an ACT option and needs act=true "
                    f"(fixed-step mode counts steps with num_steps; got {name}={value!r})",
                )
        num_steps = DEFAULT_NUM_STEPS if num_steps is None else num_steps
        require(_is_int(num_steps) and num_steps >= 1, "num_steps", f"must be an integer >= 1, got {num_steps!r}")
        return num_steps, None
    if num_steps is not None:
        raise ConfigError(
            "num_steps",
            f"fixes the step count, which ACT decides per position: set max_steps instead (got num_steps={num_steps})",
        )
    opts = ACTOptions(**{k: v for k, v in act_opts.items() if v is not None})
    return opts.max_steps, opts
