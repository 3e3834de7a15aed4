"""Token masks in the sparse layers: a padded token goes to no expert and counts for nothing.

Every check compares the masked call on [B, T, D] with the layer called on the real tokens alone
(fp64), for the output at real positions, the auxiliary loss, the routing record and gradients.
"""

import pytest
import torch

from aoe import AoE, MoE
from aoe.nn.dense import DenseFFN

from .helpers import rel_err

TOL = 1e-12


def build(kind, **kw):
    if kind == "moe":
        return MoE(12, 16, 6, 2, grouped_mm="loop", **kw).double()
    return AoE(12, 4, 6, 2, d_wide=16, grouped_mm="loop", **kw).double()


MASKS = {
    "random": lambda B, T: torch.rand(B, T) < 0.6,
    "all_real": lambda B, T: torch.ones(B, T, dtype=torch.bool),
    "one_real": lambda B, T: torch.zeros(B * T, dtype=torch.bool).index_fill(0, torch.tensor([5]), True).view(B, T),
    "none_real": lambda B, T: torch.zeros(B, T, dtype=torch.bool),
    "left_padded": lambda B, T: torch.arange(T).expand(B, T) >= torch.tensor([[0], [3], [7]]),
}


def balancing(kind):
    return dict(aux_loss_coef=0.01, z_loss_coef=0.001) if kind == "moe" else dict(aux_loss_coef=0.01)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masked_call_equals_the_real_tokens_alone(kind, mask_name):
    layer = build(kind, **balancing(kind))
    B, T = 3, 8
    mask = MASKS[mask_name](B, T)
    x = torch.randn(B, T, 12, dtype=torch.float64, requires_grad=True)
    out, aux = layer.forward_with_aux(x, mask)
    info = layer.last_routing

    x_real = x.detach()[mask].clone().requires_grad_(True)
    ref, ref_aux = layer.forward_with_aux(x_real)
    ref_info = layer.last_routing

    assert out.shape == x.shape
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))  # padded rows exactly 0
    assert rel_err(out[mask], ref) <= TOL
    assert abs(float(aux.detach()) - float(ref_aux.detach())) <= TOL
    torch.testing.assert_close(info.expert_indices, ref_info.expert_indices, rtol=0, atol=0)
    torch.testing.assert_close(info.tokens_per_expert, ref_info.tokens_per_expert, rtol=0, atol=0)
    assert int(info.tokens_per_expert.sum()) == int(mask.sum()) * layer.top_k
    assert rel_err(info.probs, ref_info.probs) <= TOL and rel_err(info.gate_weights, ref_info.gate_weights) <= TOL
    if mask.any():
        assert abs(info.ent_load() - ref_info.ent_load()) <= TOL
        assert abs(info.ent_conf() - ref_info.ent_conf()) <= TOL

    grad_out = torch.randn_like(out)
    g_masked = torch.autograd.grad((out * grad_out).sum() + aux, [x, *layer.parameters()], allow_unused=True)
    g_real = torch.autograd.grad((ref * grad_out[mask]).sum() + ref_aux, [x_real, *layer.parameters()],
                                 allow_unused=True)
    gx = g_masked[0]
    assert torch.equal(gx[~mask], torch.zeros_like(gx[~mask]))  # a padded token gets no gradient
    assert rel_err(gx[mask], g_real[0]) <= TOL
    for (name, p), a, b in zip(layer.named_parameters(), g_masked[1:], g_real[1:]):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert rel_err(a, b) <= TOL, name


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_mask_keeps_bias_load_to_real_tokens(kind):
    layer = build(kind, bias_update_rate=0.01).train()
    mask = MASKS["random"](2, 9)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    layer(x, token_mask=mask)
    assert float(layer.load_since_update.sum()) == int(mask.sum()) * layer.top_k
    layer.load_since_update.zero_()
    layer(x[mask])
    ref_load = layer.load_since_update.clone()
    layer.load_since_update.zero_()
    layer(x, mask)
    assert torch.equal(layer.load_since_update, ref_load)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_all_real_mask_equals_no_mask(kind):
    layer = build(kind, aux_loss_coef=0.01)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    out, aux = layer.forward_with_aux(x, torch.ones(2, 5, dtype=torch.bool))
    ref, ref_aux = layer.forward_with_aux(x)
    assert torch.equal(out, ref) and torch.equal(aux, ref_aux)


@pytest.mark.parametrize("bad", [torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5, dtype=torch.long)])
def test_mask_of_the_wrong_shape_or_dtype_is_refused(bad):
    layer = build("moe")
    with pytest.raises(ValueError, match="token_mask must be a bool tensor of shape"):
        layer(torch.randn(2, 5, 12, dtype=torch.float64), bad)


def test_dense_accepts_and_ignores_the_mask():
    layer = DenseFFN(12, 16).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = MASKS["random"](2, 5)
    assert torch.equal(layer(x, mask), layer(x))
    out, aux = layer.forward_with_aux(x, mask)
    assert torch.equal(out, layer(x)) and float(aux) == 0
