"""Evaluation: procedures over a token array (sliding window, segments with memory), the
multi-checkpoint comparison behind ``python eval.py compare=[...]``, RECL, fact accuracy on a
known-facts file."""

from xvariants.evaluation.facts import FactAccuracy, fact_accuracy, load_known_facts
from xvariants.evaluation.procedures import evaluate_tokens, pick_procedure, segments_with_memory, sliding_window
from xvariants.evaluation.recl import RECLResult, recl, relative_gain
from xvariants.evaluation.streams import EvalResult, make_streams, position_profile, sliding_plan

__all__ = [
    "EvalResult",
    "FactAccuracy",
    "RECLResult",
    "evaluate_tokens",
    "fact_accuracy",
    "load_known_facts",
    "make_streams",
    "pick_procedure",
    "position_profile",
    "recl",
    "relative_gain",
    "segments_with_memory",
    "sliding_plan",
    "sliding_window",
]
