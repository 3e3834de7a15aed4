"""Slow, obviously-correct reference implementations, one token (or one expert) at a time, straight
from the paper and the selection rules' definitions (``aoe.nn.selection``).

They read the parameters of a real ``MoE`` / ``AoE`` layer and recompute its forward with plain
autograd ops and Python loops, so tests can compare outputs and gradients of the fast engine
against them: a per-token loop for top-k and top-p, a per-expert loop for expert choice. Not for
training: a Python loop over every token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aoe.nn.aoe import AoE
from aoe.nn.moe import MoE

_ORD = {"l2": 2, "l1": 1, "linf": float("inf")}


def _scores(layer: MoE | AoE, x_D: torch.Tensor) -> tuple[torch.Tensor, list | None]:
    """One token's scores [E] (and AoE's per-expert activations)."""
    if isinstance(layer, AoE):
        acts = [x_D @ layer.w_down[e] for e in range(layer.n_experts)]
        return torch.stack([torch.linalg.vector_norm(a, ord=_ORD[layer.norm]) for a in acts]), acts
    if getattr(layer, "router_hidden", None):
        return F.silu(x_D @ layer.router_in) @ layer.router, None
    return x_D @ layer.router, None


def _expert(layer: MoE | AoE, x_D: torch.Tensor, acts: list | None, e: int) -> torch.Tensor:
    """Expert e's unweighted output for one token."""
    if isinstance(layer, AoE):
        gate = acts[e] @ layer.w_up[e]
    elif getattr(layer, "gate_rank", None):
        gate = (x_D @ layer.w_down[e]) @ layer.w_up[e]
    else:
        gate = x_D @ layer.w_gate[e]
    return (F.silu(gate) * (x_D @ layer.w_in[e])) @ layer.w_out[e]


def _top_p_choice(p: torch.Tensor, ranking: torch.Tensor, top_p: float, min_k: int, max_k: int) -> list[int]:
    """Experts in ranking order while the probability taken so far is below top_p (min_k..max_k)."""
    chosen, taken = [], 0.0
    for e in torch.argsort(ranking, descending=True).tolist():
        if len(chosen) == max_k or (len(chosen) >= min_k and taken >= top_p):
            break
        chosen.append(e)
        taken = taken + float(p[e])
    return chosen


def _rule(layer) -> str:
    rule = getattr(layer, "selection", "top_k")
    if rule == "expert_choice" and not layer.training and layer.ec_inference == "top_k":
        return "top_k"
    return rule


def reference_forward(layer: MoE | AoE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (output of x's shape, routing dict with probs [T,E], and per token the chosen
    ``indices`` and their ``weights``: [T, K] tensors for top-k, lists of tensors otherwise)."""
    if _rule(layer) == "expert_choice":
        return reference_expert_choice(layer, x)
    x_TD = x.reshape(-1, layer.d_model)
    bias = layer.selection_bias if layer.bias_update_rate > 0 else torch.zeros_like(layer.selection_bias)
    outputs, probs, indices, weights = [], [], [], []
    for t in range(x_TD.shape[0]):
        x_D = x_TD[t]
        scores, acts = _scores(layer, x_D)
        p = torch.softmax(scores, dim=0)
        ranking = scores.detach() + bias.to(scores.dtype)
        if _rule(layer) == "top_p":
            chosen = torch.tensor(_top_p_choice(p.detach(), ranking, layer.top_p, layer.min_k, layer.max_k))
        else:
            chosen = torch.topk(ranking, layer.top_k).indices
        w = p[chosen]
        if layer.renormalize:
            w = w / w.sum()
        y = torch.zeros_like(x_D)
        for j, e in enumerate(chosen.tolist()):
            y = y + w[j] * _expert(layer, x_D, acts, e)
        outputs.append(y)
        probs.append(p)
        indices.append(chosen)
        weights.append(w)
    return _pack(layer, x, x_TD, outputs, probs, indices, weights, stack=_rule(layer) == "top_k")


def reference_expert_choice(layer: MoE | AoE, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Expert choice, one sequence and one expert at a time: in each sequence (x's second-to-last
    dim) expert e takes the ``ceil(capacity_factor * n * k / E)`` tokens (at most n) with the
    highest probability in its column; a token's output sums its experts' in expert order."""
    n = x.shape[-2] if x.dim() >= 2 else 1
    x_TD = x.reshape(-1, layer.d_model)
    E = layer.n_experts
    c = min(n, math.ceil(layer.capacity_factor * n * layer.top_k / E - 1e-9))
    per_token = [_scores(layer, x_TD[t]) for t in range(x_TD.shape[0])]
    probs = [torch.softmax(s, dim=0) for s, _ in per_token]
    takers: list[list[int]] = [[] for _ in probs]
    for start in range(0, x_TD.shape[0], n):
        for e in range(E):
            column = torch.stack([probs[t][e].detach() for t in range(start, start + n)])
            for i in torch.topk(column, c).indices.tolist():
                takers[start + i].append(e)
    outputs, indices, weights = [], [], []
    for t, (p, experts) in enumerate(zip(probs, takers)):
        experts = sorted(experts)
        w = p[experts] if experts else p[:0]
        if layer.renormalize and experts:
            w = w / w.sum()
        y = torch.zeros_like(x_TD[t])
        for j, e in enumerate(experts):
            y = y + w[j] * _expert(layer, x_TD[t], per_token[t][1], e)
        outputs.append(y)
        indices.append(torch.tensor(experts, dtype=torch.long))
        weights.append(w)
    return _pack(layer, x, x_TD, outputs, probs, indices, weights, stack=False)


def _pack(layer, x, x_TD, outputs, probs, indices, weights, stack: bool):
    E, K = layer.n_experts, layer.top_k
    out = torch.stack(outputs) if outputs else x_TD.new_zeros(0, layer.d_model)
    routing = {"probs": torch.stack(probs) if probs else x_TD.new_zeros(0, E)}
    if stack:
        routing["indices"] = torch.stack(indices) if indices else torch.zeros(0, K, dtype=torch.long)
        routing["weights"] = torch.stack(weights) if weights else x_TD.new_zeros(0, K)
    else:
        routing["indices"], routing["weights"] = indices, weights
    return out.reshape(x.shape), routing
