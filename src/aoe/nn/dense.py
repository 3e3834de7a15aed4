"""A dense SwiGLU feed-forward layer: the same math as one expert.

``y = (SiLU(x @ w_gate) * (x @ w_in)) @ w_out`` with w_gate, w_in [D, F] and w_out [F, D].

With ``gate_rank=r`` the gate projection is factorized as AoE factorizes an expert's:
w_gate is replaced by ``w_down [D, r]`` and ``w_up [r, F]``, and the gate is
``(x @ w_down) @ w_up``. This is the dense control of the study: what a rank-r gate costs a
SwiGLU layer with no selection involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoe.nn.factorized import check_gate_init, init_factorized_gate
from aoe.nn.checks import check_positive


class DenseFFN(nn.Module):
    """SwiGLU FFN of width ``d_ffn``.

    Args:
        d_model: model width D; d_ffn: hidden width F.
        init_std: std of the normal init of every weight (w_out: ``out_std`` of ``reset_parameters``).
        gate_rank: factorize the gate projection at this rank (None = a full w_gate [D, F]).
        gate_init: with ``gate_rank``: "balanced" (the default) or "normal" (see ``aoe.nn.factorized``).
    """

    def __init__(self, d_model: int, d_ffn: int, *, init_std: float = 0.02, gate_rank: int | None = None,
                 gate_init: str = "balanced"):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.d_ffn = check_positive("d_ffn", d_ffn)
        self.gate_rank = None if gate_rank is None else check_positive("gate_rank", gate_rank)
        self.gate_init = check_gate_init(gate_init)
        if self.gate_rank is None:
            self.w_gate = nn.Parameter(torch.empty(d_model, d_ffn))
        else:
            self.w_down = nn.Parameter(torch.empty(d_model, self.gate_rank))
            self.w_up = nn.Parameter(torch.empty(self.gate_rank, d_ffn))
        self.w_in = nn.Parameter(torch.empty(d_model, d_ffn))
        self.w_out = nn.Parameter(torch.empty(d_ffn, d_model))
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        if self.gate_rank is None:
            nn.init.normal_(self.w_gate, std=std)
        else:
            init_factorized_gate(self.w_down, self.w_up, std, self.gate_init)
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., D] -> [..., D]``. ``token_mask`` (the sparse layers' interface) is ignored: every
        token is computed on its own, so a padded token cannot change a real one."""
        gate = x @ self.w_gate if self.gate_rank is None else (x @ self.w_down) @ self.w_up
        return (F.silu(gate) * (x @ self.w_in)) @ self.w_out

    def forward_with_aux(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), 0)``: a dense layer has no auxiliary loss (the sparse layers' interface)."""
        return self(x), x.new_zeros((), dtype=torch.float32)

    def num_active_params(self) -> int:
        """Every parameter of a dense layer is used by every token."""
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self) -> int:
        """Matmul FLOPs (2 x multiply-adds) per token of the forward pass."""
        D, F_ = self.d_model, self.d_ffn
        gate = D * F_ if self.gate_rank is None else self.gate_rank * (D + F_)
        return 2 * (gate + 2 * D * F_)

    def extra_repr(self) -> str:
        extra = "" if self.gate_rank is None else f", gate_rank={self.gate_rank}"
        extra += "" if self.gate_rank is None or self.gate_init == "balanced" else f", gate_init={self.gate_init!r}"
        return f"d_model={self.d_model}, d_ffn={self.d_ffn}{extra}"
