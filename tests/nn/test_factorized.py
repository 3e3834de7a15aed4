"""The factorized gate: init schemes, the dense rank-r control, and which parameters are factors."""

import math

import pytest
import torch
import torch.nn.functional as F

from aoe import AoE, DenseFFN, MoE
from aoe.nn.factorized import gate_factor_parameters

from .helpers import grads_of, rel_err


def _layers(gate_init, seed=0):
    torch.manual_seed(seed)
    aoe = AoE(64, 16, 4, 2, d_wide=96, gate_init=gate_init)
    torch.manual_seed(seed)
    moe = MoE(64, 96, 4, 2, gate_rank=16, gate_init=gate_init)
    torch.manual_seed(seed)
    dense = DenseFFN(64, 96, gate_rank=16, gate_init=gate_init)
    return {"aoe": aoe, "moe": moe, "dense": dense}


def test_normal_init_draws_what_it_always_drew():
    """The authors' scheme (the default before "balanced") consumes the random stream exactly as
    before the option existed: every weight ~ N(0, std) in registration order, w_out at its own std."""
    torch.manual_seed(3)
    layer = AoE(32, 8, 4, 2, d_wide=40, gate_init="normal")
    torch.manual_seed(3)
    expected = [torch.empty(4, 32, 8).normal_(std=0.02), torch.empty(4, 8, 40).normal_(std=0.02),
                torch.empty(4, 32, 40).normal_(std=0.02), torch.empty(4, 40, 32).normal_(std=0.02)]
    for got, want in zip((layer.w_down, layer.w_up, layer.w_in, layer.w_out), expected):
        assert torch.equal(got, want)
    torch.manual_seed(3)
    moe = MoE(32, 40, 4, 2, gate_rank=8, gate_init="normal")
    torch.manual_seed(3)
    expected = {name: torch.empty_like(p).normal_(std=0.02) for name, p in moe.named_parameters()}
    expected["w_out"] = torch.empty_like(moe.w_out).normal_(std=0.02)  # drawn again at its own std
    for name, p in moe.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_balanced_is_the_default_of_every_layer_and_of_new_model_configs():
    from aoe.config import ModelConfig
    from aoe.nn.configs import AoEFFNConfig, DenseFFNConfig, MoEFFNConfig

    layers = (AoE(8, 2, 2, 1, d_wide=8), MoE(8, 8, 2, 1, gate_rank=2), DenseFFN(8, 8, gate_rank=2))
    assert [layer.gate_init for layer in layers] == ["balanced"] * 3
    assert ModelConfig().gate_init == "balanced"
    assert {c.gate_init for c in (AoEFFNConfig, DenseFFNConfig, MoEFFNConfig)} == {"balanced"}
    torch.manual_seed(0)
    default = AoE(8, 2, 2, 1, d_wide=8)
    torch.manual_seed(0)
    assert torch.equal(default.w_up, AoE(8, 2, 2, 1, d_wide=8, gate_init="balanced").w_up)


@pytest.mark.parametrize("kind", ["aoe", "moe", "dense"])
def test_balanced_differs_from_normal_only_in_w_up_scale(kind):
    normal, balanced = _layers("normal")[kind], _layers("balanced")[kind]
    for (name, a), (_, b) in zip(normal.named_parameters(), balanced.named_parameters()):
        if name == "w_up":
            torch.testing.assert_close(b, a * (1 / math.sqrt(16)) / 0.02, rtol=1e-6, atol=0)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["aoe", "moe", "dense"])
def test_balanced_gate_starts_at_an_unfactorized_gate_scale(kind):
    """std of x @ w_down @ w_up for unit-variance x: sqrt(D) * std (an N(0, std) gate's) when
    balanced, sqrt(D) * sqrt(L) * std**2 when normal."""
    torch.manual_seed(1)
    x = torch.randn(4096, 64)
    for gate_init, want in (("balanced", math.sqrt(64) * 0.02), ("normal", math.sqrt(64) * math.sqrt(16) * 0.02**2)):
        layer = _layers(gate_init)[kind]
        gate = (x @ layer.w_down) @ layer.w_up
        assert gate.std().item() == pytest.approx(want, rel=0.1), gate_init


def test_unknown_gate_init_is_refused():
    for build in (lambda: AoE(8, 2, 2, 1, d_wide=8, gate_init="xavier"),
                  lambda: MoE(8, 8, 2, 1, gate_rank=2, gate_init="xavier"),
                  lambda: DenseFFN(8, 8, gate_rank=2, gate_init="xavier")):
        with pytest.raises(ValueError, match="gate_init='xavier'"):
            build()


def test_dense_factorized_gate_against_reference():
    """DenseFFN(gate_rank=r) in fp64 against the formula, token by token, outputs and gradients."""
    layer = DenseFFN(12, 20, gate_rank=3).double()
    x = torch.randn(5, 7, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    rows = []
    for x_D in x.reshape(-1, 12):
        gate = sum(x_D[i] * layer.w_down[i] for i in range(12)) @ layer.w_up
        rows.append((F.silu(gate) * (x_D @ layer.w_in)) @ layer.w_out)
    ref = torch.stack(rows).reshape(out.shape)
    assert rel_err(out, ref) <= 1e-12
    grad_out = torch.randn_like(out)
    fast, slow = grads_of(layer, x, out, grad_out), grads_of(layer, x, ref, grad_out)
    assert set(fast) == {"x", "w_down", "w_up", "w_in", "w_out"}
    for name in fast:
        assert rel_err(fast[name], slow[name]) <= 1e-12, name


def test_dense_without_gate_rank_is_unchanged():
    layer = DenseFFN(8, 16)
    assert [n for n, _ in layer.named_parameters()] == ["w_gate", "w_in", "w_out"]
    assert layer.forward_flops() == 2 * 3 * 8 * 16


def test_gate_factor_parameters_are_exactly_the_factors():
    from torch import nn

    layers = _layers("normal")
    model = nn.ModuleList([*layers.values(), MoE(64, 32, 4, 2), DenseFFN(64, 32)])
    got = gate_factor_parameters(model)
    want = [p for k in ("aoe", "moe", "dense") for p in (layers[k].w_down, layers[k].w_up)]
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
