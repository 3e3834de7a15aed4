"""Batches of (input, target) windows over a 1-D token array (e.g. ``TokenData.train``).

Training: :class:`BatchSampler` draws random windows. The GLOBAL batch of step ``s`` is a fixed
function of ``(seed, s, batch_size, seq_len, len(tokens))``: ``batch_size`` window starts drawn
uniformly from ``[0, len(tokens) - seq_len - 1]`` by ``numpy.random.default_rng([seed, s])``.
Rank ``r`` of ``world_size`` takes rows ``[r*b, (r+1)*b)`` with ``b = batch_size // world_size``,
so W processes together see exactly the sequences one process sees with the same global batch,
and the state (seed, step) resumes exactly, even under a different world_size.

Evaluation: :func:`iter_eval_batches` walks non-overlapping windows in order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from aoe.data.errors import DataError

__all__ = ["BatchSampler", "iter_eval_batches", "num_eval_windows"]


def _check_1d(tokens, seq_len: int, what: str) -> None:
    if getattr(tokens, "ndim", None) != 1:
        raise DataError(f"{what}: tokens must be a 1-D array, got shape {getattr(tokens, 'shape', None)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"{what}: seq_len must be a positive int, got {seq_len!r}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"{what}: {len(tokens)} tokens are too few for one window of seq_len={seq_len} (+1 target)")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: int64 [len(starts), seq_len] with y[i, t] = tokens[starts[i] + t + 1]."""
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    windows = np.asarray(tokens[idx], dtype=np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


class BatchSampler:
    """Deterministic, resumable random-window sampler.

    tokens: 1-D array of token ids (np.memmap / ndarray, any integer dtype).
    batch_size: the GLOBAL batch size (all ranks together); must be divisible by world_size.
    Each rank yields ``local_batch_size = batch_size // world_size`` rows.
    Yields / returns ``(x, y)``: torch.int64 tensors of shape [local_batch_size, seq_len], with
    y the next-token targets of x (windows of seq_len + 1 tokens).
    State is only ``(seed, step)``; ``step`` is the index of the next batch ``__next__`` returns.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_1d(tokens, seq_len, "BatchSampler")
        for name, value in (("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"BatchSampler: {name} must be a positive int, got {value!r}")
        if batch_size % world_size:
            raise DataError(f"BatchSampler: global batch_size={batch_size} is not divisible by world_size={world_size}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"BatchSampler: rank={rank!r} is not in [0, world_size={world_size})")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.seed = self._check_seed(seed)
        self.step = 0

    @staticmethod
    def _check_seed(seed: int) -> int:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"BatchSampler: seed must be a non-negative int, got {seed!r}")
        return int(seed)

    def global_starts(self, step: int) -> np.ndarray:
        """int64 [batch_size]: window starts of the whole global batch of ``step``."""
        if step < 0:
            raise DataError(f"BatchSampler: step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of ``step``, without changing the sampler's state."""
        b = self.local_batch_size
        starts = self.global_starts(step)[self.rank * b:(self.rank + 1) * b]
        return _gather(self.tokens, starts, self.seq_len)

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        try:
            seed, step = state["seed"], state["step"]
        except (KeyError, TypeError) as e:
            raise DataError(f"BatchSampler state must have 'seed' and 'step', got {state!r}") from e
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise DataError(f"BatchSampler state step must be a non-negative int, got {step!r}")
        self.seed = self._check_seed(seed)
        self.step = int(step)

    def __repr__(self) -> str:
        return (f"BatchSampler(tokens={len(self.tokens)}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"seed={self.seed}, step={self.step}, rank={self.rank}, world_size={self.world_size})")


def num_eval_windows(n_tokens: int, seq_len: int) -> int:
    """Number of non-overlapping evaluation windows in ``n_tokens`` tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def num_eval_batches(n_tokens: int, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
    """Number of (global) batches ``iter_eval_batches`` makes of ``n_tokens`` tokens, over all ranks."""
    n_batches = -(-num_eval_windows(n_tokens, seq_len) // batch_size)
    return n_batches if max_batches is None else min(n_batches, max_batches)


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                      rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential evaluation batches: window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``
    (x = the first seq_len tokens, y = the last seq_len), for ``i < (len(tokens) - 1) // seq_len``;
    so every target position 1..n-1 is covered except a final remainder of < seq_len tokens.
    Windows are grouped in order into batches of ``batch_size`` rows (the last may be smaller).
    max_batches caps the number of (global) batches; with ``world_size > 1``, global batch ``k``
    goes to rank ``k % world_size``. Yields torch.int64 (x, y) of shape [rows, seq_len].
    """
    _check_1d(tokens, seq_len, "iter_eval_batches")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"iter_eval_batches: batch_size must be a positive int, got {batch_size!r}")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"iter_eval_batches: max_batches must be >= 1 or None, got {max_batches!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"iter_eval_batches: rank={rank!r} is not in [0, world_size={world_size})")
    n_windows = num_eval_windows(len(tokens), seq_len)
    n_batches = num_eval_batches(len(tokens), batch_size, seq_len, max_batches)
    for k in range(rank, n_batches, world_size):
        first = k * batch_size
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * seq_len
        yield _gather(tokens, starts, seq_len)
