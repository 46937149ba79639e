"""On-disk caches: token ids as numpy memmaps, and trained tokenizers as JSON.

Entries are named by a hash of everything that determines their content:

- token ids: the sha256 of the split text and of ``tokenizer.to_dict()``;
- tokenizers: the sha256 of the training text, the tokenizer name and options.

So a changed corpus file, Python version (stdlib corpus) or tokenizer gets a
new entry, and an unchanged one is read back without tokenising again. Every
file is written to a temporary name and moved into place, so concurrent ranks
or an interrupted run never leave a half-written entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from xvariants.atomic import write_atomic

from .tokenizers import Tokenizer, build_tokenizer, tokenizer_from_dict

# Bump when the layout or meaning of cached files changes, to orphan old entries.
CACHE_FORMAT = 1


def text_digest(text: str) -> str:
    """sha256 of the text's exact bytes (surrogate escapes included)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,535 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _read_tokens(bin_path: Path, meta_path: Path) -> np.ndarray | None:
    """The cached ids, or None when the entry is missing or inconsistent."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        length = int(meta["length"])
        if meta.get("format") != CACHE_FORMAT or bin_path.stat().st_size != length * dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(length,))


def encode_cached(
    text: str, tokenizer: Tokenizer, cache_dir: str | Path, *, digest: str | None = None
) -> np.ndarray:
    """Return ``tokenizer.encode(text)`` as a read-only memmap, from the cache when present.

    ``digest`` is ``text_digest(text)`` when the caller already has it. The
    entry is ``<cache_dir>/tokens/<key>.bin`` (raw ids) plus ``<key>.json``
    (dtype, length, provenance); the JSON is written last and marks the entry complete.
    """
    tokenizer_dict = tokenizer.to_dict()
    text_hash = digest or text_digest(text)
    tokenizer_hash = _digest_json(tokenizer_dict)
    key = _digest_json({"format": CACHE_FORMAT, "text": text_hash, "tokenizer": tokenizer_hash})[:32]
    folder = Path(cache_dir) / "tokens"
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    cached = _read_tokens(bin_path, meta_path)
    if cached is not None:
        return cached

    dtype = token_dtype(tokenizer.vocab_size)
    ids = np.asarray(tokenizer.encode(text)).astype(dtype, copy=False)
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "length": int(ids.size),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer_dict["name"],
        "text_sha256": text_hash,
        "tokenizer_sha256": tokenizer_hash,
    }
    write_atomic(bin_path, lambda f: f.write(ids.tobytes()))
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
    cached = _read_tokens(bin_path, meta_path)
    assert cached is not None, f"token cache entry {bin_path} unreadable right after writing it"
    return cached


def build_tokenizer_cached(
    name: str, train_text: str, cache_dir: str | Path, *, digest: str | None = None, **options: Any
) -> Tokenizer:
    """``build_tokenizer(name, train_text, **options)``, trained once and then read from the cache.

    Besides saving time (BPE training takes a while), this makes every rank of a
    distributed run use the very tokenizer rank 0 trained in ``prepare_data``.
    """
    key = _digest_json(
        {
            "format": CACHE_FORMAT,
            "text": digest or text_digest(train_text),
            "name": name,
            "options": options,
        }
    )[:32]
    path = Path(cache_dir) / "tokenizers" / f"{name}-{key}.json"
    if path.is_file():
        try:
            return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError):
            pass  # a corrupt entry is rebuilt below
    tokenizer = build_tokenizer(name, train_text, **options)
    payload = json.dumps(tokenizer.to_dict()).encode("utf-8")
    write_atomic(path, lambda f: f.write(payload))
    return tokenizer
