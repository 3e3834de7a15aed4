"""The fast engine against the per-token reference, outputs and gradients, in fp64 (<= 1e-10)."""

import pytest
import torch

from aoe import AoE, MoE
from aoe.nn.reference import reference_forward

from .helpers import grads_of, rel_err

# (leading shape, d_model, n_experts, top_k, width, d_low)
SHAPES = [
    ((7,), 16, 4, 2, 24, 4),
    ((2, 5, ), 8, 1, 1, 12, 3),       # E = 1
    ((9,), 12, 3, 3, 16, 5),          # k = E
    ((1,), 16, 6, 2, 20, 4),          # one token
    ((2, 3, 4), 16, 8, 3, 8, 8),      # leading dims [B, T, d] and more
    ((33,), 24, 16, 4, 32, 6),        # many experts, some idle
]
TOL = 1e-10


def build(kind, d, E, k, width, d_low, **kw):
    if kind == "moe":
        return MoE(d, width, E, k, **kw).double()
    return AoE(d, d_low, E, k, d_wide=width, **kw).double()


def check_against_reference(layer, lead):
    x = torch.randn(*lead, layer.d_model, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref, routing = reference_forward(layer, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= TOL
    torch.testing.assert_close(layer.last_routing.expert_indices, routing["indices"], rtol=0, atol=0)
    assert rel_err(layer.last_routing.gate_weights, routing["weights"]) <= TOL
    assert rel_err(layer.last_routing.probs, routing["probs"]) <= TOL
    grad_out = torch.randn_like(out)
    fast = grads_of(layer, x, out, grad_out)
    slow = grads_of(layer, x, ref, grad_out)
    for name in fast:
        assert rel_err(fast[name], slow[name]) <= TOL, name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_matches_reference(shape, renormalize):
    lead, d, E, k, width, d_low = shape
    check_against_reference(build("moe", d, E, k, width, d_low, renormalize=renormalize, grouped_mm="loop"), lead)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
def test_aoe_matches_reference(shape, renormalize, norm):
    lead, d, E, k, width, d_low = shape
    layer = build("aoe", d, E, k, width, d_low, renormalize=renormalize, norm=norm, grouped_mm="loop")
    check_against_reference(layer, lead)


@pytest.mark.parametrize("recompute_scores", [False, True])
@pytest.mark.parametrize("recompute_gate", [False, True])
def test_aoe_recomputation_is_exact(recompute_scores, recompute_gate):
    layer = build("aoe", 16, 6, 2, 24, 4, recompute_scores=recompute_scores, recompute_gate=recompute_gate, grouped_mm="loop")
    check_against_reference(layer, (3, 5))


def test_aoe_recomputes_the_scores_by_default_where_the_cache_is_the_larger_activation():
    """None: recompute iff E * d_low > k * d_wide; an explicit choice is kept; exact either way."""
    fine = AoE(16, 8, 16, 2, d_wide=12)  # 16 * 8 = 128 > 2 * 12 = 24
    coarse = AoE(16, 4, 4, 2, d_wide=24)  # 4 * 4 = 16 < 48
    assert fine.recompute_scores and not coarse.recompute_scores
    assert not AoE(16, 8, 16, 2, d_wide=12, recompute_scores=False).recompute_scores
    assert AoE(16, 4, 4, 2, d_wide=24, recompute_scores=True).recompute_scores
    check_against_reference(build("aoe", 16, 16, 2, 12, 8, grouped_mm="loop"), (3, 5))


def test_moe_recompute_gate_is_exact():
    check_against_reference(build("moe", 16, 6, 2, 24, 4, recompute_gate=True, grouped_mm="loop"), (11,))


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_zero_tokens(kind):
    layer = build(kind, 16, 4, 2, 24, 4, grouped_mm="loop")
    x = torch.randn(0, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 16)
    (out.sum() + layer.aux_loss).backward()
    assert x.grad.shape == (0, 16)
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    x = torch.randn(2, 0, 16, dtype=torch.float64)
    assert layer(x).shape == (2, 0, 16)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 3])
