"""The expert-router coupling (ERC) loss of a router MoE (Lv et al., arXiv 2512.23447).

It gives a router MoE AoE's coupling of selection and execution at a cost independent of the
number of tokens: each expert's router row, slightly perturbed, is treated as a proxy token, and
every expert's gate projection must respond to its own proxy more than to any other.

Legend: E experts, D d_model, F the gate projection's width (the expert width), R the rank of a
factorized gate. Router ``router_DE`` [D, E] (our layout; the paper's R [E, D] is its transpose,
row i = expert i's router vector R_i); expert j's gate matrix W_g^j [D, F] = ``w_gate_EDF[j]``
(the matrix inside SiLU; factorized: ``w_down_EDR[j] @ w_up_ERF[j]``).

1. ``eps_i = min_{j != i} ||R_i - R_j|| / (2 ||R_i||)`` and noise ``delta_i ~ U(1 - eps_i, 1 + eps_i)^D``,
   both without gradient, drawn anew at every call; proxies ``R~_i = delta_i * R_i`` (the gradient
   flows into R). Since ``||R~_i - R_i|| <= eps_i ||R_i||`` is at most half the distance to any
   other row, a proxy stays nearer its own router row than any other.
2. ``M[i, j] = ||R~_i W_g^j||_2`` [E, E]: proxy i through expert j's gate projection.
3. ``L = (1/E^2) sum_i sum_{j != i} [relu(M[i,j] - alpha M[i,i]) + relu(M[j,i] - alpha M[i,i])]``:
   0 when every M[i, i] exceeds its row and its column by the factor 1/alpha.

Computed in fp32 (or the inputs' wider dtype). Cost: ``erc_flops`` (2 E^2 D F forward for a full
gate), whatever the batch. ``erc_loss_reference`` is the per-pair fp64 definition the fast path is
tested against.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from aoe.nn.selection import at_least_fp32


class ERCTerms(NamedTuple):
    loss: torch.Tensor  # scalar, in the graph of the router and the gate matrices
    eps_E: torch.Tensor  # each expert's noise bound eps_i (no gradient)
    m_EE: torch.Tensor  # M[i, j] = ||R~_i W_g^j|| (in the graph)


def noise_bounds(router_DE: torch.Tensor) -> torch.Tensor:
    """eps [E]: half the distance from each router row to its nearest other row, relative to its
    norm (no gradient; 0 for a single expert, which has no other row)."""
    R_ED = at_least_fp32(router_DE.detach()).t()
    E = R_ED.shape[0]
    if E < 2:
        return R_ED.new_zeros(E)
    dist_EE = torch.cdist(R_ED, R_ED).fill_diagonal_(float("inf"))
    return dist_EE.min(dim=1).values / (2 * R_ED.norm(dim=1).clamp_min(torch.finfo(R_ED.dtype).tiny))


def draw_noise(router_DE: torch.Tensor, eps_E: torch.Tensor) -> torch.Tensor:
    """delta [D, E]: column i uniform in [1 - eps_i, 1 + eps_i], without gradient."""
    u_DE = torch.rand(router_DE.shape, device=router_DE.device, dtype=eps_E.dtype)
    return 1 + (2 * u_DE - 1) * eps_E


def _coupling_loss(m_EE: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 3 from M [E, E]."""
    E = m_EE.shape[0]
    own_E1 = alpha * m_EE.diagonal().unsqueeze(1)
    off_EE = ~torch.eye(E, dtype=torch.bool, device=m_EE.device)
    excess_EE = torch.relu(m_EE - own_E1) + torch.relu(m_EE.t() - own_E1)  # [i, j]: M[i,j] and M[j,i] vs M[i,i]
    return (excess_EE * off_EE).sum() / (E * E)


