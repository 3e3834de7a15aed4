"""Corpus statistics for baselines: unigram entropy / cross-entropy and bits per byte."""

from __future__ import annotations

import math

import numpy as np

from aoe.data.errors import DataError

__all__ = ["token_counts", "unigram_entropy", "unigram_cross_entropy", "bits_per_byte"]

_CHUNK = 1 << 24


def token_counts(tokens: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """int64 [max(vocab_size, max id + 1)]: occurrences of each id in the 1-D ``tokens``
    (chunked, so a memmap is never loaded whole)."""
    if getattr(tokens, "ndim", None) != 1 or len(tokens) == 0:
        raise DataError(f"token_counts needs a non-empty 1-D array, got shape {getattr(tokens, 'shape', None)}")
    counts = np.zeros(vocab_size or 0, dtype=np.int64)
    for start in range(0, len(tokens), _CHUNK):
        c = np.bincount(np.asarray(tokens[start:start + _CHUNK]), minlength=len(counts))
        if len(c) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(c) - len(counts), dtype=np.int64)])
        counts[: len(c)] += c
    return counts


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats/token of the empirical unigram distribution of ``tokens``: the loss of the
    best context-free predictor fitted to these very tokens."""
    counts = token_counts(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int,
                          alpha: float = 1.0) -> float:
    """Nats/token of ``eval_tokens`` under the add-``alpha`` smoothed unigram model of
    ``train_tokens``: the honest context-free baseline for a validation loss."""
    if alpha <= 0:
        raise DataError(f"alpha must be > 0, got {alpha!r}")
    train = token_counts(train_tokens, vocab_size)
    evalc = token_counts(eval_tokens, vocab_size)
    if len(train) > vocab_size or len(evalc) > vocab_size:
        raise DataError(f"token ids >= vocab_size={vocab_size} found")
    logp = np.log(train + alpha) - math.log(train.sum() + alpha * vocab_size)
    return float(-(evalc * logp).sum() / evalc.sum())


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """Convert a loss in nats/token to bits per UTF-8 byte of text."""
    if bytes_per_token <= 0:
        raise DataError(f"bytes_per_token must be > 0, got {bytes_per_token!r}")
    return nats_per_token / math.log(2) / bytes_per_token
