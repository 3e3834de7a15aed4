"""Shared helpers of the layer tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    diff = (a - b).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def grads_of(layer, x, out, grad_out):
    """Gradients of <out, grad_out> w.r.t. x and every parameter, without touching .grad."""
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    return {n: (g if g is not None else torch.zeros_like(t)) for n, g, t in zip(names, grads, [x, *params])}
