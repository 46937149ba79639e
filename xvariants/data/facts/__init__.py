"""The known-facts corpus (issue 11): fictional people and their facts, for causal tracing
and editing. ``generate(seed, n_subjects, mentions) -> FactsSet``; the corpus ``facts``
(``xvariants.data.corpora``) mixes its paragraphs with real text and writes the files."""

from .factset import FACTS_FORMAT, Fact, FactsSet, generate, make_subjects, prompt_of
from .relations import RELATION_NAMES, RELATIONS, Relation

__all__ = ["FACTS_FORMAT", "RELATIONS", "RELATION_NAMES", "Fact", "FactsSet", "Relation", "generate",
           "make_subjects", "prompt_of"]
