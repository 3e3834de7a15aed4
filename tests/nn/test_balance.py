"""Balancing losses against hand-computed values; aux-loss-free bias balancing; statistics."""

import math

import pytest
import torch

from aoe import AoE, MoE, total_aux_loss, update_selection_biases
from aoe.nn import confidence_entropy, imbalance, load_entropy
from aoe.nn.reference import reference_forward

from .helpers import rel_err


def hand_balancing_loss(indices, probs, n_experts):
    """E * sum_i f_i P_i with explicit loops."""
    T, K = len(indices), len(indices[0])
    total = 0.0
    for i in range(n_experts):
        f_i = sum(1 for t in range(T) for j in range(K) if indices[t][j] == i) / (T * K)
        P_i = sum(probs[t][i] for t in range(T)) / T
        total += f_i * P_i
    return n_experts * total


def hand_z_loss(logits):
    return sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_load_balancing_loss_matches_hand_computation(kind):
    coef = 0.01
    if kind == "moe":
        layer = MoE(8, 12, 4, 2, aux_loss_coef=coef).double()
    else:
        layer = AoE(8, 3, 4, 2, d_wide=12, aux_loss_coef=coef).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    layer(x)
    r = layer.last_routing
    expected = coef * hand_balancing_loss(r.expert_indices.tolist(), r.probs.tolist(), 4)
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-12)


def test_z_loss_matches_hand_computation():
    layer = MoE(8, 12, 4, 2, z_loss_coef=0.001).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    layer(x)
    logits = (x @ layer.router).tolist()
    assert layer.aux_loss.item() == pytest.approx(0.001 * hand_z_loss(logits), rel=1e-12)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_aux_loss_gradient_matches_reference(kind):
    """The aux loss trains through P (the softmax that selects) exactly as autograd on the reference."""
    layer = (MoE(8, 12, 4, 2, aux_loss_coef=0.1, z_loss_coef=0.01) if kind == "moe"
             else AoE(8, 3, 4, 2, d_wide=12, aux_loss_coef=0.1)).double()
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    layer(x)
    fast = torch.autograd.grad(layer.aux_loss, [x, *layer.parameters()], allow_unused=True)
    _, routing = reference_forward(layer, x)
    counts = torch.bincount(routing["indices"].flatten(), minlength=4).double()
    ref = 0.1 * 4 * ((counts / counts.sum()) * routing["probs"].mean(0)).sum()
    if kind == "moe":
        ref = ref + 0.01 * torch.logsumexp(x @ layer.router, -1).square().mean()
    slow = torch.autograd.grad(ref, [x, *layer.parameters()], allow_unused=True)
    for f, s in zip(fast, slow):
        f = torch.zeros(1) if f is None else f
        s = torch.zeros(1) if s is None else s
        assert rel_err(f, s) <= 1e-10


def test_aux_loss_is_zero_and_graphless_when_off():
    layer = AoE(8, 3, 4, 2, d_wide=12)
    layer(torch.randn(5, 8))
    assert layer.aux_loss.item() == 0.0 and not layer.aux_loss.requires_grad


def test_total_aux_loss_sums_layers():
    model = torch.nn.Sequential(MoE(8, 12, 4, 2, aux_loss_coef=0.01), AoE(8, 3, 4, 2, d_wide=12, aux_loss_coef=0.02))
    model(torch.randn(6, 8))
    assert total_aux_loss(model).item() == pytest.approx(model[0].aux_loss.item() + model[1].aux_loss.item())


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_bias_balancing_moves_load_toward_balance(kind):
    torch.manual_seed(1)
    if kind == "moe":
        layer = MoE(16, 8, 8, 2, bias_update_rate=0.01)
        with torch.no_grad():
            layer.router[:, 0] += 0.1  # skew: expert 0 wins most tokens
        x = torch.randn(512, 16) + 1.0
    else:
        layer = AoE(16, 4, 8, 2, d_wide=8, bias_update_rate=0.005)
        with torch.no_grad():
            layer.w_down[0] *= 4.0  # skew: expert 0's activations are 4x larger
        x = torch.randn(512, 16)
    layer.train()
    layer(x)
    before = layer.last_routing.imbalance()
    for _ in range(300):
        with torch.no_grad():
            layer(x)
        update_selection_biases(layer)
    after = layer.last_routing.imbalance()
    assert before > 2.0
    assert after < 1.3 and after < before / 2
    # gate weights stay the unbiased softmax values of the chosen experts
    r = layer.last_routing
    assert torch.allclose(r.gate_weights, r.probs.gather(-1, r.expert_indices) / (
        r.probs.gather(-1, r.expert_indices).sum(-1, keepdim=True) if layer.renormalize else 1.0))


def test_bias_is_not_updated_in_eval_or_when_off():
    layer = MoE(8, 8, 4, 2, bias_update_rate=0.1).eval()
    layer(torch.randn(20, 8))
    layer.update_selection_bias()
    assert torch.count_nonzero(layer.selection_bias) == 0
    off = MoE(8, 8, 4, 2).train()
    off(torch.randn(20, 8))
    off.update_selection_bias()
    assert torch.count_nonzero(off.selection_bias) == 0


def test_statistics_definitions():
    counts = torch.tensor([2, 2, 2, 2])
    assert load_entropy(counts) == pytest.approx(math.log(4))
    assert imbalance(counts) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([8, 0, 0, 0])) == pytest.approx(0.0)
    assert imbalance(torch.tensor([8, 0, 0, 0])) == pytest.approx(4.0)
    uniform = torch.full((3, 5), 0.2)
    assert confidence_entropy(uniform) == pytest.approx(math.log(5))
    onehot = torch.eye(5)[:3]
    assert confidence_entropy(onehot) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_forward_with_aux_returns_what_forward_keeps(kind):
    from aoe import AoE, DenseFFN, MoE

    torch.manual_seed(0)
    layer = MoE(16, 24, 4, 2, aux_loss_coef=0.01, z_loss_coef=0.001) if kind == "moe" else AoE(16, 4, 4, 2, d_wide=24, aux_loss_coef=0.01)
    x = torch.randn(3, 5, 16)
    y, aux = layer.forward_with_aux(x)
    assert torch.equal(layer(x), y) and torch.equal(layer.aux_loss, aux) and aux.requires_grad and aux > 0
    dense = DenseFFN(16, 24)
    y, aux = dense.forward_with_aux(x)
    assert torch.equal(y, dense(x)) and float(aux) == 0.0
