"""Grouped matrix multiplies: the one seam between the expert engine and the hardware.

Rows of the activation matrix are sorted by expert; ``offsets_E`` holds the cumulative end row of
each expert's group (int32, ``offsets_E[-1] == rows``). Two primitives cover every matmul the
engine needs, forward and backward:

- ``grouped_mm(x_TD, w_EDF, offsets_E) -> [T, F]``: row group e times ``w_EDF[e]``.
- ``grouped_weight_grad(x_TD, dy_TF, offsets_E) -> [E, D, F]``: ``x_e^T @ dy_e`` per group
  (exactly zero for a group with no rows).

Backends:
- ``"torch"``: ``torch._grouped_mm`` (one kernel for all groups), used where the installed torch
  supports the device and dtype (probed once per device type and dtype, e.g. fp32/bf16 on CPU,
  bf16 on Hopper GPUs) and the operands meet its layout rule (16-byte aligned strides, so widths
  that are multiples of 8 for bf16 and of 4 for fp32); a call that does not, or that the kernel
  refuses, runs on the loop.
- ``"loop"``: one ``torch.mm`` per expert over its contiguous slice of rows. Correct for every
  device and dtype (fp64 included); a Python loop over experts, never over tokens.
- ``"auto"`` (default): ``"torch"`` on accelerators where supported, else ``"loop"``. On the CPU
  ``"auto"`` is the loop: there torch's kernel is itself a loop of matmuls that copies transposed
  operands first, so the loop is as fast and uses less memory. Under ``torch.compile`` the torch
  kernel is only used for bf16 (the compiled kernel accepts bf16 only).

A call that would take the torch kernel on this device but cannot (operands not 16-byte aligned,
e.g. a bf16 width that is not a multiple of 8) warns once per device type, dtype and widths, then
runs on the loop.

Under ``torch.compile`` (no graph break): the loop runs as the custom ops ``aoe::loop_mm`` and
``aoe::loop_weight_grad``, opaque to the tracer (their group bounds are read on the host, inside
the op), and the layout rule checks strides only: a traced tensor's storage offset is not a
static value, and every operand the engine passes is a whole tensor or a slice along one of its
checked strides, whose start is then aligned as well.

Shape legend: T rows (token slots), D input dim, F output dim, E experts.
"""

from __future__ import annotations

import warnings

import torch

BACKENDS = ("auto", "torch", "loop")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"grouped_mm={name!r} is not a backend; choose one of {BACKENDS}")
    return name


_KERNEL_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def _torch_kernel_supports(device_type: str, dtype: torch.dtype) -> bool:
    key = (device_type, dtype)
    if key not in _KERNEL_SUPPORT:
        probe = _probe_torch_kernel
        if torch.compiler.is_compiling():  # run the probe eagerly, outside the graph being traced
            probe = torch.compiler.disable(probe)  # (imports torch._dynamo: only here, where it is loaded already)
        _KERNEL_SUPPORT[key] = probe(device_type, dtype)
    return _KERNEL_SUPPORT[key]


def probe_before_compile(device: torch.device | str) -> None:
    """Run the kernel probe of ``device`` for bf16 (the dtype the compiled path can take) now, in
    eager mode: a probe first met inside a traced graph is a graph break (``train.compile``)."""
    device = torch.device(device)
    if device.type != "cpu":
        _torch_kernel_supports(device.type, torch.bfloat16)


def _probe_torch_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Try torch._grouped_mm once for this device type and dtype (all three call forms)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        device = torch.device(device_type)
        x = torch.ones(32, 16, device=device, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        torch._grouped_mm(x, w, offs)
        torch._grouped_mm(x, w.transpose(-2, -1), offs)
        torch._grouped_mm(x.t(), x, offs)
        return True
    except Exception:  # any refusal means: not supported here
        return False


def _aligned(*tensors: torch.Tensor) -> bool:
    """The kernel's layout rule: 16-byte aligned starts and non-unit strides (under compile the
    strides only: see the module's docstring)."""
    compiling = torch.compiler.is_compiling()
    for t in tensors:
        size = t.element_size()
        if not compiling and (t.storage_offset() * size) % 16:
            return False
        if any((st * size) % 16 for st, n in zip(t.stride(), t.shape) if st != 1 and n > 1):
            return False
    return True


def _kernel_wanted(backend: str, x: torch.Tensor) -> bool:
    """Would this call take the torch kernel if its operands were aligned?"""
    if backend == "loop" or (torch.compiler.is_compiling() and x.dtype != torch.bfloat16):
        return False
    if backend == "torch":
        return True
    # On the CPU the kernel is itself a loop of matmuls that first copies transposed operands,
    # so the loop backend is as fast and leaner there (benchmarks/RESULTS.md).
    return x.device.type != "cpu" and _torch_kernel_supports(x.device.type, x.dtype)


_WARNED: set[tuple] = set()


def _warn_fallback(x: torch.Tensor, w: torch.Tensor) -> None:
    key = (x.device.type, x.dtype, tuple(x.shape[1:]), tuple(w.shape[1:]))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"grouped_mm: {x.dtype} operands of widths {tuple(x.shape[1:])} x {tuple(w.shape[1:])} "
                      f"are not 16-byte aligned on {x.device.type}: running the per-expert loop instead of "
                      f"torch._grouped_mm (use widths that are multiples of {16 // x.element_size()})",
                      RuntimeWarning, stacklevel=3)


