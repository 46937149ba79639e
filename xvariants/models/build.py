"""Build a model from one flat, plain-typed config dict (what Hydra composes and what the
checkpoint stores), so ``load_from_checkpoint`` needs no Hydra."""

from __future__ import annotations

from typing import Any

from xvariants.config_errors import config_scope, require
from xvariants.models.lm import LanguageModel
from xvariants.models.registry import BODIES, build_body

#: keys that configure the embedding/head around the body; everything else goes to the body
#: adaptive input + adaptive softmax (any body); absent or ``adaptive_cutoffs: null`` = full softmax
ADAPTIVE_KEYS = ("adaptive_cutoffs", "div_val", "tie_projs", "d_embed", "proj_init_std")
LM_KEYS = ("positions", "max_len", "tie_embeddings", "emb_dropout", "embed_scale") + ADAPTIVE_KEYS


def split_model_config(config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``{"body": name, <LM keys>, <body keys>}`` -> (name, LM kwargs, body kwargs)."""
    config = dict(config)
    name = config.pop("body", None)
    require(name is not None, "model.body", "missing", sorted(BODIES))
    config.pop("vocab_size", None)
    lm_kwargs = {k: config.pop(k) for k in LM_KEYS if k in config}
    return name, lm_kwargs, config


def build_language_model(config: dict[str, Any], vocab_size: int) -> LanguageModel:
    """Build ``embedding -> body -> head`` from a flat model config; every part checks its own
    arguments and errors name them as ``model.<field>``."""
    require(isinstance(vocab_size, int) and vocab_size > 0, "data.vocab_size", f"must be a positive int, got {vocab_size}")
    name, lm_kwargs, body_kwargs = split_model_config(config)
    adaptive = {k: lm_kwargs.pop(k) for k in ADAPTIVE_KEYS if k in lm_kwargs}
    with config_scope("model."):
        body = build_body(name, **body_kwargs)
        if adaptive:
            from xvariants.layers.adaptive import build_adaptive_from_config

            embedding, head = build_adaptive_from_config(adaptive, lm_kwargs, body, vocab_size, body_kwargs.get("init_std", 0.02))
            if embedding is not None:
                return LanguageModel(body, vocab_size, embedding=embedding, head=head, **lm_kwargs)
        return LanguageModel(body, vocab_size, **lm_kwargs)
