"""How experts are chosen: scores -> softmax over all experts -> a selection rule -> gate weights.

Both layers share the rules; they differ only in their scores:
- MoE: router logits ``x @ router``.
- AoE: the norms of every expert's low-rank activation ``||x @ w_down[e]||`` (``activation_norms``).

The rules (``SELECTIONS``), all on the softmax ``p`` over all E experts of each token:
- ``top_k``: each token takes its k best experts.
- ``top_p`` (dynamic k; Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
  Models"): each token takes experts in order of probability until their cumulative probability
  reaches p: expert j of the order (0-based) is taken while ``p_(0) + ... + p_(j-1) < p``, and
  always at least ``min_k`` and at most ``max_k`` of them. p = 1 takes ``max_k``; a tiny p takes
  ``min_k``. Since the k largest of E probabilities sum to at least k / E, ``p <= k / E`` never
  takes more than k experts.
- ``expert_choice`` (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"): within each
  sequence of n tokens, each expert takes the C tokens with the highest probability in its column
  of p, ``C = min(n, ceil(capacity_factor * n * k / E))``; a token may be taken by several experts
  or by none (it then passes through the residual only). Per sequence, not across a batch: a
  token's routing then depends only on its own sequence, so a batch's composition cannot change
  it. It still depends on the later tokens of that sequence: a causal LM can leak the future
  through it (see the layers' ``ec_inference``).

Gate weights are always the chosen probabilities (divided by their sum over the token's chosen
experts when renormalizing). A rule with a variable number of experts per token returns a padded
[T, K] selection with ``valid_TK`` marking the slots in use.

Shape legend: T tokens, E experts, K slots per token (k; the most a dynamic rule used), L = d_low,
B sequences, N tokens of a sequence, C tokens an expert takes per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NORMS = ("l2", "l1", "linf")
SELECTIONS = ("top_k", "top_p", "expert_choice")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half precisions; fp64 stays fp64 (so fp64 checks are exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class Selection:
    """The outcome of choosing experts for T tokens.

    probs_TE: softmax over all E scores (fp32); the distribution the balancing loss and Ent_conf use.
    expert_indices_TK: chosen experts (top-k, top-p: best first; expert choice: by expert index).
    gate_weights_TK: weights of the chosen experts' outputs (fp32): the chosen softmax values,
        divided by their sum when renormalizing; 0 in unused slots.
    valid_TK: which slots are in use (bool), or None when every token uses all K (top-k).
    """

    probs_TE: torch.Tensor
    expert_indices_TK: torch.Tensor
    gate_weights_TK: torch.Tensor
    valid_TK: torch.Tensor | None = None


def _ranking(scores_TE: torch.Tensor, selection_bias_E: torch.Tensor | None) -> torch.Tensor:
    """What top-k and top-p order experts by: the detached scores (the softmax's order, without its
    rounding ties), plus the aux-loss-free bias."""
    ranking_TE = at_least_fp32(scores_TE.detach())
    return ranking_TE if selection_bias_E is None else ranking_TE + selection_bias_E


def _gate_weights(probs_TE: torch.Tensor, indices_TK: torch.Tensor, valid_TK: torch.Tensor | None,
                  renormalize: bool) -> torch.Tensor:
    weights_TK = probs_TE.gather(-1, indices_TK)
    if valid_TK is not None:
        weights_TK = weights_TK * valid_TK
    if renormalize:
        total_T1 = weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK / (total_T1 if valid_TK is None else total_T1.clamp_min(torch.finfo(total_T1.dtype).tiny))
    return weights_TK


def select_top_k(
    scores_TE: torch.Tensor, top_k: int, *, renormalize: bool, selection_bias_E: torch.Tensor | None = None
) -> Selection:
    """Softmax over all experts, top-k, gate weights.

    ``selection_bias_E`` (aux-loss-free balancing) is added to the scores for choosing only: the
    gate weights always come from the unbiased softmax.
    """
    probs_TE = torch.softmax(at_least_fp32(scores_TE), dim=-1)
    expert_indices_TK = torch.topk(_ranking(scores_TE, selection_bias_E), top_k, dim=-1).indices
    return Selection(probs_TE, expert_indices_TK, _gate_weights(probs_TE, expert_indices_TK, None, renormalize))


def select_top_p(
    scores_TE: torch.Tensor, top_p: float, min_k: int, max_k: int, *, renormalize: bool,
    selection_bias_E: torch.Tensor | None = None,
) -> Selection:
    """Softmax over all experts; experts in ranking order until their cumulative probability
    reaches ``top_p`` (at least ``min_k``, at most ``max_k``); K = max_k padded slots."""
    probs_TE = torch.softmax(at_least_fp32(scores_TE), dim=-1)
    expert_indices_TK = torch.topk(_ranking(scores_TE, selection_bias_E), max_k, dim=-1).indices
    with torch.no_grad():
        cumulative_TK = probs_TE.detach().gather(-1, expert_indices_TK).cumsum(dim=-1)
        before_TK = torch.cat([torch.zeros_like(cumulative_TK[:, :1]), cumulative_TK[:, :-1]], dim=-1)
        rank_K = torch.arange(max_k, device=scores_TE.device)
        valid_TK = (before_TK < top_p) | (rank_K < min_k)
    return Selection(probs_TE, expert_indices_TK, _gate_weights(probs_TE, expert_indices_TK, valid_TK, renormalize),
                     valid_TK)


def capacity(n_tokens: torch.Tensor | int, capacity_factor: float, top_k: int, n_experts: int):
    """C = min(n, ceil(capacity_factor * n * k / E)) tokens per expert in a sequence of n tokens
    (a hair below an integer is that integer: 1e-9 absorbs the product's rounding)."""
    if isinstance(n_tokens, int):
        return min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts - 1e-9))
    c = torch.ceil(n_tokens.double() * (capacity_factor * top_k / n_experts) - 1e-9).long()
    return torch.minimum(c, n_tokens)


