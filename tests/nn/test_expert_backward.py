"""The expert engine's backward: the gate weight's gradient as <dL/dh, h>, x re-gathered from the
token matrix, neither the gathered x [S, D] nor the unweighted output [S, D] kept (fp64 <= 1e-10)."""

import pytest
import torch
import torch.nn.functional as F

from aoe import AoE, MoE
from aoe.nn.experts import swiglu_experts
from aoe.nn.reference import reference_forward

from .helpers import grads_of, rel_err

TOL = 1e-10


def owner_of_rows(offsets_E):
    counts = torch.diff(offsets_E.long(), prepend=torch.zeros(1, dtype=torch.long))
    return torch.repeat_interleave(torch.arange(offsets_E.numel()), counts)


def per_row_experts(x_SD, gate_in_SG, w_gate, w_in, w_out, weight_S, offsets_E):
    """The engine's math one row at a time, with plain autograd ops."""
    rows = []
    for s, e in enumerate(owner_of_rows(offsets_E).tolist()):
        h = F.silu(gate_in_SG[s] @ w_gate[e]) * (x_SD[s] @ w_in[e])
        rows.append(weight_S[s] * (h @ w_out[e]))
    return torch.stack(rows)


def random_problem(n_tokens=9, k=2, D=6, G=3, F_=5, E=4, gate_reads_x=False):
    token_S = torch.randint(0, n_tokens, (n_tokens * k,))
    counts = torch.tensor([5, 0, 7, n_tokens * k - 12])  # an idle expert
    offsets_E = counts.cumsum(0).to(torch.int32)
    x_TD = torch.randn(n_tokens, D, dtype=torch.float64, requires_grad=True)
    G = D if gate_reads_x else G
    gate_in_SG = None if gate_reads_x else torch.randn(n_tokens * k, G, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((E, G, F_), (E, D, F_), (E, F_, D))]
    weight_S = torch.rand(n_tokens * k, dtype=torch.float64, requires_grad=True)
    return x_TD, token_S, gate_in_SG, ws, weight_S, offsets_E


@pytest.mark.parametrize("gate_reads_x", [False, True], ids=["aoe-like", "moe-like"])
@pytest.mark.parametrize("regather", [False, True])
@pytest.mark.parametrize("recompute_gate", [False, True])
@pytest.mark.parametrize("chunks", [1, 3])
def test_engine_matches_per_row_math(gate_reads_x, regather, recompute_gate, chunks):
    torch.manual_seed(1)
    x_TD, token_S, gate_in_SG, (w_gate, w_in, w_out), weight_S, offsets_E = random_problem(gate_reads_x=gate_reads_x)
    x_SD = x_TD.index_select(0, token_S)
    gate_in = x_SD if gate_reads_x else gate_in_SG
    out = swiglu_experts(x_SD, gate_in, w_gate, w_in, w_out, weight_S, offsets_E, recompute_gate=recompute_gate,
                         backward_chunks=chunks, backend="loop", tokens=(x_TD, token_S) if regather else None)
    ref = per_row_experts(x_SD, gate_in, w_gate, w_in, w_out, weight_S, offsets_E)
    assert rel_err(out, ref) <= TOL
    inputs = [t for t in (x_TD, gate_in_SG, w_gate, w_in, w_out, weight_S) if t is not None]
    g = torch.randn_like(out)
    fast = torch.autograd.grad(out, inputs, g, retain_graph=True)  # (x_SD's gather is shared)
    slow = torch.autograd.grad(ref, inputs, g)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert rel_err(a, b) <= TOL, i
    assert torch.count_nonzero(fast[-3][1]) == 0  # w_in's gradient of the idle expert


def test_gate_weight_gradient_alone_and_zero_weights():
    """Only the gate weights need a gradient (frozen experts), some weights exactly 0: the
    row-wise dot still gives <grad_y, unweighted output> for every row."""
    torch.manual_seed(2)
    x_TD, token_S, gate_in_SG, ws, weight_S, offsets_E = random_problem()
    ws = [w.detach() for w in ws]
    x_TD, gate_in_SG = x_TD.detach(), gate_in_SG.detach()
    weight_S = weight_S.detach().clone()
    weight_S[::3] = 0
    weight_S.requires_grad_()
    x_SD = x_TD.index_select(0, token_S)
    out = swiglu_experts(x_SD, gate_in_SG, *ws, weight_S, offsets_E, backend="loop", tokens=(x_TD, token_S))
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, [weight_S], g)
    unweighted = per_row_experts(x_SD, gate_in_SG, *ws, torch.ones_like(weight_S), offsets_E)
    assert rel_err(grad, (g * unweighted).sum(-1)) <= TOL


def build(kind, rule, recompute, **kw):
    opts = dict(selection=rule, grouped_mm="loop", recompute_gate=recompute, **kw)
    layer = MoE(12, 10, 5, 2, **opts) if kind == "moe" else AoE(12, 3, 5, 2, d_wide=10, **opts)
    return layer.double()


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("rule", ["top_k", "top_p", "expert_choice"])
@pytest.mark.parametrize("recompute", [False, True])
def test_layers_keep_no_row_copy_of_width_d_and_match_the_reference(kind, rule, recompute):
    """Every saved activation of the layer's forward is checked: none is [S, D] (S = the rows of
    the experts); outputs and gradients equal the per-token reference."""
    torch.manual_seed(3)
    layer = build(kind, rule, recompute)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    n_rows = int(layer.last_routing.experts_per_token_counts().sum())
    assert n_rows != 14 and (n_rows, 12) not in shapes, shapes
    ref, _ = reference_forward(layer, x)
    assert rel_err(out, ref) <= TOL
    g = torch.randn_like(out)
    fast, slow = grads_of(layer, x, out, g), grads_of(layer, x, ref, g)
    for name in fast:
        assert rel_err(fast[name], slow[name]) <= TOL, name


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("rule", ["top_k", "top_p"])
def test_padding_mask_with_regathered_rows(kind, rule):
    """With a token mask the engine re-gathers from the real tokens only; the padded outputs are 0
    and the real ones equal the reference on the real tokens alone, gradients included."""
    torch.manual_seed(4)
    layer = build(kind, rule, True)
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = layer(x, token_mask=mask)
    assert torch.count_nonzero(out[~mask]) == 0
    x_real = x[mask]
    ref, _ = reference_forward(layer, x_real)
    assert rel_err(out[mask], ref) <= TOL
    g = torch.randn_like(ref)
    fast, slow = grads_of(layer, x, out[mask], g), grads_of(layer, x, ref, g)
    for name in fast:
        assert rel_err(fast[name], slow[name]) <= TOL, name
