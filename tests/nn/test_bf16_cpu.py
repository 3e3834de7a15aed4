"""bf16 autocast on the CPU through torch._grouped_mm (the GPU's code path, ``grouped_mm="torch"``):
every expert matmul takes the kernel, and outputs and gradients stay close to the loop backend's
and to the fp64 reference."""

import pytest
import torch

import aoe.nn.grouped_mm as gm
from aoe import AoE, MoE
from aoe.nn.reference import reference_forward

from .helpers import grads_of, rel_err

pytestmark = pytest.mark.skipif(not gm._torch_kernel_supports("cpu", torch.bfloat16),
                                reason="this torch has no CPU bf16 torch._grouped_mm")


def build(kind, backend):
    torch.manual_seed(0)
    if kind == "moe":
        return MoE(32, 48, 4, 2, grouped_mm=backend, backward_chunks=2)
    return AoE(32, 8, 4, 2, d_wide=48, grouped_mm=backend)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_bf16_autocast_takes_the_kernel_and_stays_close(kind, monkeypatch):
    calls = []
    kernel = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(a[0].dtype) or kernel(*a, **kw))
    monkeypatch.setattr(gm, "_loop_mm", None)  # the loop must not run
    monkeypatch.setattr(gm, "_loop_weight_grad", None)
    fast = build(kind, "torch")
    x = torch.randn(3, 24, 32)
    xf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(xf)
    assert out.dtype == torch.bfloat16
    g = torch.randn_like(out, dtype=torch.float32)
    grads = grads_of(fast, xf, out.float(), g)
    assert calls and set(calls) == {torch.bfloat16}
    assert len(calls) >= 3 + 6  # three expert matmuls forward, at least six backward
    ref_layer = build(kind, "loop").double()
    xd = x.double().requires_grad_()
    ref, _ = reference_forward(ref_layer, xd)
    ref_grads = grads_of(ref_layer, xd, ref, g.double())
    assert rel_err(out, ref) <= 3e-2
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 5e-2, name