def _use_torch_kernel(backend: str, x: torch.Tensor, w: torch.Tensor) -> bool:
    if not _kernel_wanted(backend, x):
        return False
    if not _aligned(x, w):
        _warn_fallback(x, w)
        return False
    return True


def _group_bounds(offsets_E: torch.Tensor) -> list[int]:
    return [0] + offsets_E.tolist()


def _loop_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    out_TF = x_TD.new_empty(x_TD.shape[0], w_EDF.shape[-1])
    bounds = _group_bounds(offsets_E)
    for e in range(w_EDF.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            torch.mm(x_TD[start:end], w_EDF[e], out=out_TF[start:end])
    return out_TF


def _loop_weight_grad(x_TD: torch.Tensor, dy_TF: torch.Tensor, offsets_E: torch.Tensor, out_EDF: torch.Tensor | None) -> torch.Tensor:
    n_experts = offsets_E.shape[0]
    accumulate = out_EDF is not None
    if out_EDF is None:
        out_EDF = x_TD.new_zeros(n_experts, x_TD.shape[1], dy_TF.shape[1])
    bounds = _group_bounds(offsets_E)
    for e in range(n_experts):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            if accumulate:
                out_EDF[e].addmm_(x_TD[start:end].t(), dy_TF[start:end])
            else:
                torch.mm(x_TD[start:end].t(), dy_TF[start:end], out=out_EDF[e])
    return out_EDF


@torch.library.custom_op("aoe::loop_mm", mutates_args=())
def _loop_mm_op(x_TD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _loop_mm(x_TD, w_EDF, offsets_E)


@_loop_mm_op.register_fake
def _(x_TD, w_EDF, offsets_E):
    return x_TD.new_empty(x_TD.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("aoe::loop_weight_grad", mutates_args=())
def _loop_weight_grad_op(x_TD: torch.Tensor, dy_TF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _loop_weight_grad(x_TD, dy_TF, offsets_E, None)


@_loop_weight_grad_op.register_fake
def _(x_TD, dy_TF, offsets_E):
    return x_TD.new_empty(offsets_E.shape[0], x_TD.shape[1], dy_TF.shape[1])


def _loop(x_TD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """The loop backend, as an opaque op under torch.compile (its bounds are host values)."""
    if torch.compiler.is_compiling():
        return _loop_mm_op(x_TD, w_EDF, offsets_E)
    return _loop_mm(x_TD, w_EDF, offsets_E)


def _loop_grad(x_TD, dy_TF, offsets_E, out_EDF):
    if torch.compiler.is_compiling():
        result = _loop_weight_grad_op(x_TD, dy_TF, offsets_E)
        return result if out_EDF is None else out_EDF.add_(result)
    return _loop_weight_grad(x_TD, dy_TF, offsets_E, out_EDF)


def grouped_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``out[rows of group e] = x[rows of group e] @ w_EDF[e]``; returns [T, F]."""
    if x_TD.shape[0] > 0 and _use_torch_kernel(backend, x_TD, w_EDF):
        try:
            return torch._grouped_mm(x_TD, w_EDF, offsets_E)
        except RuntimeError:
            if backend == "torch":
                raise
    return _loop(x_TD, w_EDF, offsets_E)


def grouped_weight_grad(
    x_TD: torch.Tensor, dy_TF: torch.Tensor, offsets_E: torch.Tensor, backend: str = "auto", out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x[rows of group e]^T @ dy[rows of group e]`` per group: [E, D, F] (zero for empty groups).

    With ``out`` given, the result is added into it in place (and ``out`` returned).
    """
    if x_TD.shape[0] > 0 and _use_torch_kernel(backend, x_TD, dy_TF):
        try:
            result = torch._grouped_mm(x_TD.t(), dy_TF, offsets_E)
            return result if out is None else out.add_(result)
        except RuntimeError:
            if backend == "torch":
                raise
    return _loop_grad(x_TD, dy_TF, offsets_E, out)


class _GroupedLinear(torch.autograd.Function):
    """Autograd for ``grouped_mm``: dx = dy @ w[e]^T per group, dw[e] = x_e^T @ dy_e (zero when idle)."""

    @staticmethod
    def forward(ctx, x_TD, w_EDF, offsets_E, backend):
        ctx.save_for_backward(x_TD, w_EDF, offsets_E)
        ctx.backend = backend
        return grouped_mm(x_TD, w_EDF, offsets_E, backend)

    @staticmethod
    def backward(ctx, dy_TF):
        x_TD, w_EDF, offsets_E = ctx.saved_tensors
        dy_TF = dy_TF.contiguous()
        dx = grouped_mm(dy_TF, w_EDF.transpose(-2, -1), offsets_E, ctx.backend) if ctx.needs_input_grad[0] else None
        dw = grouped_weight_grad(x_TD, dy_TF, offsets_E, ctx.backend) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def grouped_linear(x_TD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``grouped_mm`` with gradients for x and w (for the few matmuls outside the fused expert function)."""
    return _GroupedLinear.apply(x_TD, w_EDF, offsets_E, backend)
