"""The ERC loss (aoe.nn.erc) against its per-pair fp64 definition, and the two properties the
paper states."""

import pytest
import torch

from aoe.nn.erc import (erc_flops, erc_loss, erc_loss_reference, erc_terms, erc_terms_factorized, noise_bounds,
                        noise_bounds_reference)


def _inputs(E=5, D=12, F=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(D, E, generator=g, dtype=dtype).requires_grad_()
    w_gate = (torch.randn(E, D, F, generator=g, dtype=dtype) * 0.3).requires_grad_()
    return router, w_gate


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_equal_the_per_pair_definition(alpha, seed):
    router, w_gate = _inputs(seed=seed)
    eps = noise_bounds(router)
    torch.testing.assert_close(eps.double(), noise_bounds_reference(router.detach()), rtol=1e-5, atol=1e-7)
    delta = 1 + (2 * torch.rand(router.shape, generator=torch.Generator().manual_seed(seed + 9)) - 1) * eps
    loss = erc_loss(router, w_gate, alpha=alpha, delta_DE=delta)
    r64, w64 = router.detach().double().requires_grad_(), w_gate.detach().double().requires_grad_()
    ref = erc_loss_reference(r64, w64, delta, alpha)
    assert float(ref.detach()) > 0  # random weights: some pairs violate the coupling
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(router.grad.double(), r64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_gate.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_no_gradient_flows_through_the_noise_or_its_bound():
    router, w_gate = _inputs()
    delta = torch.full(router.shape, 1.05, requires_grad=True)
    erc_loss(router, w_gate, delta_DE=delta).backward()
    assert delta.grad is None and router.grad is not None and w_gate.grad is not None
    assert not noise_bounds(router).requires_grad


def test_factorized_gate_is_the_product_of_its_factors():
    E, D, R, F = 4, 10, 3, 6
    g = torch.Generator().manual_seed(3)
    router = torch.randn(D, E, generator=g, requires_grad=True)
    down = torch.randn(E, D, R, generator=g, requires_grad=True)
    up = torch.randn(E, R, F, generator=g, requires_grad=True)
    delta = 1 + 0.1 * (2 * torch.rand(D, E, generator=g) - 1) * noise_bounds(router)
    loss = erc_terms_factorized(router, down, up, delta_DE=delta).loss
    d64, u64 = down.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = erc_loss_reference(router.detach(), d64 @ u64, delta)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(down.grad.double(), d64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(up.grad.double(), u64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_proxy_stays_nearer_its_own_router_row_than_any_other(seed):
    router, _ = _inputs(E=8, D=6, seed=seed)
    router = router.detach()
    for draw in range(20):  # the noise is drawn anew at every call
        torch.manual_seed(100 * seed + draw)
        eps = noise_bounds(router)
        delta = 1 + (2 * torch.rand(router.shape) - 1) * eps
        proxies, rows = (delta * router).t(), router.t()
        dist = torch.cdist(proxies.double(), rows.double())  # [proxy i, row j]
        own = dist.diagonal()
        others = dist + torch.diag(torch.full((8,), float("inf"), dtype=torch.float64))
        assert bool((own <= others.min(dim=1).values).all()), draw


def test_loss_is_zero_when_each_own_response_dominates_by_one_over_alpha():
    E, D, F = 4, 6, 5
    router = torch.zeros(D, E)
    router[:E, :E] = torch.eye(E)  # orthonormal router rows e_i
    u = torch.randn(F)
    w_gate = torch.stack([torch.outer(router[:, j], u) * (1 + j) for j in range(E)])  # W^j maps e_j only
    delta = 1 + 0.2 * (2 * torch.rand(D, E) - 1) * noise_bounds(router)
    terms = erc_terms(router, w_gate, alpha=1.0, delta_DE=delta)
    assert float(terms.m_EE.diagonal().min()) > 0 and float(terms.loss) == 0.0
    # scale one expert's response to another's proxy past alpha * its own: the loss turns positive
    leaky = w_gate.clone()
    leaky[1] = leaky[1] + 10 * torch.outer(router[:, 0], u)
    assert float(erc_terms(router, leaky, alpha=1.0, delta_DE=delta).loss) > 0
    # alpha bounds the margin: with alpha = 0.5 the off-diagonal must stay below half of M[i, i]
    half = torch.stack([torch.outer(router[:, j] + 0.6 * router[:, (j + 1) % E], u) for j in range(E)])  # M off-diag 0.6
    assert float(erc_terms(router, half, alpha=1.0, delta_DE=torch.ones(D, E)).loss) == 0.0
    assert float(erc_terms(router, half, alpha=0.5, delta_DE=torch.ones(D, E)).loss) > 0


def test_bad_alpha_and_noise_shape_are_refused():
    router, w_gate = _inputs()
    with pytest.raises(ValueError, match="alpha"):
        erc_loss(router, w_gate, alpha=0.0)
    with pytest.raises(ValueError, match="delta_DE"):
        erc_loss(router, w_gate, delta_DE=torch.ones(3, 3))


def test_flops_count_the_proxies_through_every_gate():
    assert erc_flops(8, 768, 3072) == 2 * 64 * 768 * 3072
    assert erc_flops(8, 768, 3072, gate_rank=256) == 2 * 64 * (768 * 256 + 256 * 3072)
