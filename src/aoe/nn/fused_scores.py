"""AoE's scores without the [T, E, L] cache: one Triton kernel per direction (``aoe.nn.score_kernels``).

The PyTorch path (``AoE.expert_scores`` with ``scores_backend="torch"``) computes every expert's
activation ``c = x @ w_down`` as one [T, E*L] matmul, keeps it, and reads the chosen experts' rows
out of it. The fused path instead:

- forward: ``expert_norms`` = the norms [T, E] (fp32) straight from the kernel's fp32 tiles, c
  never written; then, once the experts are chosen, ``chosen_activations`` computes the S chosen
  rows ``x[token_s] @ w_down[expert_s]`` as one grouped matmul (k / E of the scoring FLOPs);
- backward: the kernel recomputes c tile by tile and writes only ``dc`` [T, E*L] (x's dtype, a
  transient of the backward, in token blocks of at most ``BACKWARD_BLOCK_BYTES``); ``dx = dc @ w^T``
  and ``dw = x^T @ dc`` are plain matmuls. The chosen rows' backward is two grouped matmuls.

Saved for backward: x and w_down (both live anyway), the norms [T, E] fp32. ``expert_norms`` is a
``torch.library`` custom op (``aoe::expert_norms``) with a registered fake and autograd, so
``torch.compile`` keeps it as one opaque op in its graph.

``scores_backend``: "torch" (the reference and fallback), "triton" (the kernel, forced; on a CPU
only under ``TRITON_INTERPRET=1``), "auto" (the kernel on CUDA inputs of fp16/bf16/fp32 when triton
imports and the norm is l2 or l1; the PyTorch path otherwise).

Shape legend: T tokens, D model dim, E experts, L = d_low, X = E*L, S chosen (token, expert) rows.
"""

from __future__ import annotations

import os

import torch

from aoe.nn.dispatch import Dispatch, sum_slots
from aoe.nn.grouped_mm import grouped_mm, grouped_weight_grad

SCORES_BACKENDS = ("auto", "triton", "torch")
FUSED_NORMS = ("l2", "l1")  # linf's gradient needs tie counts: the PyTorch path only
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKWARD_BLOCK_BYTES = 256 * 2**20  # the backward's dc transient, per block of tokens


def check_scores_backend(scores_backend: str, norm: str) -> str:
    if scores_backend not in SCORES_BACKENDS:
        raise ValueError(f"scores_backend={scores_backend!r} is not a backend; choose one of {SCORES_BACKENDS}")
    if scores_backend == "triton" and norm not in FUSED_NORMS:
        raise ValueError(f"scores_backend='triton' fuses norm in {FUSED_NORMS}, not norm={norm!r}; "
                         "use scores_backend='torch' or 'auto'")
    return scores_backend


_TRITON_IMPORTS: bool | None = None


def _import_kernels() -> bool:
    try:
        import aoe.nn.score_kernels  # noqa: F401
    except Exception:  # ImportError, or a triton that fails on this platform
        return False
    return True