def _erc(router_DE: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], alpha: float,
         delta_DE: torch.Tensor | None) -> ERCTerms:
    """The loss for a gate given as ``project(R~ [E, D]) -> [E (proxy i), E (expert j), F]``."""
    if not alpha > 0 or alpha != alpha or alpha == float("inf"):
        raise ValueError(f"erc alpha={alpha!r} must be a positive finite number")
    eps_E = noise_bounds(router_DE)
    if delta_DE is None:
        delta_DE = draw_noise(router_DE, eps_E)
    elif delta_DE.shape != router_DE.shape:
        raise ValueError(f"delta_DE has shape {tuple(delta_DE.shape)}, expected the router's {tuple(router_DE.shape)}")
    proxies_ED = (delta_DE.detach().to(eps_E.dtype) * at_least_fp32(router_DE)).t()
    m_EE = torch.linalg.vector_norm(project(proxies_ED), dim=-1)
    return ERCTerms(_coupling_loss(m_EE, alpha), eps_E, m_EE)


def erc_terms(router_DE: torch.Tensor, w_gate_EDF: torch.Tensor, *, alpha: float = 1.0,
              delta_DE: torch.Tensor | None = None) -> ERCTerms:
    """The ERC loss with its eps and M, for a full gate ``w_gate_EDF`` [E, D, F]."""
    w_EDF = at_least_fp32(w_gate_EDF)
    return _erc(router_DE, lambda p_ED: torch.einsum("id,jdf->ijf", p_ED, w_EDF), alpha, delta_DE)


def erc_terms_factorized(router_DE: torch.Tensor, w_down_EDR: torch.Tensor, w_up_ERF: torch.Tensor, *,
                         alpha: float = 1.0, delta_DE: torch.Tensor | None = None) -> ERCTerms:
    """The ERC loss for a factorized gate W_g^j = w_down[j] @ w_up[j] (never formed: the proxies
    go through the rank-R factors, 2 E^2 (D R + R F) FLOPs)."""
    down_EDR, up_ERF = at_least_fp32(w_down_EDR), at_least_fp32(w_up_ERF)

    def project(p_ED):
        return torch.einsum("ijr,jrf->ijf", torch.einsum("id,jdr->ijr", p_ED, down_EDR), up_ERF)

    return _erc(router_DE, project, alpha, delta_DE)


def erc_loss(router_DE: torch.Tensor, w_gate_EDF: torch.Tensor, *, alpha: float = 1.0,
             delta_DE: torch.Tensor | None = None) -> torch.Tensor:
    """The ERC loss (a scalar) of router ``router_DE`` [D, E] and gate matrices ``w_gate_EDF``
    [E, D, F]; ``delta_DE`` [D, E]: the multiplicative noise (drawn when None). See the module doc."""
    return erc_terms(router_DE, w_gate_EDF, alpha=alpha, delta_DE=delta_DE).loss


def erc_flops(n_experts: int, d_model: int, d_ffn: int, gate_rank: int | None = None) -> int:
    """Forward matmul FLOPs of one ERC loss: 2 E^2 D F (factorized at rank R: 2 E^2 (D R + R F))."""
    E2 = n_experts * n_experts
    return 2 * E2 * (d_model * d_ffn if gate_rank is None else d_model * gate_rank + gate_rank * d_ffn)


def erc_loss_reference(router_DE: torch.Tensor, w_gate_EDF: torch.Tensor, delta_DE: torch.Tensor,
                       alpha: float = 1.0) -> torch.Tensor:
    """The definition, one pair at a time in fp64 (slow; for tests)."""
    R = router_DE.double().t()
    proxies = delta_DE.double().t() * R
    W = w_gate_EDF.double()
    E = R.shape[0]
    M = [[torch.linalg.vector_norm(proxies[i] @ W[j]) for j in range(E)] for i in range(E)]
    total = R.new_zeros(())
    for i in range(E):
        for j in range(E):
            if j != i:
                total = total + torch.relu(M[i][j] - alpha * M[i][i]) + torch.relu(M[j][i] - alpha * M[i][i])
    return total / (E * E)


def noise_bounds_reference(router_DE: torch.Tensor) -> torch.Tensor:
    """eps, one pair at a time in fp64 (slow; for tests)."""
    R = router_DE.double().t()
    E = R.shape[0]
    return torch.stack([min(torch.linalg.vector_norm(R[i] - R[j]) for j in range(E) if j != i)
                        / (2 * torch.linalg.vector_norm(R[i])) for i in range(E)])
