"""Slow, obviously-correct reference implementations, one token at a time, straight from the paper.

They read the parameters of a real ``MoE`` / ``AoE`` layer and recompute its forward with plain
autograd ops and Python loops, so tests can compare outputs and gradients of the fast engine
against them. Not for training: a Python loop over every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aoe.nn.aoe import AoE
from aoe.nn.moe import MoE

_ORD = {"l2": 2, "l1": 1, "linf": float("inf")}


def reference_forward(layer: MoE | AoE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (output of x's shape, routing dict with probs [T,E], indices [T,K], weights [T,K])."""
    is_aoe = isinstance(layer, AoE)
    x_TD = x.reshape(-1, layer.d_model)
    bias = layer.selection_bias if layer.bias_update_rate > 0 else torch.zeros_like(layer.selection_bias)
    outputs, probs, indices, weights = [], [], [], []
    for t in range(x_TD.shape[0]):
        x_D = x_TD[t]
        if is_aoe:
            acts = [x_D @ layer.w_down[e] for e in range(layer.n_experts)]
            scores = torch.stack([torch.linalg.vector_norm(a, ord=_ORD[layer.norm]) for a in acts])
        elif getattr(layer, "router_hidden", None):
            scores = F.silu(x_D @ layer.router_in) @ layer.router
        else:
            scores = x_D @ layer.router
        p = torch.softmax(scores, dim=0)
        chosen = torch.topk(scores.detach() + bias.to(scores.dtype), layer.top_k).indices
        w = p[chosen]
        if layer.renormalize:
            w = w / w.sum()
        y = torch.zeros_like(x_D)
        for j, e in enumerate(chosen.tolist()):
            if is_aoe:
                gate = acts[e] @ layer.w_up[e]
            elif getattr(layer, "gate_rank", None):
                gate = (x_D @ layer.w_down[e]) @ layer.w_up[e]
            else:
                gate = x_D @ layer.w_gate[e]
            y = y + w[j] * ((F.silu(gate) * (x_D @ layer.w_in[e])) @ layer.w_out[e])
        outputs.append(y)
        probs.append(p)
        indices.append(chosen)
        weights.append(w)
    E, K = layer.n_experts, layer.top_k
    out = torch.stack(outputs) if outputs else x_TD.new_zeros(0, layer.d_model)
    routing = {
        "probs": torch.stack(probs) if probs else x_TD.new_zeros(0, E),
        "indices": torch.stack(indices) if indices else torch.zeros(0, K, dtype=torch.long),
        "weights": torch.stack(weights) if weights else x_TD.new_zeros(0, K),
    }
    return out.reshape(x.shape), routing