def triton_available() -> bool:
    """Whether triton imports (and with it the kernels); tried once, eagerly even under torch.compile."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        probe = torch.compiler.disable(_import_kernels) if torch.compiler.is_compiling() else _import_kernels
        _TRITON_IMPORTS = probe()
    return _TRITON_IMPORTS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_fused(scores_backend: str, x_TD: torch.Tensor, norm: str) -> bool:
    """Whether this call runs the kernel (``scores_backend="triton"`` raises where it cannot)."""
    if scores_backend == "torch":
        return False
    fits = x_TD.dtype in FUSED_DTYPES and norm in FUSED_NORMS and x_TD.dim() == 2
    runs_here = x_TD.is_cuda or (interpreting() and x_TD.device.type == "cpu")
    if scores_backend == "auto":
        return x_TD.is_cuda and fits and triton_available()
    if not triton_available():
        raise RuntimeError("scores_backend='triton' needs the triton package; install it or use scores_backend='auto'")
    if not (fits and runs_here):
        raise ValueError(f"scores_backend='triton' cannot score a {x_TD.dtype} input on {x_TD.device.type} "
                         f"(needs {[str(d) for d in FUSED_DTYPES]} on CUDA, or on the CPU with TRITON_INTERPRET=1); "
                         "use scores_backend='auto'")
    return True


# -- the norms: a custom op ---------------------------------------------------------------------
def _combine(part_TEC: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return part_TEC.amax(dim=-1)
    total_TE = part_TEC.sum(dim=-1)
    return total_TE.sqrt_() if norm == "l2" else total_TE


@torch.library.custom_op("aoe::expert_norms", mutates_args=())
def _expert_norms_op(x_TD: torch.Tensor, w_DX: torch.Tensor, d_low: int, norm: str) -> torch.Tensor:
    from aoe.nn.score_kernels import Tiles, norm_partials

    tiles = Tiles.for_input(x_TD, d_low)
    return _combine(norm_partials(x_TD, w_DX, d_low, norm, tiles), norm)


@_expert_norms_op.register_fake
def _(x_TD, w_DX, d_low, norm):
    return x_TD.new_empty(x_TD.shape[0], w_DX.shape[1] // d_low, dtype=torch.float32)


@torch.library.custom_op("aoe::expert_norms_backward", mutates_args=())
def _expert_norms_backward_op(grad_TE: torch.Tensor, x_TD: torch.Tensor, w_DX: torch.Tensor, norms_TE: torch.Tensor,
                              d_low: int, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    from aoe.nn.score_kernels import Tiles, norm_grad

    tiles = Tiles.for_input(x_TD, d_low)
    grad_TE, norms_TE = grad_TE.float().contiguous(), norms_TE.contiguous()
    dx_TD, dw_DX = x_TD.new_empty(x_TD.shape), w_DX.new_zeros(w_DX.shape)
    rows = max(1, BACKWARD_BLOCK_BYTES // max(1, w_DX.shape[1] * x_TD.element_size()))
    for start in range(0, x_TD.shape[0], rows):
        block = slice(start, start + rows)
        dc_TX = norm_grad(x_TD[block], w_DX, norms_TE[block], grad_TE[block], d_low, norm, tiles)
        torch.mm(dc_TX, w_DX.t(), out=dx_TD[block])
        dw_DX.addmm_(x_TD[block].t(), dc_TX)
    return dx_TD, dw_DX


@_expert_norms_backward_op.register_fake
def _(grad_TE, x_TD, w_DX, norms_TE, d_low, norm):
    return torch.empty_like(x_TD), torch.empty_like(w_DX)


def _setup_context(ctx, inputs, output):
    x_TD, w_DX, d_low, norm = inputs
    ctx.save_for_backward(x_TD, w_DX, output)
    ctx.d_low, ctx.norm = d_low, norm


def _backward(ctx, grad_TE):
    x_TD, w_DX, norms_TE = ctx.saved_tensors
    dx_TD, dw_DX = _expert_norms_backward_op(grad_TE, x_TD, w_DX, norms_TE, ctx.d_low, ctx.norm)
    return dx_TD, dw_DX, None, None


_expert_norms_op.register_autograd(_backward, setup_context=_setup_context)


def expert_norms(x_TD: torch.Tensor, w_DX: torch.Tensor, d_low: int, norm: str = "l2") -> torch.Tensor:
    """[T, E] fp32 norms of each expert's ``x_TD @ w_DX[:, e*L:(e+1)*L]``, by the kernel; the
    backward (l2, l1) gives x and w_DX their gradients. ``w_DX``: w_down's fused [D, E*L] view."""
    if w_DX.shape[1] % d_low or x_TD.shape[1] != w_DX.shape[0]:
        raise ValueError(f"expert_norms: x {tuple(x_TD.shape)} and w_DX {tuple(w_DX.shape)} do not fit d_low={d_low}")
    return _expert_norms_op(x_TD, w_DX, d_low, norm)


# -- the chosen rows ----------------------------------------------------------------------------
def chosen_activations(x_TD: torch.Tensor, w_down_EDL: torch.Tensor, dispatch: Dispatch,
                       backend: str = "auto") -> torch.Tensor:
    """[S, L]: each sorted row's ``x[token_s] @ w_down[expert_s]`` (one grouped matmul). Saves x
    and w_down only: the gathered rows are gathered again in backward."""
    return _ChosenRows.apply(x_TD, w_down_EDL, dispatch.token_S, dispatch.inverse_S, dispatch.offsets_E,
                             dispatch.top_k, dispatch.padded, backend)


class _ChosenRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_down_EDL, token_S, inverse_S, offsets_E, top_k, padded, backend):
        ctx.save_for_backward(x_TD, w_down_EDL, token_S, inverse_S, offsets_E)
        ctx.top_k, ctx.padded, ctx.backend = top_k, padded, backend
        return grouped_mm(x_TD.index_select(0, token_S), w_down_EDL, offsets_E, backend)

    @staticmethod
    def backward(ctx, grad_SL):
        x_TD, w_down_EDL, token_S, inverse_S, offsets_E = ctx.saved_tensors
        grad_SL = grad_SL.contiguous()
        dx_TD = dw_EDL = None
        if ctx.needs_input_grad[0]:
            dx_SD = grouped_mm(grad_SL, w_down_EDL.transpose(-2, -1), offsets_E, ctx.backend)
            dx_TD = sum_slots(dx_SD, inverse_S, ctx.top_k, ctx.padded)  # deterministic: no atomics
        if ctx.needs_input_grad[1]:
            dw_EDL = grouped_weight_grad(x_TD.index_select(0, token_S), grad_SL, offsets_E, ctx.backend)
        return dx_TD, dw_EDL, None, None, None, None, None, None


# -- the reference ------------------------------------------------------------------------------
def expert_norms_reference(x_TD: torch.Tensor, w_down_EDL: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Slow and plain, in fp64: ``||x @ w_down[e]||`` expert by expert, [T, E] (autograd-able)."""
    order = {"l2": 2, "l1": 1, "linf": float("inf")}[norm]
    x64, w64 = x_TD.double(), w_down_EDL.double()
    return torch.stack([torch.linalg.vector_norm(x64 @ w64[e], ord=order, dim=-1) for e in range(w64.shape[0])], dim=1)
