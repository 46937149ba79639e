"""Bodies behind one contract, and the language model / classifier around them.

Importing this package registers every body with the registry.
"""

from xvariants.models import vanilla  # noqa: F401  (registers "vanilla")
from xvariants.models import universal  # noqa: F401  (registers "universal")
from xvariants.models import universal_xl  # noqa: F401  (registers "universal_xl")
from xvariants.models import xl  # noqa: F401  (registers "xl")
from xvariants.models.build import build_language_model
from xvariants.models.contract import AuxOutput, Body, BodyOutput, detach_state, map_state
from xvariants.models.lm import LanguageModel, LMOutput, SequenceClassifier, sample_next
from xvariants.models.registry import BODIES, build_body, register_body
from xvariants.models.vanilla import VanillaBody

__all__ = [
    "BODIES",
    "AuxOutput",
    "Body",
    "BodyOutput",
    "LMOutput",
    "LanguageModel",
    "SequenceClassifier",
    "VanillaBody",
    "build_body",
    "build_language_model",
    "detach_state",
    "map_state",
    "register_body",
    "sample_next",
]
