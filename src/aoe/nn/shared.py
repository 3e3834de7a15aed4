"""Shared experts: SwiGLU experts every token uses, beside the routed ones (Qwen2-MoE, DeepSeek-MoE).

    y = s(x) * sum_j (SiLU(x @ w_gate_j) * (x @ w_in_j)) @ w_out_j,    j = 0 .. N-1
    s(x) = sigmoid(x @ gate) with the optional gate (Qwen2-MoE's ``shared_expert_gate``), else 1

N always-active experts of width F are one SwiGLU of width N*F (the sum over j is the sum over
the hidden units), so they are stored as one: the N experts' columns side by side,

    w_gate [D, N*F], w_in [D, N*F], w_out [N*F, D]    (expert j: columns / rows j*F .. (j+1)*F - 1)
    gate   [D, 1]                                     (only with gate=True)

input dimension first, as the other layers. A Hugging Face SwiGLU MLP maps by name:
``gate_proj.weight.T -> w_gate``, ``up_proj.weight.T -> w_in``, ``down_proj.weight.T -> w_out``,
and Qwen2-MoE's ``shared_expert_gate.weight.T -> gate``. A sparse layer (``aoe.nn.SparseFFN``)
with ``n_shared_experts > 0`` owns one as ``layer.shared`` and adds its output to every token's.

``reference_shared_experts`` recomputes the output expert by expert (fp64 in the tests).

Shape legend: T tokens (any leading dims), D model dim, N shared experts, F width of one, X = N*F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoe.nn.checks import check_positive


class SharedExperts(nn.Module):
    """N always-active SwiGLU experts of width ``d_shared`` (one SwiGLU of width N * d_shared).

    Args:
        d_model: model width D.
        d_shared: width F of one shared expert.
        n_shared: number of shared experts N (>= 1).
        gate: scale the output by ``sigmoid(x @ gate)`` (gate [D, 1]; Qwen2-MoE) (default False).
        init_std: std of the normal init of every weight (w_out: ``out_std`` of ``reset_parameters``).
    """

    def __init__(self, d_model: int, d_shared: int, n_shared: int = 1, *, gate: bool = False, init_std: float = 0.02):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.d_shared = check_positive("d_shared", d_shared)
        self.n_shared = check_positive("n_shared", n_shared)
        self.gated = bool(gate)
        X = self.n_shared * self.d_shared
        self.w_gate = nn.Parameter(torch.empty(d_model, X))
        self.w_in = nn.Parameter(torch.empty(d_model, X))
        self.w_out = nn.Parameter(torch.empty(X, d_model))
        self.gate = nn.Parameter(torch.empty(d_model, 1)) if self.gated else None
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Every weight ~ N(0, std), w_out ~ N(0, out_std) (std when None)."""
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)
        if self.gate is not None:
            nn.init.normal_(self.gate, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., D]`` in x's dtype (the weights are cast to it)."""
        dtype = x.dtype
        h_TX = F.silu(x @ self.w_gate.to(dtype)) * (x @ self.w_in.to(dtype))
        y_TD = h_TX @ self.w_out.to(dtype)
        if self.gate is not None:
            y_TD = torch.sigmoid(x @ self.gate.to(dtype)) * y_TD
        return y_TD

    def num_params(self) -> int:
        """3 * D * N * F (+ D for the gate)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Every token uses every parameter: ``num_params()``."""
        return self.num_params()

    def forward_flops(self) -> int:
        """Matmul FLOPs (2 x multiply-adds) per token of the forward pass: 2*3*D*N*F (+ 2*D for the gate)."""
        D, X = self.d_model, self.n_shared * self.d_shared
        return 2 * 3 * D * X + (2 * D if self.gated else 0)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_shared={self.d_shared}, n_shared={self.n_shared}, gate={self.gated}"


def reference_shared_experts(layer: SharedExperts, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` on x [..., D], recomputed expert by expert with plain autograd ops
    (slow and obviously correct: the tests run it in fp64 against ``layer(x)``)."""
    F_ = layer.d_shared
    y = torch.zeros_like(x)
    for j in range(layer.n_shared):
        cols = slice(j * F_, (j + 1) * F_)
        hidden = F.silu(x @ layer.w_gate[:, cols]) * (x @ layer.w_in[:, cols])
        y = y + hidden @ layer.w_out[cols, :]
    if layer.gate is not None:
        y = y * torch.sigmoid(x @ layer.gate[:, 0])[..., None]
    return y
