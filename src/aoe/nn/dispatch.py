"""Dropless dispatch: (token, slot) pairs sorted by expert, and the deterministic way back.

Every token has K slots (top-k: its k chosen experts). Slot ``t * K + j`` is token t's j-th
choice. ``Dispatch`` sorts the slots by expert (stable, so equal experts keep token order), which
makes every expert's rows one contiguous block for the grouped matmuls. No token is ever dropped.

A rule with a variable number of experts per token (top-p, expert choice) gives a padded [T, K]
grid and the slots in use (``valid_TK``): only those S (token, expert) pairs become rows; the unused
slots sort after every expert (as expert E) and are cut off. The way back is the same for both:
each token's rows summed in slot order, over a fixed axis (an unused slot reads a zero row), never
with atomics, so it is deterministic on every device. Top-k's fixed K keeps its one-view sum.

Shape legend: T tokens, K slots per token, S sorted rows (T*K for top-k), E experts, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    """Where each (token, slot) goes.

    order_S: unsorted slot index of each sorted row (``sorted = unsorted[order_S]``).
    inverse_S: sorted row of each unsorted slot (``unsorted = sorted[inverse_S]``).
    token_S: the token of each sorted row (``order_S // K``).
    expert_S: the expert of each sorted row (non-decreasing).
    tokens_per_expert_E: rows per expert (int64).
    offsets_E: cumulative end row per expert (int32), the grouped-matmul offsets.
    """

    order_S: torch.Tensor
    inverse_S: torch.Tensor
    token_S: torch.Tensor
    expert_S: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    offsets_E: torch.Tensor
    top_k: int
    padded: bool = False

    @staticmethod
    def build(expert_indices_TK: torch.Tensor, n_experts: int, valid_TK: torch.Tensor | None = None) -> "Dispatch":
        """Sort the slots in use by expert. ``valid_TK`` None: every slot (top-k's fast path).

        With ``valid_TK``, ``inverse_S`` has one entry per slot of the grid [T*K]: its sorted row,
        or S (a zero row appended on the way back) for an unused slot.
        """
        if valid_TK is None:
            return Dispatch._build_fixed(expert_indices_TK, n_experts)
        top_k = expert_indices_TK.shape[1]
        valid_X = valid_TK.reshape(-1)  # X = T*K grid slots
        expert_X = torch.where(valid_X, expert_indices_TK.reshape(-1), n_experts)  # unused slots sort last
        order_X = torch.argsort(expert_X, stable=True)
        n_rows = int(valid_X.sum())  # the one host sync of a dynamic rule: the row count
        inverse_X = torch.empty_like(order_X)
        inverse_X[order_X] = torch.arange(order_X.numel(), device=order_X.device)
        order_S = order_X[:n_rows]
        expert_S = expert_X[order_S]
        ends_E = _group_ends(expert_S, n_experts)
        return Dispatch(
            order_S=order_S,
            inverse_S=torch.where(valid_X, inverse_X, n_rows),
            token_S=order_S // top_k,
            expert_S=expert_S,
            tokens_per_expert_E=_group_sizes(ends_E),
            offsets_E=ends_E.to(torch.int32),
            top_k=top_k,
            padded=True,
        )

    @staticmethod
    def _build_fixed(expert_indices_TK: torch.Tensor, n_experts: int) -> "Dispatch":
        top_k = expert_indices_TK.shape[1]
        expert_unsorted_S = expert_indices_TK.reshape(-1)
        order_S = torch.argsort(expert_unsorted_S, stable=True)
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        expert_S = expert_unsorted_S[order_S]
        ends_E = _group_ends(expert_S, n_experts)
        return Dispatch(
            order_S=order_S,
            inverse_S=inverse_S,
            token_S=order_S // top_k,
            expert_S=expert_S,
            tokens_per_expert_E=_group_sizes(ends_E),
            offsets_E=ends_E.to(torch.int32),
            top_k=top_k,
        )

    def gather_tokens(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [S, D]: each sorted row is a copy of its token (differentiable)."""
        return _GatherTokens.apply(x_TD, self.token_S, self.inverse_S, self.top_k, self.padded)

    def sort_slots(self, values_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] per-slot values -> [S] in sorted order."""
        return values_TK.reshape(-1).index_select(0, self.order_S)

    def combine(self, y_SD: torch.Tensor) -> torch.Tensor:
        """[S, D] sorted expert outputs -> [T, D]: each token's K outputs summed, in slot order.

        The unsort is a permutation and the sum runs over a fixed axis; the backward is one gather.
        No atomics anywhere, so the result is deterministic on every device.
        """
        return _CombineSlots.apply(y_SD, self.token_S, self.inverse_S, self.top_k, self.padded)


def _group_ends(expert_S: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] int64: the end row of each expert's block in the sorted ``expert_S``. A binary search
    of every expert index in the sorted rows: a fixed output shape (unlike ``bincount``, whose
    length depends on the data), so ``torch.compile`` traces it without a graph break."""
    experts_E = torch.arange(n_experts, device=expert_S.device, dtype=expert_S.dtype)
    return torch.searchsorted(expert_S, experts_E, right=True)


def _group_sizes(ends_E: torch.Tensor) -> torch.Tensor:
    """[E] int64 rows per expert from the end rows."""
    return torch.diff(ends_E, prepend=ends_E.new_zeros(1))


def sum_slots(rows_SD: torch.Tensor, inverse_X: torch.Tensor, top_k: int, padded: bool) -> torch.Tensor:
    """[S, D] sorted rows -> [T, D]: each token's K slots summed in slot order (``inverse_X`` [T*K]:
    the sorted row of each slot; with ``padded``, S for an unused slot, which reads a zero row).
    Padded, the K slots are added one at a time, so no [T, K, D] temporary is made."""
    n_tokens = inverse_X.numel() // top_k if top_k else 0
    if not padded:
        return rows_SD.index_select(0, inverse_X).view(n_tokens, top_k, rows_SD.shape[-1]).sum(dim=1)
    rows_SD = torch.cat([rows_SD, rows_SD.new_zeros(1, rows_SD.shape[-1])])
    slot_TK = inverse_X.view(n_tokens, top_k)
    out_TD = rows_SD.index_select(0, slot_TK[:, 0])
    for j in range(1, top_k):
        out_TD = out_TD + rows_SD.index_select(0, slot_TK[:, j])
    return out_TD


class _GatherTokens(torch.autograd.Function):
    """Copy token rows to their slots; backward sums each token's K slot gradients (no atomics)."""

    @staticmethod
    def forward(ctx, x_TD, token_S, inverse_S, top_k, padded):
        ctx.save_for_backward(inverse_S)
        ctx.top_k, ctx.padded = top_k, padded
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, grad_SD):
        (inverse_S,) = ctx.saved_tensors
        return sum_slots(grad_SD, inverse_S, ctx.top_k, ctx.padded), None, None, None, None


class _CombineSlots(torch.autograd.Function):
    """Sum each token's K sorted rows; backward copies each token's gradient to its K rows."""

    @staticmethod
    def forward(ctx, y_SD, token_S, inverse_S, top_k, padded):
        ctx.save_for_backward(token_S)
        return sum_slots(y_SD, inverse_S, top_k, padded)

    @staticmethod
    def backward(ctx, grad_TD):
        (token_S,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_S), None, None, None, None
