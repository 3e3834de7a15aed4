"""A differentiable all-to-all with variable split sizes, and a count of the bytes it moves.

``all_to_all(x_RC, recv_splits, send_splits, group)``: rank r sends rows
``x[sum(send_splits[:j]) : sum(send_splits[:j+1])]`` to rank j of ``group`` and receives
``recv_splits[j]`` rows from rank j, concatenated in rank order (so the result's order is fixed by
the ranks, never by arrival). Its backward is the reverse all-to-all (the splits swapped): the
gradient of each received row goes back to the row it came from.

``TRAFFIC`` counts the bytes this process sent to OTHER ranks (rows to itself stay in memory),
forward and backward, so a benchmark can read bytes per step from the split sizes.

Shape legend: R rows (sent or received), C columns (features of a row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Bytes this process sent to other ranks, by kind (``reset()`` between steps)."""

    rows: int = 0  # token rows and their results (forward and backward)
    counts: int = 0  # the per-expert row counts exchanged before each layer's rows

    def reset(self) -> None:
        self.rows = self.counts = 0

    @property
    def total(self) -> int:
        return self.rows + self.counts


TRAFFIC = Traffic()


def _sent_to_others(splits: list[int], row_bytes: int, group) -> int:
    me = dist.get_rank(group)
    return (sum(splits) - splits[me]) * row_bytes


def exchange(x_RC: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """One all-to-all of rows (no autograd); returns the received rows [sum(recv_splits), C]."""
    x_RC = x_RC.contiguous()
    out = x_RC.new_empty((sum(recv_splits), *x_RC.shape[1:]))
    dist.all_to_all_single(out, x_RC, recv_splits, send_splits, group=group)
    row_bytes = x_RC.element_size() * math.prod(x_RC.shape[1:])
    TRAFFIC.rows += _sent_to_others(send_splits, row_bytes, group)
    return out


def exchange_counts(counts_NM: torch.Tensor, group) -> torch.Tensor:
    """[N, M] int64 counts (row j: what this rank sends to rank j) -> [N, M] (row j: what rank j sends here)."""
    counts_NM = counts_NM.contiguous()
    out = torch.empty_like(counts_NM)
    dist.all_to_all_single(out, counts_NM, group=group)
    n, m = counts_NM.shape
    TRAFFIC.counts += (n - 1) * m * counts_NM.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RC, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        return exchange(x_RC, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad_RC):
        return exchange(grad_RC, ctx.send_splits, ctx.recv_splits, ctx.group), None, None, None


def all_to_all(x_RC: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows with variable split sizes (see the module docstring)."""
    return _AllToAll.apply(x_RC, list(recv_splits), list(send_splits), group)
