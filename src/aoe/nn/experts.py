"""The expert computation shared by MoE and AoE: gated SwiGLU experts over sorted rows.

For a sorted row s owned by expert e, with gate weight g_s (the selection's weight of that slot):

    gate_s = gate_in_s @ w_gate[e]          MoE: gate_in = x, w_gate [E, D, F]
                                            AoE: gate_in = c (cached low-rank activation),
                                                 w_gate = w_up [E, L, F]
    y_s    = g_s * (SiLU(gate_s) * (x_s @ w_in[e])) @ w_out[e]

A hand-written backward keeps only what it needs: x, gate_in, ``up = x @ w_in``, the unweighted
output [S, D] (for the gate weight's gradient) and, unless ``recompute_gate``, the gate
pre-activation. SiLU(gate) * up is recomputed in backward (elementwise). With
``recompute_gate=True`` the gate pre-activation is recomputed too: one [S, L] x [L, F] matmul for
AoE, where L = d_low is small, which keeps AoE's saved activations below the MoE's despite its
wider experts.

The backward runs over ``backward_chunks`` blocks of consecutive sorted rows (each block is still
grouped by expert; weight gradients are summed over blocks), so its S x F temporaries are a
fraction of the whole. ``backward_chunks=None`` chooses ``clamp(S // (256 * E), 1, 4)``: no
chunking for small inputs, and at least 256 rows per expert on average in every block.

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
    backward_chunks: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Run every sorted row through its expert; returns the weighted outputs [S, D]."""
    if backward_chunks is None:
        backward_chunks = min(4, max(1, x_SD.shape[0] // (256 * w_in_EDF.shape[0])))
    return _SwiGLUExperts.apply(
        x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, recompute_gate, backward_chunks, backend
    )


def _rowwise_dot(a_SD: torch.Tensor, b_SD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_d a[s, d] * b[s, d] as one batched matmul (no [S, D] temporary), in ``dtype``."""
    return torch.bmm(a_SD.unsqueeze(1), b_SD.unsqueeze(2)).view(-1).to(dtype)


def _row_blocks(n_rows: int, offsets_E: torch.Tensor, n_blocks: int):
    """Yield (row slice, group offsets within the slice) for ``n_blocks`` blocks of rows."""
    size = -(-n_rows // max(1, n_blocks)) if n_rows else 0
    if size == 0 or size >= n_rows:
        yield slice(0, n_rows), offsets_E
        return
    for start in range(0, n_rows, size):
        end = min(n_rows, start + size)
        yield slice(start, end), (offsets_E.clamp(start, end) - start).to(torch.int32)


class _SwiGLUExperts(torch.autograd.Function):
    """Forward keeps x, gate_in, up, the unweighted output u (and gate unless recomputed).

    Backward, per block of rows, with S x F buffers counted: act = SiLU(gate) and hidden =
    act * up (for w_out's gradient, then freed); grad_hidden = (w * grad_y) @ w_out^T;
    grad_up = act * grad_hidden (in act's buffer); grad_gate = SiLU'(gate) * grad_hidden * up
    (in grad_hidden's buffer). The gate weight's gradient is <grad_y, u> per row.
    """

    @staticmethod
    def forward(ctx, x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, recompute_gate,
                backward_chunks, backend):
        gate_SF = grouped_mm(gate_in_SG, w_gate_EGF, offsets_E, backend)
        up_SF = grouped_mm(x_SD, w_in_EDF, offsets_E, backend)
        hidden_SF = F.silu(gate_SF).mul_(up_SF)
        unweighted_SD = grouped_mm(hidden_SF, w_out_EFD, offsets_E, backend)
        del hidden_SF
        y_SD = unweighted_SD * gate_weight_S.to(x_SD.dtype).unsqueeze(-1)
        ctx.recompute_gate = recompute_gate
        ctx.gate_in_is_x = gate_in_SG is x_SD  # MoE: the gate reads x itself
        ctx.backward_chunks = backward_chunks
        ctx.backend = backend
        saved_gate = () if recompute_gate else (gate_SF,)
        ctx.save_for_backward(
            x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, up_SF, unweighted_SD, *saved_gate
        )
        return y_SD

    @staticmethod
    def backward(ctx, grad_y_SD):
        (x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, up_SF, unweighted_SD,
         *saved_gate) = ctx.saved_tensors
        backend = ctx.backend
        need = ctx.needs_input_grad
        grad_y_SD = grad_y_SD.contiguous()
        grad_weight_S = _rowwise_dot(grad_y_SD, unweighted_SD, gate_weight_S.dtype) if need[5] else None
        grad_yw_SD = grad_y_SD * gate_weight_S.to(grad_y_SD.dtype).unsqueeze(-1)
        grad_x_SD = torch.empty_like(x_SD) if need[0] else None
        if ctx.gate_in_is_x:
            gate_in_SG = x_SD
        gate_in_is_x = ctx.gate_in_is_x and need[0]  # then both gradients go into one buffer
        grad_gate_in_SG = grad_x_SD if gate_in_is_x else (torch.empty_like(gate_in_SG) if need[1] else None)
        grad_w_gate = grad_w_in = grad_w_out = None
        w_out_T, w_in_T, w_gate_T = (w.transpose(-2, -1) for w in (w_out_EFD, w_in_EDF, w_gate_EGF))

        for rows, offs in _row_blocks(x_SD.shape[0], offsets_E, ctx.backward_chunks):
            x, gate_in, up, grad_yw = x_SD[rows], gate_in_SG[rows], up_SF[rows], grad_yw_SD[rows]
            gate = grouped_mm(gate_in, w_gate_EGF, offs, backend) if ctx.recompute_gate else saved_gate[0][rows]
            act = F.silu(gate)
            if need[4]:
                grad_w_out = grouped_weight_grad(act * up, grad_yw, offs, backend, out=grad_w_out)
            grad_hidden = grouped_mm(grad_yw, w_out_T, offs, backend)
            grad_up = act.mul_(grad_hidden)
            del act
            if need[3]:
                grad_w_in = grouped_weight_grad(x, grad_up, offs, backend, out=grad_w_in)
            if need[0]:
                grad_x_SD[rows] = grouped_mm(grad_up, w_in_T, offs, backend)
            del grad_up
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
            del grad_hidden, gate
            if need[2]:
                grad_w_gate = grouped_weight_grad(gate_in, grad_gate, offs, backend, out=grad_w_gate)
            if gate_in_is_x:
                grad_x_SD[rows] += grouped_mm(grad_gate, w_gate_T, offs, backend)
            elif need[1]:
                grad_gate_in_SG[rows] = grouped_mm(grad_gate, w_gate_T, offs, backend)
            del grad_gate
        if gate_in_is_x:
            grad_gate_in_SG = None
        return grad_x_SD, grad_gate_in_SG, grad_w_gate, grad_w_in, grad_w_out, grad_weight_S, None, None, None, None
