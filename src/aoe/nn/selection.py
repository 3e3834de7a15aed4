"""How experts are chosen: scores -> softmax over all experts -> top-k -> gate weights.

Both layers share ``select_top_k``; they differ only in their scores:
- MoE: router logits ``x @ router``.
- AoE: the norms of every expert's low-rank activation ``||x @ w_down[e]||`` (``activation_norms``).

Shape legend: T tokens, E experts, K chosen per token, L = d_low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("l2", "l1", "linf")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half precisions; fp64 stays fp64 (so fp64 checks are exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class Selection:
    """The outcome of choosing experts for T tokens.

    probs_TE: softmax over all E scores (fp32); the distribution the balancing loss and Ent_conf use.
    expert_indices_TK: chosen experts, best first.
    gate_weights_TK: weights of the chosen experts' outputs (fp32): the chosen softmax values,
        divided by their sum when renormalizing.
    """

    probs_TE: torch.Tensor
    expert_indices_TK: torch.Tensor
    gate_weights_TK: torch.Tensor


def select_top_k(
    scores_TE: torch.Tensor, top_k: int, *, renormalize: bool, selection_bias_E: torch.Tensor | None = None
) -> Selection:
    """Softmax over all experts, top-k, gate weights.

    ``selection_bias_E`` (aux-loss-free balancing) is added to the scores for choosing only: the
    gate weights always come from the unbiased softmax.
    """
    probs_TE = torch.softmax(at_least_fp32(scores_TE), dim=-1)
    ranking_TE = at_least_fp32(scores_TE.detach())  # same order as probs_TE, without softmax rounding ties
    if selection_bias_E is not None:
        ranking_TE = ranking_TE + selection_bias_E
    expert_indices_TK = torch.topk(ranking_TE, top_k, dim=-1).indices
    gate_weights_TK = probs_TE.gather(-1, expert_indices_TK)
    if renormalize:
        gate_weights_TK = gate_weights_TK / gate_weights_TK.sum(dim=-1, keepdim=True)
    return Selection(probs_TE, expert_indices_TK, gate_weights_TK)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
    return norm


def _norm_and_grad(act_TEL: torch.Tensor, norm: str, need_grad: bool):
    a = at_least_fp32(act_TEL)
    if norm == "l2":
        n = torch.linalg.vector_norm(a, dim=-1)
        d = a / n.clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(-1) if need_grad else None
    elif norm == "l1":
        n = a.abs().sum(-1)
        d = a.sign() if need_grad else None
    else:  # linf: the gradient goes to the largest entry (split evenly between exact ties)
        mag = a.abs()
        n = mag.amax(-1)
        if need_grad:
            at_max = (mag == n.unsqueeze(-1)).to(a.dtype)
            d = a.sign() * at_max / at_max.sum(-1, keepdim=True)
        else:
            d = None
    return n, d


def activation_norms(
    act_TEL: torch.Tensor,
    norm: str = "l2",
    *,
    recompute_from: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-expert norms of the low-rank activations, in fp32: [T, E, L] -> [T, E].

    With ``recompute_from=(x_TD, w_down_DX)`` (X = E*L) the activations are not kept for backward:
    the backward recomputes them as ``x_TD @ w_down_DX``, trading one small matmul for the
    [T, E, L] cache.
    """
    return _ActivationNorms.apply(act_TEL, norm, recompute_from)


class _ActivationNorms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, act_TEL, norm, recompute_from):
        norms_TE, _ = _norm_and_grad(act_TEL, norm, need_grad=False)
        ctx.norm = norm
        ctx.shape = act_TEL.shape
        ctx.recompute = recompute_from is not None
        ctx.save_for_backward(*(recompute_from if ctx.recompute else (act_TEL,)))
        return norms_TE

    @staticmethod
    def backward(ctx, grad_TE):
        if ctx.recompute:
            x_TD, w_down_DX = ctx.saved_tensors
            act_TEL = (x_TD @ w_down_DX).view(ctx.shape)
        else:
            (act_TEL,) = ctx.saved_tensors
        _, dnorm_TEL = _norm_and_grad(act_TEL, ctx.norm, need_grad=True)
        return (grad_TE.unsqueeze(-1) * dnorm_TEL).to(act_TEL.dtype), None, None
