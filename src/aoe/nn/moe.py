"""The router Mixture-of-Experts baseline (Mixtral style).

Per token: ``logits = x @ router`` -> fp32 softmax over all E experts -> top-k -> gate weights,
renormalized over the chosen k by default. Expert e: ``(SiLU(x @ w_gate[e]) * (x @ w_in[e])) @ w_out[e]``.

Parameters (input dimension first): router [D, E], w_gate [E, D, F], w_in [E, D, F], w_out [E, F, D].

Two options give the paper's ablation baselines (both off by default):
- ``gate_rank=r`` ("MoE + factorized W_g"): AoE's factorization of the gate projection, but a router
  still selects: w_gate is replaced by ``w_down [E, D, r]`` and ``w_up [E, r, F]``, and
  ``gate = (x @ w_down[e]) @ w_up[e]`` is computed for the chosen experts only.
- ``router_hidden=H`` ("MoE + large router"): a two-layer router ``logits = SiLU(x @ router_in) @ router``
  with ``router_in [D, H]`` and ``router [H, E]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aoe.nn.balance import router_z_loss
from aoe.nn.erc import ERCTerms, erc_flops, erc_terms, erc_terms_factorized
from aoe.nn.grouped_mm import grouped_linear
from aoe.nn.factorized import w_up_std
from aoe.nn.options import with_sparse_options
from aoe.nn.selection import at_least_fp32
from aoe.nn.checks import check_non_negative, check_positive
from aoe.nn.sparse import SparseFFN


class MoE(SparseFFN):
    """Router MoE layer on the dropless expert engine.

    Args:
        d_model: model width D.
        d_ffn: expert width F.
        n_experts: E; top_k: experts per token.
        z_loss_coef: weight of the router z-loss (0 = off).
        recompute_gate: recompute ``x @ w_gate`` in backward instead of keeping it (saves an
            [S, F] activation at the cost of one expert matmul; off by default).
        gate_rank: factorize each expert's gate projection at this rank (None = a full w_gate).
        router_hidden: hidden width of a two-layer router (None = the linear router [D, E]).
        erc_loss_coef: weight of the ERC loss coupling router and experts (``aoe.nn.erc``; 0 = off,
            the paper: 1, with L_aux 0.01), computed in training only; needs the linear router.
        erc_alpha: the ERC loss's margin alpha (1 = the paper's default; 0.5 its best at 256 experts).
        **options: the options both sparse layers take (``aoe.nn.options.SparseOptions``: renormalize,
            default True as Mixtral; aux_loss_coef; bias_update_rate; entropy_loss_coef; grouped_mm;
            backward_chunks; init_std; gate_init, read with ``gate_rank``; the selection rule and
            its knobs; the shared experts, of width d_ffn unless d_shared is given).
    """

    CHOSEN_EXPERT_PARAMS = ("w_gate", "w_down", "w_up", "w_in", "w_out")

    @with_sparse_options
    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        n_experts: int,
        top_k: int,
        *,
        z_loss_coef: float = 0.0,
        recompute_gate: bool = False,
        gate_rank: int | None = None,
        router_hidden: int | None = None,
        erc_loss_coef: float = 0.0,
        erc_alpha: float = 1.0,
        **options,
    ):
        super().__init__(d_model, n_experts, top_k, **options)
        self.d_ffn = check_positive("d_ffn", d_ffn)
        self.z_loss_coef = check_non_negative("z_loss_coef", z_loss_coef)
        self.recompute_gate = bool(recompute_gate)
        self.gate_rank = None if gate_rank is None else check_positive("gate_rank", gate_rank)
        self.router_hidden = None if router_hidden is None else check_positive("router_hidden", router_hidden)
        self._init_erc(erc_loss_coef, erc_alpha)
        self._init_router(d_model, n_experts)
        self._init_experts(d_model, d_ffn, n_experts)
        self.init_shared(d_ffn)
        self.reset_parameters(self.init_std)

    def _init_erc(self, coef: float, alpha: float) -> None:
        self.erc_loss_coef = check_non_negative("erc_loss_coef", coef)
        if not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
            raise ValueError(f"erc_alpha={alpha!r} must be a positive finite number (the paper: 1)")
        self.erc_alpha = float(alpha)
        if self.erc_loss_coef > 0 and self.router_hidden is not None:
            raise ValueError(f"erc_loss_coef={coef}: the ERC loss feeds router rows through the experts' gates and "
                             "needs the linear router [d_model, E]; it does not apply with router_hidden")

    def _init_router(self, d_model: int, n_experts: int) -> None:
        """Registers the router, uninitialized: router [D, E], or with router_hidden=H router_in [D, H]
        then router [H, E]. Before the experts: ``reset_parameters`` draws in registration order."""
        if self.router_hidden is None:
            self.router = nn.Parameter(torch.empty(d_model, n_experts))
        else:
            self.router_in = nn.Parameter(torch.empty(d_model, self.router_hidden))
            self.router = nn.Parameter(torch.empty(self.router_hidden, n_experts))

    def _init_experts(self, d_model: int, d_ffn: int, n_experts: int) -> None:
        """Registers the experts, uninitialized, in this order: w_gate [E, D, F] (with gate_rank=r:
        w_down [E, D, r] then w_up [E, r, F]), w_in [E, D, F], w_out [E, F, D]."""
        if self.gate_rank is None:
            self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ffn))
        else:
            self.w_down = nn.Parameter(torch.empty(n_experts, d_model, self.gate_rank))
            self.w_up = nn.Parameter(torch.empty(n_experts, self.gate_rank, d_ffn))
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_ffn))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ffn, d_model))

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        for name, w in self.named_parameters(recurse=False):  # registration order: the random stream is fixed
            nn.init.normal_(w, std=w_up_std(self.gate_init, std, w.shape[-2]) if name == "w_up" else std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)

    def expert_scores(self, x_TD, dtype):
        if self.router_hidden is not None:
            return at_least_fp32(F.silu(x_TD @ self.router_in.to(dtype)) @ self.router.to(dtype)), None
        return at_least_fp32(x_TD @ self.router.to(dtype)), None

    def extra_loss(self, scores_TE):
        loss = self.z_loss_coef * router_z_loss(scores_TE) if self.z_loss_coef > 0 else None
        if self.erc_loss_coef > 0 and self.training:
            erc = self.erc_terms()
            self.last_loss_terms.update(erc=erc.loss.detach(), erc_eps=erc.eps_E.mean())
            loss = self.erc_loss_coef * erc.loss if loss is None else loss + self.erc_loss_coef * erc.loss
        return loss

    def erc_terms(self, delta_DE: torch.Tensor | None = None) -> ERCTerms:
        """The ERC loss of this layer's router and gate matrices (noise drawn when ``delta_DE`` is None)."""
        if self.gate_rank is None:
            return erc_terms(self.router, self.w_gate, alpha=self.erc_alpha, delta_DE=delta_DE)
        return erc_terms_factorized(self.router, self.w_down, self.w_up, alpha=self.erc_alpha, delta_DE=delta_DE)

    def step_flops(self) -> int:
        """The ERC loss's training FLOPs per forward and backward (3 x ``erc_flops``), whatever the
        tokens; 0 when off. Every forward in training computes it once (a micro-batch)."""
        if self.erc_loss_coef == 0:
            return 0
        return 3 * erc_flops(self.n_experts, self.d_model, self.d_ffn, self.gate_rank)

    def gate_input(self, x_SD, chosen_SC, offsets_E, dtype):
        """The gate reads x: through ``w_gate``, or the factorized gate's per-expert low-rank step."""
        if self.gate_rank is not None:  # factorized gate: the chosen experts' low-rank activations
            return grouped_linear(x_SD, self.w_down.to(dtype), offsets_E, self.grouped_mm), self.w_up.to(dtype)
        return x_SD, self.w_gate.to(dtype)

    def forward_flops(self) -> int:
        """Matmul FLOPs (2 x multiply-adds) per token of the forward pass: router 2*D*E (two-layer
        router: 2*(D*H + H*E)) + k * 2*3*D*F (factorized gate of rank r: k * 2*(D*r + r*F + 2*D*F)),
        plus the shared experts' (``aoe.nn.shared``). A dynamic rule counts k as
        ``experts_per_token_count()`` does (top-p: its bound; expert choice: its mean)."""
        D, E, F_ = self.d_model, self.n_experts, self.d_ffn
        H, r = self.router_hidden, self.gate_rank
        router = 2 * D * E if H is None else 2 * (D * H + H * E)
        expert = 2 * 3 * D * F_ if r is None else 2 * (D * r + r * F_ + 2 * D * F_)
        return router + round(self.experts_per_token_count() * expert) + self.shared_flops()

    def extra_repr(self) -> str:
        extra = "" if self.gate_rank is None else f", gate_rank={self.gate_rank}"
        extra += "" if self.router_hidden is None else f", router_hidden={self.router_hidden}"
        extra += "" if self.gate_rank is None or self.gate_init == "balanced" else f", gate_init={self.gate_init!r}"
        extra += "" if self.erc_loss_coef == 0 else f", erc_loss_coef={self.erc_loss_coef:g}, erc_alpha={self.erc_alpha:g}"
        return f"{super().extra_repr()}, d_ffn={self.d_ffn}{extra}"
