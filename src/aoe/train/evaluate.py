"""Held-out evaluation: validation loss, perplexity, bits per byte, and routing statistics."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from aoe.data import DataError, iter_eval_batches, num_eval_batches, num_eval_windows
from aoe.train.distributed import DistInfo, all_reduce_sum
from aoe.train.metrics import RoutingStats

#: one evaluation forward: (inputs, targets, whether its results count)
Batch = tuple[torch.Tensor, torch.Tensor, bool]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    bytes_per_token: float | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    dist_info: DistInfo | None = None,
    lockstep: bool = False,
) -> dict[str, Any]:
    """Mean next-token cross entropy over the first ``max_batches`` batches of non-overlapping
    windows of ``tokens`` (see ``aoe.data.iter_eval_batches``), every target counted once.

    Returns ``{"val_loss" (nats/token), "val_ppl" (exp of it), "val_bpb" (bits per UTF-8 byte,
    when bytes_per_token is given), "val_tokens", "layers" (routing statistics of each sparse
    layer on these tokens, see ``RoutingStats``)}``. Under torch.distributed the batches are
    shared out over ranks and the sums reduced, so every rank returns the same numbers.

    ``lockstep``: the model's forward is collective (FSDP's all-gathers, expert parallelism's
    all-to-alls), so every rank runs as many forwards as the rank with the most batches; a rank
    with fewer runs the missing ones on one window of the first batch and counts none of them.
    """
    _check_enough_tokens(len(tokens), seq_len)
    info = dist_info or DistInfo()
    stats = RoutingStats(model)
    batches = iter_eval_batches(tokens, batch_size, seq_len, max_batches, info.rank, info.world_size)
    counted = ((x, y, True) for x, y in batches)
    if lockstep:
        counted = _padded(counted, tokens, batch_size, seq_len, max_batches, info)
    sums = _loss_sums(model, counted, stats, autocast)
    all_reduce_sum(sums, info)
    return _metrics(sums, stats.summary(info), bytes_per_token)


def _check_enough_tokens(n_tokens: int, seq_len: int) -> None:
    """Refuses a validation split too short for one evaluation window."""
    if num_eval_windows(n_tokens, seq_len) == 0:
        raise DataError(
            f"the validation split has {n_tokens} tokens, too few for one window of seq_len={seq_len}: "
            "use a larger corpus, a larger data.val_fraction or a smaller train.seq_len"
        )


def _padded(batches: Iterator[Batch], tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None,
            info: DistInfo) -> Iterator[Batch]:
    """This rank's ``batches``, then uncounted forwards on the first window until it has run as
    many as the rank with the most batches (the lockstep of a collective forward)."""
    n_forwards = -(-num_eval_batches(len(tokens), batch_size, seq_len, max_batches) // info.world_size)
    done = 0
    for batch in batches:
        done += 1
        yield batch
    if done < n_forwards:
        x, y = next(iter_eval_batches(tokens, 1, seq_len, 1))
        for _ in range(n_forwards - done):
            yield x, y, False


def _loss_sums(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    stats: RoutingStats,
    autocast: contextlib.AbstractContextManager | None,
) -> torch.Tensor:
    """[sum of token losses, number of tokens] (fp64, this rank's) of ``model`` in eval mode over
    the counted ``batches``, each counted forward's routing collected into ``stats`` (an uncounted
    one only runs); the model's mode is restored after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, number of tokens]
    try:
        for x, y, counted in batches:
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                out = model(x, y)
            if not counted:
                continue
            stats.collect()
            sums[0] += float(out.loss) * y.numel()
            sums[1] += y.numel()
    finally:
        model.train(was_training)
    return sums


def _metrics(sums: torch.Tensor, layers: list[dict[str, Any]], bytes_per_token: float | None) -> dict[str, Any]:
    """The result dict of ``evaluate`` from the (reduced) loss sums and the layers' routing statistics."""
    loss = float(sums[0] / sums[1])
    result = {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_tokens": int(sums[1]),
        "layers": layers,
    }
    if bytes_per_token:
        result["val_bpb"] = loss / math.log(2) / bytes_per_token
    return result
