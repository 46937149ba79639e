"""Evaluation: procedures over a token array (sliding window, segments with memory), the
multi-checkpoint comparison behind ``python eval.py compare=[...]``, RECL."""

from xvariants.evaluation.procedures import evaluate_tokens, pick_procedure, segments_with_memory, sliding_window
from xvariants.evaluation.streams import EvalResult, make_streams, position_profile, sliding_plan
from xvariants.evaluation.recl import RECLResult, recl, relative_gain

__all__ = [
    "EvalResult",
    "RECLResult",
    "evaluate_tokens",
    "make_streams",
    "pick_procedure",
    "position_profile",
    "recl",
    "relative_gain",
    "segments_with_memory",
    "sliding_plan",
    "sliding_window",
]
