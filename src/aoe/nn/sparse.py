"""The forward pass both sparse layers share.

    x [..., D] -> x_TD -> scores_TE (fp32) -> softmax over E, top-k -> dispatch (sort by expert)
      -> SwiGLU experts on sorted rows (grouped matmuls) -> combine -> [..., D]

A subclass says how experts are scored (``expert_scores``) and what feeds each expert's gate
(``expert_outputs``); between them, ``route`` turns the scores into a ``Routing`` record (the
selection, the dispatch, the sorted gate weights): the one seam where how experts are chosen
lives. ``forward_with_aux(x)`` returns the output and the auxiliary loss (a scalar tensor in the
graph, already multiplied by its coefficients): the decoder LM sums these up its blocks. ``forward(x)`` returns the output only and keeps the loss in ``layer.aux_loss``, for a
layer dropped into another model (``total_aux_loss(model)`` sums them). Either way the decisions
are ``layer.last_routing`` (a detached ``RoutingInfo``); ``update_selection_biases(model)`` steps
the aux-loss-free balancing of every layer.

Shared experts (``n_shared_experts > 0``, ``aoe.nn.shared``): always-active SwiGLU experts that
every token uses, their output added to the routed experts' (``layer.shared``; off by default).

Shape legend: T tokens, D model dim, E experts, K chosen per token, S = T*K sorted slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aoe.nn.balance import RoutingInfo, load_balancing_loss, update_selection_bias
from aoe.nn.dispatch import Dispatch
from aoe.nn.grouped_mm import check_backend
from aoe.nn.selection import Selection, select_top_k
from aoe.nn.shared import SharedExperts


@dataclass
class Routing:
    """What one forward decided, as the experts consume it: the ``Selection`` (probabilities over
    all experts, chosen indices and gate weights per token), the ``Dispatch`` that sorts the
    (token, slot) pairs by expert, and the gate weight of each sorted slot [S]."""

    selection: Selection
    dispatch: Dispatch
    gate_weight_S: torch.Tensor


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def check_non_negative(name: str, value: float) -> float:
    if not value >= 0:
        raise ValueError(f"{name}={value!r} must be >= 0")
    return float(value)


def real_token_indices(token_mask: torch.Tensor, lead_shape: torch.Size) -> torch.Tensor:
    """The flat indices [N] of the real tokens (True entries) of a bool mask of shape ``lead_shape``."""
    if token_mask.dtype != torch.bool or token_mask.shape != lead_shape:
        raise ValueError(f"token_mask must be a bool tensor of shape {tuple(lead_shape)} (the input's shape "
                         f"without its last dim); got {token_mask.dtype} of shape {tuple(token_mask.shape)}")
    return token_mask.reshape(-1).nonzero().squeeze(1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: the autocast dtype when autocast is on, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SparseFFN(nn.Module):
    """Base class of ``MoE`` and ``AoE``: top-k expert selection over a dropless expert engine."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        renormalize: bool,
        aux_loss_coef: float,
        bias_update_rate: float,
        grouped_mm: str,
        backward_chunks: int | None = None,
    ):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.n_experts = check_positive("n_experts", n_experts)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, n_experts={n_experts}]")
        self.top_k = top_k
        self.renormalize = bool(renormalize)
        self.aux_loss_coef = check_non_negative("aux_loss_coef", aux_loss_coef)
        self.bias_update_rate = check_non_negative("bias_update_rate", bias_update_rate)
        self.grouped_mm = check_backend(grouped_mm)
        self.backward_chunks = None if backward_chunks is None else check_positive("backward_chunks", backward_chunks)
        # Aux-loss-free balancing: added to the scores for selection only (all zeros when off).
        self.register_buffer("selection_bias", torch.zeros(n_experts))
        self.register_buffer("load_since_update", torch.zeros(n_experts), persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_routing: RoutingInfo | None = None
        self.shared: SharedExperts | None = None

    def init_shared(self, n_shared_experts: int, d_shared: int | None, shared_gate: bool, expert_width: int,
                    init_std: float) -> None:
        """Give the layer ``n_shared_experts`` always-active experts of width ``d_shared`` (None =
        ``expert_width``), with the sigmoid gate when ``shared_gate`` (``self.shared``); none when 0.
        A subclass calls this once it knows its expert width."""
        if not isinstance(n_shared_experts, int) or isinstance(n_shared_experts, bool) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={n_shared_experts!r} must be an integer >= 0")
        if n_shared_experts == 0:
            if d_shared is not None or shared_gate:
                raise ValueError(f"d_shared={d_shared!r} / shared_gate={shared_gate!r} need n_shared_experts >= 1")
            return
        width = expert_width if d_shared is None else check_positive("d_shared", d_shared)
        self.shared = SharedExperts(self.d_model, width, n_shared_experts, gate=shared_gate, init_std=init_std)

    # -- what a subclass provides ------------------------------------------------------------
    def expert_scores(self, x_TD: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, object]:
        """Return the fp32 scores [T, E] and any state the experts reuse."""
        raise NotImplementedError

    def expert_outputs(self, x_TD: torch.Tensor, state: object, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
        """Return the weighted outputs [S, D] of the sorted rows."""
        raise NotImplementedError

    def extra_loss(self, scores_TE: torch.Tensor) -> torch.Tensor | None:
        return None

    # -- the shared forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., D] -> [..., D]``; this call's auxiliary loss is left in ``self.aux_loss``."""
        y, self.aux_loss = self.forward_with_aux(x, token_mask)
        return y

    def forward_with_aux(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., D] -> ([..., D], aux_loss)``: the output and this call's weighted auxiliary loss
        (a scalar in the graph; 0 when no balancing loss is on), returned rather than kept, for a
        model that sums its layers' losses itself. ``last_routing`` is updated either way.

        ``token_mask`` (bool, shape ``x.shape[:-1]``; True = a real token, False = padding): the
        padded tokens go to no expert (their output rows are exactly 0) and are left out of
        everything routing-related (``last_routing``, the balancing losses, the selection bias's
        load): the real tokens' outputs and the loss are those of the real tokens alone.
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input's last dim is {x.shape[-1]}, expected d_model={self.d_model}")
        dtype = compute_dtype(x)
        x_TD = x.reshape(-1, self.d_model).to(dtype)
        real_N = None if token_mask is None else real_token_indices(token_mask, x.shape[:-1])
        if real_N is not None:  # N real tokens of the T: only they are scored and routed
            x_TD = x_TD.index_select(0, real_N)
        scores_TE, state = self.expert_scores(x_TD, dtype)
        routing = self.route(scores_TE)
        out_TD = routing.dispatch.combine(self.expert_outputs(x_TD, state, routing, dtype))
        if self.shared is not None:  # every token, whichever experts it chose
            out_TD = out_TD + self.shared(x_TD)
        self._record(routing.selection, routing.dispatch)
        if real_N is not None:  # back to all T rows: the padded ones exactly 0 (a permutation: no sums)
            out_TD = out_TD.new_zeros(x.shape[:-1].numel(), self.d_model).index_copy(0, real_N, out_TD)
        return out_TD.view(*x.shape[:-1], self.d_model), self._aux_loss(scores_TE, routing.selection, routing.dispatch)

    def route(self, scores_TE: torch.Tensor) -> Routing:
        """Choose experts from the fp32 scores [T, E] (top-k; the selection bias when balancing
        without a loss) and sort the (token, slot) pairs by expert."""
        bias_E = self.selection_bias if self.bias_update_rate > 0 else None
        selection = select_top_k(scores_TE, self.top_k, renormalize=self.renormalize, selection_bias_E=bias_E)
        dispatch = Dispatch.build(selection.expert_indices_TK, self.n_experts)
        return Routing(selection, dispatch, dispatch.sort_slots(selection.gate_weights_TK))

    def _aux_loss(self, scores_TE: torch.Tensor, selection: Selection, dispatch: Dispatch) -> torch.Tensor:
        loss = scores_TE.new_zeros(())
        if self.aux_loss_coef > 0:
            loss = loss + self.aux_loss_coef * load_balancing_loss(selection.probs_TE, dispatch.tokens_per_expert_E)
        extra = self.extra_loss(scores_TE)
        if extra is not None:
            loss = loss + extra
        return loss

    @torch.no_grad()
    def _record(self, selection: Selection, dispatch: Dispatch) -> None:
        counts_E = dispatch.tokens_per_expert_E.detach()
        self.last_routing = RoutingInfo(
            expert_indices=selection.expert_indices_TK.detach(),
            gate_weights=selection.gate_weights_TK.detach(),
            probs=selection.probs_TE.detach(),
            tokens_per_expert=counts_E,
        )
        if self.training and self.bias_update_rate > 0:
            self.load_since_update += counts_E.to(self.load_since_update.dtype)

    #: Names of the parameters stacked per expert ([E, ...]) that only a token's k chosen experts
    #: use; every other parameter (a router, AoE's w_down of all experts) is used by every token.
    CHOSEN_EXPERT_PARAMS: tuple[str, ...] = ()

    def num_active_params(self) -> int:
        """Parameters one token uses: the shared ones in full (a router, the shared experts), the
        chosen experts' k / E share of ``CHOSEN_EXPERT_PARAMS``."""
        total = 0 if self.shared is None else self.shared.num_params()
        for name, p in self.named_parameters(recurse=False):
            total += p.numel() // self.n_experts * self.top_k if name in self.CHOSEN_EXPERT_PARAMS else p.numel()
        return total

    def shared_flops(self) -> int:
        """Forward matmul FLOPs per token of the shared experts (0 without)."""
        return 0 if self.shared is None else self.shared.forward_flops()

    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing: move the selection bias toward equal load (call after optimizer.step())."""
        if self.bias_update_rate > 0:
            update_selection_bias(self.selection_bias, self.load_since_update, self.bias_update_rate)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


def sparse_layers(model: nn.Module) -> list[SparseFFN]:
    return [m for m in model.modules() if isinstance(m, SparseFFN)]


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the last forward's ``aux_loss`` over every sparse layer of ``model`` (0 if none)."""
    losses = [m.aux_loss for m in sparse_layers(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float().to(losses[0].device) for loss in losses]).sum()


def update_selection_biases(model: nn.Module) -> None:
    """Step the aux-loss-free balancing of every sparse layer of ``model`` (after optimizer.step())."""
    for layer in sparse_layers(model):
        layer.update_selection_bias()