def test_grouped_kernel_matches_loop(kind, dtype, chunks):
    """The torch._grouped_mm backend (where torch has it) against the loop backend, same weights."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    fast = build(kind, 32, 8, 2, 48, 16, grouped_mm="torch", backward_chunks=chunks).to(dtype)
    loop = build(kind, 32, 8, 2, 48, 16, grouped_mm="loop").to(dtype)
    loop.load_state_dict(fast.state_dict())
    x = torch.randn(4, 25, 32, dtype=dtype)
    xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    of, ol = fast(xf), loop(xl)
    g = torch.randn_like(of)
    gf, gl = grads_of(fast, xf, of, g), grads_of(loop, xl, ol, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(of, ol) <= tol
    for name in gf:
        assert rel_err(gf[name], gl[name]) <= tol, name


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_fp32_fast_path_close_to_fp64_reference(kind):
    layer = build(kind, 32, 8, 2, 48, 16).float()
    x = torch.randn(40, 32, requires_grad=True)
    out = layer(x)
    ref, _ = reference_forward(layer, x)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_idle_experts_get_exactly_zero_gradient(kind):
    # renormalize=False: top-1's renormalized weight is p / p = 1, whose gradient to the scores is
    # zero up to rounding; unrenormalized, every expert's norm reaches the output through the softmax
    layer = build(kind, 16, 16, 1, 24, 4, grouped_mm="loop", renormalize=False)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    counts = layer.last_routing.tokens_per_expert
    idle = (counts == 0).nonzero().flatten()
    busy = (counts > 0).nonzero().flatten()
    assert len(idle) >= 13
    expert_weights = ["w_up", "w_in", "w_out"] if kind == "aoe" else ["w_gate", "w_in", "w_out"]
    for name in expert_weights:
        grad = getattr(layer, name).grad
        assert torch.count_nonzero(grad[idle]) == 0, name
        assert torch.count_nonzero(grad[busy]) > 0, name
    if kind == "aoe":  # every expert's norm enters the softmax, so every w_down learns
        assert torch.count_nonzero(layer.w_down.grad[idle].flatten(1).norm(dim=1)) == len(idle)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_forward_backward_is_deterministic(kind):
    layer = build(kind, 32, 8, 2, 48, 16).float()
    x = torch.randn(64, 32)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        g = grads_of(layer, xi, out, torch.ones_like(out))
        results.append((out, g))
    assert torch.equal(results[0][0], results[1][0])
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name]), name


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_chunked_backward_is_exact(kind, chunks):
    """The backward over blocks of rows (a block may split an expert's rows) equals the reference."""
    layer = build(kind, 16, 4, 2, 24, 4, backward_chunks=chunks, grouped_mm="loop")
    check_against_reference(layer, (2, 13))


# The paper's ablation baselines: MoE with AoE's factorized gate (a router still selects), and MoE
# with a large two-layer router.
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", [{"gate_rank": 3}, {"router_hidden": 10}, {"gate_rank": 5, "router_hidden": 7}])
def test_moe_ablation_options_match_reference(shape, option):
    lead, d, E, k, width, _ = shape
    layer = build("moe", d, E, k, width, 0, **option)
    assert ("w_gate" in dict(layer.named_parameters())) == ("gate_rank" not in option)
    check_against_reference(layer, lead)


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_factorized_gate_idle_experts_get_zero_gradient(backend):
    layer = MoE(16, 24, 16, 1, gate_rank=4, grouped_mm=backend)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).square().sum().backward()
    counts = layer.last_routing.tokens_per_expert
    idle, busy = (counts == 0).nonzero().flatten(), (counts > 0).nonzero().flatten()
    for name in ("w_down", "w_up", "w_in", "w_out"):
        grad = getattr(layer, name).grad
        assert torch.count_nonzero(grad[idle]) == 0, name
        assert torch.count_nonzero(grad[busy]) > 0, name
