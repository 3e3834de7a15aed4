"""The expert computation shared by MoE and AoE: gated SwiGLU experts over sorted rows.

For a sorted row s owned by expert e, with gate weight g_s (the selection's weight of that slot):

    gate_s = gate_in_s @ w_gate[e]          MoE: gate_in = x, w_gate [E, D, F]
                                            AoE: gate_in = c (cached low-rank activation),
                                                 w_gate = w_up [E, L, F]
    y_s    = g_s * (SiLU(gate_s) * (x_s @ w_in[e])) @ w_out[e]

The gate weight is applied before the output projection (same value, by linearity), so the
backward needs no copy of the [S, D] expert outputs. A hand-written backward keeps only what it
needs: x, gate_in, ``up = x @ w_in`` and (unless ``recompute_gate``) the gate pre-activation.
SiLU(gate) * up is recomputed in backward (elementwise, cheap). With ``recompute_gate=True`` the
gate pre-activation is recomputed too: one [S, L] x [L, F] matmul for AoE, where L = d_low is
small, which is how AoE's training memory stays at the MoE's despite its wider experts.

Shape legend: S sorted rows, D model dim, G gate input dim (D or L), F expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aoe.nn.grouped_mm import grouped_mm, grouped_weight_grad


def swiglu_experts(
    x_SD: torch.Tensor,
    gate_in_SG: torch.Tensor,
    w_gate_EGF: torch.Tensor,
    w_in_EDF: torch.Tensor,
    w_out_EFD: torch.Tensor,
    gate_weight_S: torch.Tensor,
    offsets_E: torch.Tensor,
    *,
    recompute_gate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Run every sorted row through its expert; returns the weighted outputs [S, D]."""
    return _SwiGLUExperts.apply(
        x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, recompute_gate, backend
    )


def _silu_and_grad(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class _SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, recompute_gate, backend):
        gate_SF = grouped_mm(gate_in_SG, w_gate_EGF, offsets_E, backend)
        up_SF = grouped_mm(x_SD, w_in_EDF, offsets_E, backend)
        weight_S1 = gate_weight_S.to(x_SD.dtype).unsqueeze(-1)
        hidden_SF = F.silu(gate_SF) * up_SF * weight_S1
        y_SD = grouped_mm(hidden_SF, w_out_EFD, offsets_E, backend)
        ctx.recompute_gate = recompute_gate
        ctx.backend = backend
        saved_gate = () if recompute_gate else (gate_SF,)
        ctx.save_for_backward(x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, up_SF, *saved_gate)
        return y_SD

    @staticmethod
    def backward(ctx, grad_y_SD):
        x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, up_SF, *saved_gate = ctx.saved_tensors
        backend = ctx.backend
        need = ctx.needs_input_grad
        grad_y_SD = grad_y_SD.contiguous()
        if ctx.recompute_gate:
            gate_SF = grouped_mm(gate_in_SG, w_gate_EGF, offsets_E, backend)
        else:
            (gate_SF,) = saved_gate
        act_SF, dact_SF = _silu_and_grad(gate_SF)
        del gate_SF
        weight_S1 = gate_weight_S.to(x_SD.dtype).unsqueeze(-1)
        hidden_SF = act_SF * up_SF  # before the gate weight

        grad_w_out = grouped_weight_grad(hidden_SF * weight_S1, grad_y_SD, offsets_E, backend) if need[4] else None
        grad_hw_SF = grouped_mm(grad_y_SD, w_out_EFD.transpose(-2, -1), offsets_E, backend)  # d loss / d (weighted hidden)
        grad_weight_S = (grad_hw_SF * hidden_SF).sum(-1, dtype=gate_weight_S.dtype) if need[5] else None
        del hidden_SF
        grad_hidden_SF = grad_hw_SF * weight_S1
        del grad_hw_SF
        grad_up_SF = grad_hidden_SF * act_SF
        grad_gate_SF = grad_hidden_SF * up_SF * dact_SF
        del grad_hidden_SF, act_SF, dact_SF

        grad_w_in = grouped_weight_grad(x_SD, grad_up_SF, offsets_E, backend) if need[3] else None
        grad_x_SD = grouped_mm(grad_up_SF, w_in_EDF.transpose(-2, -1), offsets_E, backend) if need[0] else None
        del grad_up_SF
        grad_w_gate = grouped_weight_grad(gate_in_SG, grad_gate_SF, offsets_E, backend) if need[2] else None
        grad_gate_in_SG = grouped_mm(grad_gate_SF, w_gate_EGF.transpose(-2, -1), offsets_E, backend) if need[1] else None
        return grad_x_SD, grad_gate_in_SG, grad_w_gate, grad_w_in, grad_w_out, grad_weight_S, None, None, None