def select_expert_choice(
    scores_TE: torch.Tensor, capacity_factor: float, top_k: int, *, renormalize: bool, seq_len: int,
    token_mask_BN: torch.Tensor | None = None,
) -> Selection:
    """Softmax over all experts; in each sequence each expert takes its C best tokens.

    The T tokens are ``T / seq_len`` sequences of ``seq_len`` consecutive tokens; with
    ``token_mask_BN`` (bool [B, seq_len], True = real) they are the real tokens of B padded
    sequences, in order, and C counts each sequence's real tokens only.
    """
    probs_TE = torch.softmax(at_least_fp32(scores_TE), dim=-1)
    chosen_TE = _expert_choice_mask(probs_TE.detach(), capacity_factor, top_k, seq_len, token_mask_BN)
    with torch.no_grad():
        count_T = chosen_TE.sum(dim=1)
        k_max = max(1, int(count_T.max())) if count_T.numel() else 1  # the slots the busiest token needs
        expert_indices_TK = torch.sort((~chosen_TE).to(torch.uint8), dim=1, stable=True).indices[:, :k_max]
        valid_TK = torch.arange(k_max, device=scores_TE.device) < count_T.unsqueeze(1)
    return Selection(probs_TE, expert_indices_TK, _gate_weights(probs_TE, expert_indices_TK, valid_TK, renormalize),
                     valid_TK)


