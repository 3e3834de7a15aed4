"""The expert computation shared by MoE and AoE: gated SwiGLU experts over sorted rows.

For a sorted row s owned by expert e, with gate weight g_s (the selection's weight of that slot):

    gate_s = gate_in_s @ w_gate[e]          MoE: gate_in = x, w_gate [E, D, F]
                                            AoE: gate_in = c (cached low-rank activation),
                                                 w_gate = w_up [E, L, F]
    h_s    = SiLU(gate_s) * (x_s @ w_in[e])
    y_s    = g_s * h_s @ w_out[e]

A hand-written backward keeps only what it needs: gate_in, ``up = x @ w_in`` and, unless
``recompute_gate``, the gate pre-activation; [S, F] each, nothing of width D. h is recomputed in
backward (elementwise). The gate weight's gradient is the row-wise dot ``<dL/dh_s, h_s>`` of the
unweighted hidden gradient ``dL/dh_s = grad_y_s @ w_out[e]^T`` and the recomputed hidden
activation (equal to ``<grad_y_s, h_s @ w_out[e]>``), so the unweighted output [S, D] is not kept.
Given ``tokens=(x_TD, token_S)`` (``x_SD == x_TD[token_S]``, the layers' case) the gathered x_SD
is not kept either: each backward block re-gathers its rows from x_TD, which the layer keeps
anyway for its scores. With ``recompute_gate=True`` the gate pre-activation is recomputed too: one
[S, L] x [L, F] matmul for AoE, where L = d_low is small.

The backward runs over ``backward_chunks`` blocks of consecutive sorted rows (each block is still
grouped by expert; weight gradients are summed over blocks), so its S x F temporaries are a
fraction of the whole. ``backward_chunks=None`` chooses ``clamp(max(S // (256 * E), S // 4096), 1, 4)``:
no chunking for small inputs; blocks of at least 256 rows per expert on average, or of 4096 rows
where the experts are many and small (E = 64 at S = 16k rows: 4 blocks; benchmarks/RESULTS.md has
the memory and time of each choice).

Shape legend: S sorted rows, T tokens, D model dim, G gate input dim (D or L), F expert width,
E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aoe.nn.dispatch import sum_slots
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
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    recompute_gate: bool = False,
    backward_chunks: int | None = None,
    backend: str = "auto",
    combine=None,
) -> torch.Tensor:
    """Run every sorted row through its expert; returns the weighted outputs [S, D], or with
    ``combine`` (the rows' ``aoe.nn.dispatch.Dispatch``, with ``tokens``) each token's slots
    summed, [T, D], as ``combine.combine`` sums them.

    ``gate_in_SG`` may be ``x_SD`` itself (MoE's gate reads x). ``tokens=(x_TD, token_S)``: the
    token matrix x_SD was gathered from (``x_SD == x_TD[token_S]``); then backward re-gathers the
    rows instead of keeping x_SD (None: x_SD is kept, for rows that came from elsewhere). Combined,
    backward also reads each block's output gradient from the [T, D] one (no [S, D] copy).
    """
    if combine is not None and tokens is None:
        raise ValueError("combine needs tokens=(x_TD, token_S)")
    if backward_chunks is None:
        rows = x_SD.shape[0]
        backward_chunks = min(4, max(1, rows // (256 * w_in_EDF.shape[0]), rows // 4096))
    x_TD, token_S = tokens if tokens is not None else (None, None)
    gate_in_SG = None if gate_in_SG is x_SD else gate_in_SG  # (one tensor passed twice: a graph break under compile)
    slots = None if combine is None else (combine.inverse_S, combine.top_k, combine.padded)
    return _SwiGLUExperts.apply(
        x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, x_TD, token_S,
        recompute_gate, backward_chunks, backend, slots,
    )


def _rowwise_dot(a_SF: torch.Tensor, b_SF: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_f a[s, f] * b[s, f] as one batched matmul (no [S, F] temporary), in ``dtype``."""
    return torch.bmm(a_SF.unsqueeze(1), b_SF.unsqueeze(2)).view(-1).to(dtype)


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
    """Forward keeps gate_in, up (and gate unless recomputed), and x_SD or (x_TD, token_S).

    Backward, per block of rows, with S x F buffers counted (at most two at a time):
    dh = grad_y @ w_out^T (unweighted); h = SiLU(gate) * up for the gate weight's gradient
    <dh, h> and w_out's (g * h)^T @ grad_y, then freed; dh *= g; grad_up = SiLU(gate) * dh
    (in h's place); grad_gate = SiLU'(gate) * dh * up (in dh's buffer).
    """

    @staticmethod
    def forward(ctx, x_SD, gate_in_SG, w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, x_TD, token_S,
                recompute_gate, backward_chunks, backend, slots):
        ctx.gate_in_is_x = gate_in_SG is None  # MoE: the gate reads x itself
        gate_SF = grouped_mm(x_SD if ctx.gate_in_is_x else gate_in_SG, w_gate_EGF, offsets_E, backend)
        up_SF = grouped_mm(x_SD, w_in_EDF, offsets_E, backend)
        hidden_SF = F.silu(gate_SF).mul_(up_SF)
        y_SD = grouped_mm(hidden_SF, w_out_EFD, offsets_E, backend).mul_(gate_weight_S.to(x_SD.dtype).unsqueeze(-1))
        del hidden_SF
        ctx.recompute_gate, ctx.backward_chunks, ctx.backend = recompute_gate, backward_chunks, backend
        ctx.regather = x_TD is not None
        ctx.x_shape, ctx.x_dtype = x_SD.shape, x_SD.dtype
        rows = (x_TD, token_S) if ctx.regather else (x_SD,)
        gate_in = () if ctx.gate_in_is_x else (gate_in_SG,)
        saved_gate = () if recompute_gate else (gate_SF,)
        ctx.save_for_backward(w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, up_SF, *rows, *gate_in,
                              *saved_gate)
        ctx.combined = slots is not None
        return y_SD if slots is None else sum_slots(y_SD, *slots)

    @staticmethod
    def backward(ctx, grad_y_SD):
        w_gate_EGF, w_in_EDF, w_out_EFD, gate_weight_S, offsets_E, up_SF, *rest = ctx.saved_tensors
        if ctx.regather:
            x_TD, token_S, *rest = rest
            rows_of = lambda rows: x_TD.index_select(0, token_S[rows])  # noqa: E731
        else:
            x_SD, *rest = rest
            rows_of = lambda rows: x_SD[rows]  # noqa: E731
        gate_in_SG = None if ctx.gate_in_is_x else rest.pop(0)
        saved_gate_SF = None if ctx.recompute_gate else rest[0]
        need = ctx.needs_input_grad
        grads = _Grads(ctx, need, gate_weight_S, gate_in_SG)
        grad_y = grad_y_SD.contiguous()  # combined: [T, D], each block reads its rows' tokens
        grad_y_of = (lambda rows: grad_y.index_select(0, token_S[rows])) if ctx.combined else (lambda rows: grad_y[rows])
        for rows, offs in _row_blocks(ctx.x_shape[0], offsets_E, ctx.backward_chunks):
            x = rows_of(rows)
            gate_in = x if ctx.gate_in_is_x else gate_in_SG[rows]
            gate = grouped_mm(gate_in, w_gate_EGF, offs, ctx.backend) if ctx.recompute_gate else saved_gate_SF[rows]
            _block_backward(ctx, grads, rows, offs, x, gate_in, gate, up_SF[rows], grad_y_of(rows),
                            gate_weight_S[rows], w_gate_EGF, w_in_EDF, w_out_EFD)
        grad_x, grad_gate_in = grads.x_SD, (None if ctx.gate_in_is_x else grads.gate_in_SG)
        return (grad_x, grad_gate_in, grads.w_gate, grads.w_in, grads.w_out, grads.weight_S,
                None, None, None, None, None, None, None)


class _Grads:
    """The backward's outputs: per-row buffers (filled block by block) and weight gradients (summed)."""

    def __init__(self, ctx, need, gate_weight_S, gate_in_SG):
        self.need_x, self.need_gate_in = need[0], need[1]
        self.need_w_gate, self.need_w_in, self.need_w_out, self.need_weight = need[2], need[3], need[4], need[5]
        n_rows, d_model = ctx.x_shape
        device = gate_weight_S.device
        self.x_SD = torch.empty(n_rows, d_model, dtype=ctx.x_dtype, device=device) if need[0] else None
        self.gate_in_is_x = ctx.gate_in_is_x and need[0]  # then both gradients go into one buffer
        self.gate_in_SG = torch.empty_like(gate_in_SG) if need[1] and not ctx.gate_in_is_x else None
        self.weight_S = torch.empty_like(gate_weight_S) if need[5] else None
        self.w_gate = self.w_in = self.w_out = None


def _block_backward(ctx, grads: _Grads, rows, offs, x, gate_in, gate, up, grad_y, weight_S, w_gate_EGF, w_in_EDF,
                    w_out_EFD) -> None:
    """One block of rows: its per-row gradients into ``grads``' buffers, its weight gradients added."""
    backend = ctx.backend
    g_S1 = weight_S.to(grad_y.dtype).unsqueeze(-1)
    dh = grouped_mm(grad_y, w_out_EFD.transpose(-2, -1), offs, backend)  # dL/dh, unweighted
    if grads.need_weight or grads.need_w_out:
        hidden = F.silu(gate).mul_(up)
        if grads.need_weight:
            grads.weight_S[rows] = _rowwise_dot(dh, hidden, grads.weight_S.dtype)
        if grads.need_w_out:
            grads.w_out = grouped_weight_grad(hidden.mul_(g_S1), grad_y, offs, backend, out=grads.w_out)
        del hidden
    dh = dh.mul_(g_S1)
    grad_up = F.silu(gate).mul_(dh)
    if grads.need_w_in:
        grads.w_in = grouped_weight_grad(x, grad_up, offs, backend, out=grads.w_in)
    if grads.need_x:
        grads.x_SD[rows] = grouped_mm(grad_up, w_in_EDF.transpose(-2, -1), offs, backend)
    del grad_up
    grad_gate = torch.ops.aten.silu_backward(dh.mul_(up), gate)
    del dh
    if grads.need_w_gate:
        grads.w_gate = grouped_weight_grad(gate_in, grad_gate, offs, backend, out=grads.w_gate)
    grad_gate_in = None
    if grads.gate_in_is_x or grads.need_gate_in:
        grad_gate_in = grouped_mm(grad_gate, w_gate_EGF.transpose(-2, -1), offs, backend)
    if grads.gate_in_is_x:
        grads.x_SD[rows] += grad_gate_in
    elif grads.need_gate_in:
        grads.gate_in_SG[rows] = grad_gate_in
