"""The engine's pieces: grouped-matmul backends, dispatch, autocast (torch.compile: test_compile.py)."""

import pytest
import torch

from aoe import AoE, DenseFFN, MoE
from aoe.nn.dispatch import Dispatch
from aoe.nn.grouped_mm import grouped_mm, grouped_weight_grad

from .helpers import grads_of, rel_err


def random_groups(n_rows, n_experts, empty=(1,)):
    counts = torch.randint(1, 10, (n_experts,))
    counts[list(empty)] = 0
    counts = (counts.double() / counts.sum() * n_rows).floor().long()
    counts[-1] += n_rows - counts.sum()
    return counts.cumsum(0).to(torch.int32)


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_primitives_against_per_row_math(backend, dtype):
    if backend == "torch" and (dtype == torch.float64 or not hasattr(torch, "_grouped_mm")):
        pytest.skip("kernel takes fp32/bf16 only")
    E, T, D, F = 5, 64, 16, 24
    offsets = random_groups(T, E)
    x, w, dy = torch.randn(T, D, dtype=dtype), torch.randn(E, D, F, dtype=dtype), torch.randn(T, F, dtype=dtype)
    owner = torch.repeat_interleave(torch.arange(E), torch.diff(offsets, prepend=torch.zeros(1, dtype=torch.int32)).long())
    expected = torch.stack([x[i] @ w[owner[i]] for i in range(T)])
    expected_wgrad = torch.zeros(E, D, F, dtype=dtype)
    for i in range(T):
        expected_wgrad[owner[i]] += torch.outer(x[i], dy[i])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(grouped_mm(x, w, offsets, backend), expected) <= tol
    assert rel_err(grouped_mm(dy, w.transpose(-2, -1), offsets, backend), torch.stack([dy[i] @ w[owner[i]].T for i in range(T)])) <= tol
    wgrad = grouped_weight_grad(x, dy, offsets, backend)
    assert rel_err(wgrad, expected_wgrad) <= tol
    assert torch.count_nonzero(wgrad[1]) == 0  # the empty group


def test_dispatch_sorts_by_expert_and_combines_back():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
    d = Dispatch.build(idx, 5)
    assert d.expert_S.tolist() == sorted(idx.flatten().tolist())
    assert d.tokens_per_expert_E.tolist() == [3, 2, 2, 1, 0]
    assert d.offsets_E.tolist() == [3, 5, 7, 8, 8]
    x = torch.randn(4, 3, requires_grad=True)
    x_S = d.gather_tokens(x)
    assert torch.equal(x_S, x[d.token_S])
    y = d.combine(x_S * 2)
    assert torch.allclose(y, 4 * x)  # k = 2 copies, each doubled
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 4.0))


@pytest.mark.parametrize("kind", ["moe", "aoe", "dense"])
def test_autocast_bf16_runs_in_bf16_and_stays_close(kind):
    layer = {"moe": lambda: MoE(32, 48, 4, 2), "aoe": lambda: AoE(32, 8, 4, 2, d_ffn=48), "dense": lambda: DenseFFN(32, 48)}[kind]()
    x = torch.randn(3, 10, 32, requires_grad=True)
    ref = layer(x)
    ref_choice = layer.last_routing.expert_indices.sort(-1).values if kind != "dense" else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    same = torch.ones(30, dtype=torch.bool)
    if kind != "dense":  # bf16 scores may flip a near-tie choice; compare tokens routed alike
        same = (layer.last_routing.expert_indices.sort(-1).values == ref_choice).all(-1)
        assert same.float().mean() >= 0.8
    assert rel_err(out.float().view(30, 32)[same], ref.view(30, 32)[same]) < 3e-2
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_dense_ffn_is_one_expert():
    """A MoE with one expert and k = 1 computes exactly the dense SwiGLU."""
    dense = DenseFFN(16, 24).double()
    moe = MoE(16, 24, 1, 1).double()
    with torch.no_grad():
        moe.w_gate[0] = dense.w_gate
        moe.w_in[0] = dense.w_in
        moe.w_out[0] = dense.w_out
    x = torch.randn(5, 16, dtype=torch.float64)
    assert rel_err(moe(x), dense(x)) <= 1e-12
