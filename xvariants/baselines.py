"""Reference points a trained model must beat."""

from __future__ import annotations

import math

import numpy as np


def unigram_cross_entropy(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``valid`` of a unigram model fit on ``train`` with
    add-one smoothing: what a model that ignores context achieves."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(valid, dtype=np.int64)].mean())


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
