"""A dense SwiGLU feed-forward layer: the same math as one expert.

``y = (SiLU(x @ w_gate) * (x @ w_in)) @ w_out`` with w_gate, w_in [D, F] and w_out [F, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoe.nn.sparse import check_positive


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, *, init_std: float = 0.02):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.d_ffn = check_positive("d_ffn", d_ffn)
        self.w_gate = nn.Parameter(torch.empty(d_model, d_ffn))
        self.w_in = nn.Parameter(torch.empty(d_model, d_ffn))
        self.w_out = nn.Parameter(torch.empty(d_ffn, d_model))
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate) * (x @ self.w_in)) @ self.w_out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ffn={self.d_ffn}"
