"""Dropless dispatch: (token, slot) pairs sorted by expert, and the deterministic way back.

Every token has k slots (its k chosen experts). Slot ``s = t * k + j`` is token t's j-th choice.
``Dispatch`` sorts the T*k slots by expert (stable, so equal experts keep token order), which makes
every expert's rows one contiguous block for the grouped matmuls. No token is ever dropped.

Shape legend: T tokens, K slots per token (top-k), S = T*K slots, E experts, D model dim.
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

    @staticmethod
    def build(expert_indices_TK: torch.Tensor, n_experts: int) -> "Dispatch":
        top_k = expert_indices_TK.shape[1]
        expert_unsorted_S = expert_indices_TK.reshape(-1)
        order_S = torch.argsort(expert_unsorted_S, stable=True)
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        tokens_per_expert_E = torch.bincount(expert_unsorted_S, minlength=n_experts)
        return Dispatch(
            order_S=order_S,
            inverse_S=inverse_S,
            token_S=order_S // top_k,
            expert_S=expert_unsorted_S[order_S],
            tokens_per_expert_E=tokens_per_expert_E,
            offsets_E=tokens_per_expert_E.cumsum(0).to(torch.int32),
            top_k=top_k,
        )

    def gather_tokens(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [S, D]: each sorted row is a copy of its token (differentiable)."""
        return _GatherTokens.apply(x_TD, self.token_S, self.inverse_S, self.top_k)

    def sort_slots(self, values_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] per-slot values -> [S] in sorted order."""
        return values_TK.reshape(-1).index_select(0, self.order_S)

    def combine(self, y_SD: torch.Tensor) -> torch.Tensor:
        """[S, D] sorted expert outputs -> [T, D]: each token's K outputs summed, in slot order.

        The unsort is a permutation and the sum runs over a fixed axis; the backward is one gather.
        No atomics anywhere, so the result is deterministic on every device.
        """
        return _CombineSlots.apply(y_SD, self.token_S, self.inverse_S, self.top_k)


class _GatherTokens(torch.autograd.Function):
    """Copy token rows to their slots; backward sums each token's K slot gradients (no atomics)."""

    @staticmethod
    def forward(ctx, x_TD, token_S, inverse_S, top_k):
        ctx.save_for_backward(inverse_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, grad_SD):
        (inverse_S,) = ctx.saved_tensors
        n_tokens = inverse_S.numel() // ctx.top_k
        grad_TD = grad_SD.index_select(0, inverse_S).view(n_tokens, ctx.top_k, grad_SD.shape[-1]).sum(dim=1)
        return grad_TD, None, None, None


class _CombineSlots(torch.autograd.Function):
    """Sum each token's K sorted rows; backward copies each token's gradient to its K rows."""

    @staticmethod
    def forward(ctx, y_SD, token_S, inverse_S, top_k):
        ctx.save_for_backward(token_S)
        n_tokens = y_SD.shape[0] // top_k
        return y_SD.index_select(0, inverse_S).view(n_tokens, top_k, y_SD.shape[-1]).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_TD):
        (token_S,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_S), None, None, None
