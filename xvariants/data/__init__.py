"""Data pipeline: corpora, tokenizers, token caches, batch datasets and the Lightning data module.

Names are imported lazily on first use, so that ``import xvariants.data.corpora``
(or the tokenizers) pulls in neither torch nor Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "Tokenizer": "tokenizers",
    "ByteTokenizer": "tokenizers",
    "CharTokenizer": "tokenizers",
    "WordTokenizer": "tokenizers",
    "BPETokenizer": "tokenizers",
    "TOKENIZER_NAMES": "tokenizers",
    "build_tokenizer": "tokenizers",
    "tokenizer_from_dict": "tokenizers",
    "Corpus": "corpora",
    "CORPUS_NAMES": "corpora",
    "load_corpus": "corpora",
    "encode_cached": "cache",
    "build_tokenizer_cached": "cache",
    "OrderedStreams": "batching",
    "RandomWindows": "batching",
    "OrderedSampler": "batching",
    "EpochSampler": "batching",
    "LMDataModule": "datamodule",
    "SpanError": "spans",
    "encode_with_offsets": "spans",
    "token_span": "spans",
    "find_subject": "spans",
    "encode_fact": "spans",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
