"""GPU checks (skipped without CUDA): the layers on a CUDA device against the fp64 CPU reference,
and the grouped-matmul kernel against the loop backend in bf16."""

import pytest
import torch

from aoe import AoE, MoE
from aoe.nn.reference import reference_forward

from .helpers import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _layer(kind, **kw):
    if kind == "moe":
        return MoE(64, 96, 8, 2, **kw)
    return AoE(64, 16, 8, 2, d_ffn=96, **kw)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_layer_matches_cpu_reference(kind, dtype, tol):
    layer = _layer(kind).double()
    x = torch.randn(3, 40, 64, dtype=torch.float64)
    ref, routing = reference_forward(layer, x)
    gpu = _layer(kind).cuda()
    gpu.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = gpu(x.float().cuda())
    assert out.shape == x.shape
    if dtype == torch.float32:  # bf16 may flip near-tied choices; compare the full output only in fp32
        assert torch.equal(gpu.last_routing.expert_indices.cpu(), routing["indices"])
    assert rel_err(out.float().cpu(), ref) <= tol


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_cuda_grouped_kernel_matches_loop_bf16(kind):
    fast = _layer(kind, grouped_mm="auto").cuda().bfloat16()
    loop = _layer(kind, grouped_mm="loop").cuda().bfloat16()
    loop.load_state_dict(fast.state_dict())
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16)
    xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    of, ol = fast(xf), loop(xl)
    g = torch.randn_like(of)
    of.backward(g)
    ol.backward(g)
    assert rel_err(of, ol) <= 2e-2
    assert rel_err(xf.grad, xl.grad) <= 2e-2
    for (name, a), b in zip(fast.named_parameters(), loop.parameters()):
        assert rel_err(a.grad, b.grad) <= 3e-2, name


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_cuda_bf16_layer_compiles_to_one_graph_on_the_kernel(kind):
    """With the kernel probe run before compiling (as ``train.compile`` does), the bf16 layer on
    torch._grouped_mm is one graph, forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from aoe.nn.grouped_mm import probe_before_compile

    layer = _layer(kind).cuda().bfloat16()
    probe_before_compile("cuda")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(layer, backend=counter, fullgraph=True)(x)
    out.float().sum().backward()
    assert counter.frame_count == 1
    assert rel_err(out, layer(x.detach())) <= 1e-2
