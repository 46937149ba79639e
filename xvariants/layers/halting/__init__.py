"""Adaptive Computation Time, in one place: the options (:mod:`.options`), the halting unit
and its book-keeping (:mod:`.unit`), the recurrence loop both universal bodies run
(:mod:`.loop`) and the frozen keys/values of halted positions (:mod:`.frozen`)."""

from xvariants.layers.halting.loop import SparseStep, StepFn, run_steps, running_rows
from xvariants.layers.halting.options import (
    ACT_COMPUTE,
    DEFAULT_HALTING_BIAS,
    DEFAULT_NUM_STEPS,
    HALTED_UPDATES,
    WEIGHTINGS,
    ACTOptions,
    act_arguments,
    resolve_step_options,
)
from xvariants.layers.halting.unit import ACTResult, AdaptiveHalting, HaltingState

__all__ = [
    "ACT_COMPUTE",
    "ACTOptions",
    "ACTResult",
    "AdaptiveHalting",
    "DEFAULT_HALTING_BIAS",
    "DEFAULT_NUM_STEPS",
    "HALTED_UPDATES",
    "HaltingState",
    "SparseStep",
    "StepFn",
    "WEIGHTINGS",
    "act_arguments",
    "resolve_step_options",
    "run_steps",
    "running_rows",
]
