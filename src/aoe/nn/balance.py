"""Load balancing (losses and the aux-loss-free bias) and routing statistics.

Definitions (per layer, T tokens, E experts, S (token, expert) assignments: T*k for top-k; the
tokens' dynamic counts for top-p; the experts' capacities for expert choice):
- ``f_i`` = share of the S assignments that go to expert i (sums to 1).
- ``P_i`` = mean over tokens of the softmax probability of expert i (the softmax that selects).
- Load-balancing loss (Switch/GShard form): ``E * sum_i f_i * P_i`` (1 when perfectly balanced);
  the gradient flows through P only.
- Router z-loss: ``mean over tokens of logsumexp(logits)^2``.
- ``Ent_load = -sum_i q_i log q_i`` with q = f (maximum log E = perfectly balanced).
- ``Ent_conf = mean over tokens of -sum_i p_i log p_i`` with p the softmax over all E scores.
- Imbalance: max_i load_i / mean_i load_i (1 = balanced).

The same definitions serve every selection rule (``aoe.nn.selection``), with f counting the
assignments the rule made. Under expert choice every expert takes the same C tokens per sequence,
so f is uniform, the load-balancing loss is the constant 1 with zero gradient, and the
aux-loss-free bias cannot change a choice (a per-expert constant does not reorder an expert's
column of tokens): the layers refuse ``bias_update_rate > 0`` with it. Top-p's bias is added to
the ranking (the order in which a token takes experts), while the cumulative sum that stops it
adds the unbiased probabilities. Padded tokens (``token_mask``) make no assignment and are in no
mean.

Per-rule statistics (``RoutingInfo``): experts per token (top-p: its mean and distribution) and
unchosen tokens (expert choice: tokens no expert took; they pass through the residual only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` (scalar, in the scores' precision: fp32, or fp64 for fp64 inputs)."""
    n_experts = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.sum()
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / tokens_per_expert_E.sum().clamp_min(1)
    p_E = probs_TE.mean(dim=0)
    return n_experts * (f_E * p_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """``mean_t logsumexp(logits_t)^2`` (scalar, in the scores' precision: fp32, or fp64 for fp64 inputs)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def load_entropy(tokens_per_expert_E: torch.Tensor) -> float:
    """Ent_load in nats: entropy of the share of assignments per expert."""
    q = tokens_per_expert_E.double() / tokens_per_expert_E.sum().clamp_min(1)
    return float(-(q * q.clamp_min(1e-300).log()).sum())


def confidence_entropy(probs_TE: torch.Tensor) -> float:
    """Ent_conf in nats: mean over tokens of the entropy of the softmax over all experts."""
    if probs_TE.shape[0] == 0:
        return float("nan")
    p = probs_TE.double()
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())


def confidence_entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """Ent_conf as a loss (a scalar in the graph): the mean over tokens of ``-sum_i p_i log p_i``
    (the paper's Top-P regularizer, weight 1e-4, against spreading probability over many experts)."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum()
    return -(probs_TE * probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny).log()).sum(-1).mean()


def imbalance(tokens_per_expert_E: torch.Tensor) -> float:
    """max load / mean load (1 = perfectly balanced)."""
    load = tokens_per_expert_E.double()
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else float("nan")


@dataclass
class RoutingInfo:
    """What a sparse layer decided in its last forward (detached; T = all tokens of that call).

    expert_indices [T, K] (-1 in a slot a dynamic rule left unused), gate_weights [T, K] (fp32; 0
    in an unused slot), probs [T, E] (fp32 softmax over all experts), tokens_per_expert [E]
    (int64), rule (the selection rule this forward used: "top_k", "top_p" or "expert_choice"),
    experts_per_token [T] (int64; None for top-k, where it is K for every token).
    """

    expert_indices: torch.Tensor
    gate_weights: torch.Tensor
    probs: torch.Tensor
    tokens_per_expert: torch.Tensor
    rule: str = "top_k"
    experts_per_token: torch.Tensor | None = None

    def experts_per_token_counts(self) -> torch.Tensor:
        """[T] int64: the experts each token used."""
        if self.experts_per_token is not None:
            return self.experts_per_token
        T, K = self.expert_indices.shape
        return torch.full((T,), K, dtype=torch.long, device=self.expert_indices.device)

    @property
    def causal(self) -> bool:
        """False when a token's routing depended on later tokens of its sequence (expert choice)."""
        return self.rule != "expert_choice"

    def ent_load(self) -> float:
        return load_entropy(self.tokens_per_expert)

    def ent_conf(self) -> float:
        return confidence_entropy(self.probs)

    def imbalance(self) -> float:
        return imbalance(self.tokens_per_expert)


@torch.no_grad()
def update_selection_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing step: ``bias_i += rate * sign(mean_load - load_i)``, then clear the load.

    ``load_E`` is the count of assignments per expert since the last step, of every token the
    step saw: with several processes, the sum over the ranks (``aoe.nn.sparse.update_selection_biases``
    sums it when given ``sum_over_ranks``), so every rank keeps the same bias. Runs
    outside autograd.
    """
    if load_E.sum() > 0:
        bias_E.add_(rate * torch.sign(load_E.mean() - load_E))
    load_E.zero_()