@torch.no_grad()
def _expert_choice_mask(probs_TE: torch.Tensor, capacity_factor: float, top_k: int, seq_len: int,
                        token_mask_BN: torch.Tensor | None) -> torch.Tensor:
    """[T, E] bool: which expert took which token (each expert its top-C tokens per sequence)."""
    n_tokens, n_experts = probs_TE.shape
    if token_mask_BN is None:
        grid_BNE = probs_TE.view(-1, seq_len, n_experts)
        c_max, c_B = capacity(seq_len, capacity_factor, top_k, n_experts), None
    else:  # padded positions rank below every real token (-inf), and C counts real tokens
        real_N = token_mask_BN.reshape(-1).nonzero().squeeze(1)
        grid_BNE = probs_TE.new_full((token_mask_BN.numel(), n_experts), -math.inf)
        grid_BNE = grid_BNE.index_copy(0, real_N, probs_TE).view(*token_mask_BN.shape, n_experts)
        c_B = capacity(token_mask_BN.sum(dim=1), capacity_factor, top_k, n_experts)
        c_max = int(c_B.max()) if c_B.numel() else 0
    chosen_BNE = torch.zeros(grid_BNE.shape, dtype=torch.bool, device=probs_TE.device)
    if c_max > 0:
        top_BCE = torch.topk(grid_BNE, c_max, dim=1).indices
        keep_BCE = torch.ones_like(top_BCE, dtype=torch.bool)
        if c_B is not None:  # a shorter sequence's experts take fewer tokens
            keep_BCE = (torch.arange(c_max, device=probs_TE.device).view(1, -1, 1) < c_B.view(-1, 1, 1)).expand_as(top_BCE)
        chosen_BNE.scatter_(1, top_BCE, keep_BCE.contiguous())
    chosen_TE = chosen_BNE.view(-1, n_experts)
    return chosen_TE if token_mask_BN is None else chosen_TE.index_select(0, real_N)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
    return norm


_ORDS = {"l2": 2, "l1": 1, "linf": math.inf}


def _norms(act_TEL: torch.Tensor, norm: str) -> torch.Tensor:
    """[T, E] norms in at least fp32, reduced in that precision as the elements are read: no
    upcast copy of the [T, E, L] cache."""
    return torch.linalg.vector_norm(act_TEL, ord=_ORDS[norm], dim=-1,
                                    dtype=torch.promote_types(act_TEL.dtype, torch.float32))


def _norms_grad(act_TEL: torch.Tensor, norms_TE: torch.Tensor, grad_TE: torch.Tensor, norm: str,
                in_place: bool) -> torch.Tensor:
    """d(sum grad * norms) / d act, in act's dtype. Each element is act (or its sign) times a
    per-(t, e) factor in at least fp32, rounded once; the one [T, E, L] buffer is the result
    (``in_place``: act's own, for a recomputed act; linf adds a bool mask of its maxima).
    linf: the gradient goes to the largest entry, split evenly between exact ties."""
    grad_TE1 = at_least_fp32(grad_TE).unsqueeze(-1)
    if norm == "l2":
        scale_TE1 = grad_TE1 / norms_TE.clamp_min(torch.finfo(norms_TE.dtype).tiny).unsqueeze(-1)
        return act_TEL.mul_(scale_TE1) if in_place else torch.mul(act_TEL, scale_TE1, out=torch.empty_like(act_TEL))
    at_max_TEL = None
    if norm == "linf":  # (two comparisons: no |act| copy)
        n_TE1 = norms_TE.unsqueeze(-1)
        at_max_TEL = (act_TEL == n_TE1) | (act_TEL == -n_TE1)
    sign_TEL = act_TEL.sign_() if in_place else act_TEL.sign()
    if norm == "l1":
        return sign_TEL.mul_(grad_TE1)
    return sign_TEL.mul_(at_max_TEL).mul_(grad_TE1 / at_max_TEL.sum(-1, keepdim=True))


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
        norms_TE = _norms(act_TEL, norm)
        ctx.norm = norm
        ctx.shape = act_TEL.shape
        ctx.recompute = recompute_from is not None
        ctx.save_for_backward(norms_TE, *(recompute_from if ctx.recompute else (act_TEL,)))
        return norms_TE

    @staticmethod
    def backward(ctx, grad_TE):
        norms_TE, *inputs = ctx.saved_tensors
        if ctx.recompute:
            x_TD, w_down_DX = inputs
            act_TEL = (x_TD @ w_down_DX).view(ctx.shape)
        else:
            (act_TEL,) = inputs
        if ctx.norm == "linf":  # the maxima of this very act (a recomputed act may differ by rounding)
            norms_TE = _norms(act_TEL, "linf")
        return _norms_grad(act_TEL, norms_TE, grad_TE, ctx.norm, in_place=ctx.recompute), None, None
