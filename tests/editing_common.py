"""Shared pieces of the editing tests (tests/test_editing_*.py): the facts_tiny text with its
word tokenizer and CounterFact-style records, tiny random models, fast ROME/MEMIT options."""

from __future__ import annotations

import numpy as np
import torch

from xvariants.data.facts import generate
from xvariants.data.tokenizers import WordTokenizer
from xvariants.editing import MEMITOptions, ROMEOptions
from xvariants.models import build_language_model

FACTS = generate(seed=0, n_subjects=8, mentions=2)
TEXT = "\n".join(FACTS.paragraphs["train"])
TOK = WordTokenizer.train(TEXT)
IDS = TOK.encode(TEXT)  # ~800 tokens: more than d_mlp = 128 keys
#: the facts text then random words: the ReLU MLPs of the XL bodies need varied keys for a
#: well-conditioned C (on facts_tiny alone some units fire on a handful of tokens)
STATS_IDS = np.concatenate([IDS, np.random.default_rng(0).integers(2, TOK.vocab_size, 3000)])
RECORDS = FACTS.counterfact
#: few prefixes and steps: the invariants hold for any number
FAST_ROME = ROMEOptions(context_lengths=((5, 2),), v_num_grad_steps=4)
FAST_MEMIT = MEMITOptions(context_lengths=((5, 2),), v_num_grad_steps=4)
BODIES = {
    "vanilla": {"body": "vanilla", "n_layers": 2},
    "xl": {"body": "xl", "n_layers": 2, "mem_len": 8},
    "universal": {"body": "universal", "act": False, "num_steps": 3},
    # halting spread out over the 3 steps of a random model: about a third of the positions stop after 2
    "universal-act": {"body": "universal", "act": True, "max_steps": 3, "halting_bias_init": 8.0, "init_std": 0.3},
    "universal_xl": {"body": "universal_xl", "act": False, "num_steps": 3, "mem_len": 8},
}


def make_lm(name: str = "vanilla", dtype: torch.dtype = torch.float64):
    """A tiny random causal LM (d_model 32) of body ``name`` over the facts vocabulary."""
    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_heads": 2, "dropout": 0.0, **BODIES[name]}
    return build_language_model(cfg, TOK.vocab_size).to(dtype).eval()


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def same_weights(model, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
