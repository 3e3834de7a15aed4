"""The forward pass both sparse layers share.

    x [..., D] -> x_TD -> scores_TE (fp32) -> softmax over E, a selection rule (top-k, top-p,
      expert choice) -> dispatch (sort by expert)
      -> SwiGLU experts on sorted rows (grouped matmuls) -> combine -> [..., D]

A subclass says how experts are scored (``expert_scores``) and what feeds each expert's gate
(``chosen_inputs``, ``gate_input``); the experts' math itself (``run_experts``) is shared. Between them, ``route`` turns the scores into a ``Routing`` record (the
selection, the dispatch, the sorted gate weights): the one seam where how experts are chosen
lives (the rule: ``selection``, see ``aoe.nn.selection``). ``forward_with_aux(x)`` returns the
output and the auxiliary loss (a scalar tensor in the graph, already multiplied by its
coefficients): the decoder LM sums these up its blocks. ``forward(x)`` returns the output only and
keeps the loss in ``layer.aux_loss``, for a layer dropped into another model
(``total_aux_loss(model)`` sums them). Either way the decisions are ``layer.last_routing`` (a
detached ``RoutingInfo``); ``update_selection_biases(model)`` steps the aux-loss-free balancing of
every layer.

Where the chosen experts run: here, unless the layer is given an ``expert_dispatcher`` (expert
parallelism, ``aoe.parallel.expert``: the rows travel to the ranks that hold their experts, which
call ``run_experts`` on them, and back).

Shared experts (``n_shared_experts > 0``, ``aoe.nn.shared``): always-active SwiGLU experts that
every token uses, their output added to the routed experts' (``layer.shared``; off by default).

Shape legend: T tokens, D model dim, E experts, K slots per token, S sorted rows (T*K for top-k),
N real tokens (with a token mask), B sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from aoe.nn.balance import RoutingInfo, confidence_entropy_loss, load_balancing_loss, update_selection_bias
from aoe.nn.dispatch import Dispatch
from aoe.nn.experts import swiglu_experts
from aoe.nn.checks import check_positive
from aoe.nn.options import SparseOptions
from aoe.nn.selection import Selection, select_expert_choice, select_top_k, select_top_p
from aoe.nn.shared import SharedExperts

@dataclass
class Routing:
    """What one forward decided, as the experts consume it: the ``Selection`` (probabilities over
    all experts, chosen indices and gate weights per token), the ``Dispatch`` that sorts the
    (token, slot) pairs by expert, and the gate weight of each sorted slot [S]."""

    selection: Selection
    dispatch: Dispatch
    gate_weight_S: torch.Tensor
    rule: str = "top_k"


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
    """Base class of ``MoE`` and ``AoE``: expert selection (top-k, top-p or expert choice) over a
    dropless expert engine.

    Args: ``d_model``, ``n_experts``, ``top_k`` and the options both layers share, declared once
    in ``aoe.nn.options.SparseOptions`` (the balancing losses, the selection rule and its knobs,
    the engine's backend, the shared experts), each kept as the attribute of its name (``top_p``
    and ``max_k`` resolved: top_k / n_experts and n_experts when None). An unknown keyword is a
    ``TypeError`` naming it, a bad value a ``ValueError`` (``aoe.nn.options.OptionError``).

    ``last_loss_terms``: the unweighted auxiliary terms of the last forward that are on, detached
    (e.g. ``{"entropy": ..., "erc": ...}``), for the per-layer training metrics.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, **options):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.n_experts = check_positive("n_experts", n_experts)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, n_experts={n_experts}]")
        self.top_k = top_k
        self.options = self._checked_options(options)
        for name, value in vars(self.options).items():
            setattr(self, name, value)
        self.top_p = float(self.top_p) if self.top_p is not None else top_k / n_experts
        self.max_k = n_experts if self.max_k is None else self.max_k
        for name in ("aux_loss_coef", "bias_update_rate", "entropy_loss_coef", "capacity_factor", "init_std"):
            setattr(self, name, float(getattr(self, name)))
        self.last_loss_terms: dict[str, torch.Tensor] = {}
        # Aux-loss-free balancing: added to the scores for selection only (all zeros when off).
        self.register_buffer("selection_bias", torch.zeros(n_experts))
        self.register_buffer("load_since_update", torch.zeros(n_experts), persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_routing: RoutingInfo | None = None
        self.shared: SharedExperts | None = None

    def _checked_options(self, options: dict) -> SparseOptions:
        """``options`` as checked ``SparseOptions`` (a TypeError names an unknown keyword)."""
        unknown = sorted(set(options) - {f for f in SparseOptions.__dataclass_fields__})
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}")
        return SparseOptions(**options).check(self.n_experts)

    def init_shared(self, expert_width: int) -> None:
        """Give the layer its ``n_shared_experts`` always-active experts of width ``d_shared`` (None =
        ``expert_width``), with the sigmoid gate when ``shared_gate`` (``self.shared``); none when 0.
        A subclass calls this once it knows its expert width."""
        if self.n_shared_experts > 0:
            width = expert_width if self.d_shared is None else self.d_shared
            self.shared = SharedExperts(self.d_model, width, self.n_shared_experts, gate=self.shared_gate,
                                        init_std=self.init_std)

    def selection_rule(self) -> str:
        """The rule this forward uses: ``selection``, except expert choice outside training with
        ``ec_inference="top_k"`` (a causal model must not route on later tokens when generating)."""
        if self.selection == "expert_choice" and not self.training and self.ec_inference == "top_k":
            return "top_k"
        return self.selection

    def experts_per_token_count(self) -> float:
        """The experts per token that ``num_active_params`` and ``forward_flops`` count: k for top-k;
        for top-p its bound ``min(max_k, ceil(top_p * E))`` (the k largest of E probabilities sum to
        at least k / E, so no token takes more); for expert choice the mean by construction,
        ``capacity_factor * k`` (per sequence of n tokens: C * E / n, up to C's rounding up)."""
        if self.selection == "top_p":
            return min(self.max_k, max(self.min_k, math.ceil(self.top_p * self.n_experts - 1e-9)))
        if self.selection == "expert_choice":
            return self.capacity_factor * self.top_k
        return self.top_k

    # -- what a subclass provides ------------------------------------------------------------
    def expert_scores(self, x_TD: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, object]:
        """Return the fp32 scores [T, E] and any state the experts reuse."""
        raise NotImplementedError

    def chosen_inputs(self, x_TD: torch.Tensor, state: object, dispatch: Dispatch,
                      dtype: torch.dtype) -> torch.Tensor | None:
        """[S, C]: what each sorted row's expert needs beside the row's token vector (AoE: the
        cached low-rank activation c_e); None when the token vector is all (MoE)."""
        return None

    def gate_input(self, x_SD: torch.Tensor, chosen_SC: torch.Tensor | None, offsets_E: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate input [S, G], gate weight [E, G, F]) of rows grouped by this layer's experts."""
        raise NotImplementedError

    # -- the experts -------------------------------------------------------------------------
    #: Who runs the chosen experts: None, this layer here; expert parallelism gives the layer a
    #: dispatcher (``aoe.parallel.expert.ExpertDispatcher``) whose ``expert_outputs(layer, x_TD,
    #: chosen_SC, routing, dtype)`` sends the rows to the experts' ranks, which ``run_experts``.
    expert_dispatcher = None

    def combined_outputs(self, x_TD: torch.Tensor, chosen_SC: torch.Tensor | None, routing: Routing,
                         dtype: torch.dtype) -> torch.Tensor:
        """[T, D]: each token's chosen experts' weighted outputs, summed. Here the engine sums the
        slots itself (its backward then reads each block's output gradient from the token
        gradient, so no [S, D] copy of it is made); a dispatcher returns the sorted rows [S, D],
        summed by ``Dispatch.combine``."""
        dispatch = routing.dispatch
        if self.expert_dispatcher is not None:
            return dispatch.combine(self.expert_dispatcher.expert_outputs(self, x_TD, chosen_SC, routing, dtype))
        x_SD = dispatch.gather_tokens(x_TD)
        return self.run_experts(x_SD, chosen_SC, routing.gate_weight_S,
                                dispatch.offsets_E, dtype, tokens=(x_TD, dispatch.token_S), combine=dispatch)

    def run_experts(self, x_SD: torch.Tensor, chosen_SC: torch.Tensor | None, gate_weight_S: torch.Tensor,
                    offsets_E: torch.Tensor, dtype: torch.dtype,
                    tokens: tuple[torch.Tensor, torch.Tensor] | None = None, combine=None) -> torch.Tensor:
        """The experts' math (``aoe.nn.experts.swiglu_experts``) on rows grouped by the experts this
        layer holds (``offsets_E``); ``tokens``: the token matrix the rows were gathered from;
        ``combine``: the ``Dispatch`` whose slots to sum (then [T, D], else the rows [S, D])."""
        gate_in_SG, w_gate = self.gate_input(x_SD, chosen_SC, offsets_E, dtype)
        return swiglu_experts(
            x_SD, gate_in_SG, w_gate, self.w_in.to(dtype), self.w_out.to(dtype), gate_weight_S, offsets_E,
            tokens=tokens, recompute_gate=self.recompute_gate, backward_chunks=self.backward_chunks,
            backend=self.grouped_mm, combine=combine,
        )

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
        seq_len = x.shape[-2] if x.dim() >= 2 else 1  # expert choice: sequences are the second-to-last dim
        routing = self.route(scores_TE, seq_len, None if token_mask is None else token_mask.reshape(-1, seq_len))
        chosen_SC = self.chosen_inputs(x_TD, state, routing.dispatch, dtype)
        del state  # AoE's [T, E, L] activations: kept by backward only if cached, not through the experts
        out_TD = self.combined_outputs(x_TD, chosen_SC, routing, dtype)
        if self.shared is not None:  # every token, whichever experts it chose
            out_TD = out_TD + self.shared(x_TD)
        self._record(routing.selection, routing.dispatch, routing.rule)
        if real_N is not None:  # back to all T rows: the padded ones exactly 0 (a permutation: no sums)
            out_TD = out_TD.new_zeros(x.shape[:-1].numel(), self.d_model).index_copy(0, real_N, out_TD)
        return out_TD.view(*x.shape[:-1], self.d_model), self._aux_loss(scores_TE, routing.selection, routing.dispatch)

    def route(self, scores_TE: torch.Tensor, seq_len: int | None = None,
              token_mask_BN: torch.Tensor | None = None) -> Routing:
        """Choose experts from the fp32 scores [T, E] by ``selection_rule()`` (the selection bias
        when balancing without a loss) and sort the (token, expert) pairs by expert. Expert choice
        reads the T tokens as sequences of ``seq_len`` (None: one sequence), or as the real tokens
        of the padded sequences of ``token_mask_BN``."""
        rule, bias_E = self.selection_rule(), (self.selection_bias if self.bias_update_rate > 0 else None)
        if rule == "top_k":
            selection = select_top_k(scores_TE, self.top_k, renormalize=self.renormalize, selection_bias_E=bias_E)
        elif rule == "top_p":
            selection = select_top_p(scores_TE, self.top_p, self.min_k, self.max_k, renormalize=self.renormalize,
                                     selection_bias_E=bias_E)
        else:
            seq_len = max(1, scores_TE.shape[0] if seq_len is None else seq_len)  # (max: an empty input)
            selection = select_expert_choice(scores_TE, self.capacity_factor, self.top_k, renormalize=self.renormalize,
                                             seq_len=seq_len, token_mask_BN=token_mask_BN)
        dispatch = Dispatch.build(selection.expert_indices_TK, self.n_experts, selection.valid_TK)
        return Routing(selection, dispatch, dispatch.sort_slots(selection.gate_weights_TK), rule)

    def _aux_loss(self, scores_TE: torch.Tensor, selection: Selection, dispatch: Dispatch) -> torch.Tensor:
        loss = scores_TE.new_zeros(())
        self.last_loss_terms = {}
        if self.aux_loss_coef > 0:
            loss = loss + self.aux_loss_coef * load_balancing_loss(selection.probs_TE, dispatch.tokens_per_expert_E)
        if self.entropy_loss_coef > 0:
            entropy = confidence_entropy_loss(selection.probs_TE)
            self.last_loss_terms["entropy"] = entropy.detach()
            loss = loss + self.entropy_loss_coef * entropy
        extra = self.extra_loss(scores_TE)
        if extra is not None:
            loss = loss + extra
        return loss

    @torch.no_grad()
    def _record(self, selection: Selection, dispatch: Dispatch, rule: str = "top_k") -> None:
        counts_E = dispatch.tokens_per_expert_E.detach()
        indices_TK, valid_TK = selection.expert_indices_TK.detach(), selection.valid_TK
        self.last_routing = RoutingInfo(
            expert_indices=indices_TK if valid_TK is None else indices_TK.masked_fill(~valid_TK, -1),
            gate_weights=selection.gate_weights_TK.detach(),
            probs=selection.probs_TE.detach(),
            tokens_per_expert=counts_E,
            rule=rule,
            experts_per_token=None if valid_TK is None else valid_TK.sum(dim=1),
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
        k = self.experts_per_token_count()  # top-p: its bound; expert choice: its mean (see there)
        for name, p in self.named_parameters(recurse=False):
            total += p.numel() // self.n_experts * k if name in self.CHOSEN_EXPERT_PARAMS else p.numel()
        return round(total)

    def step_flops(self) -> int:
        """Training matmul FLOPs per step that do not scale with the tokens (0 here; MoE's ERC loss)."""
        return 0

    def shared_flops(self) -> int:
        """Forward matmul FLOPs per token of the shared experts (0 without)."""
        return 0 if self.shared is None else self.shared.forward_flops()

    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing: move the selection bias toward equal load (call after optimizer.step())."""
        if self.bias_update_rate > 0:
            update_selection_bias(self.selection_bias, self.load_since_update, self.bias_update_rate)

    def extra_repr(self) -> str:
        rule = {"top_k": "", "top_p": f", selection='top_p', top_p={self.top_p:g}, min_k={self.min_k}, max_k={self.max_k}",
                "expert_choice": f", selection='expert_choice', capacity_factor={self.capacity_factor:g}, "
                                 f"ec_inference={self.ec_inference!r}"}[self.selection]
        return f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, renormalize={self.renormalize}{rule}"


def sparse_layers(model: nn.Module) -> list[SparseFFN]:
    return [m for m in model.modules() if isinstance(m, SparseFFN)]


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the last forward's ``aux_loss`` over every sparse layer of ``model`` (0 if none)."""
    losses = [m.aux_loss for m in sparse_layers(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float().to(losses[0].device) for loss in losses]).sum()


def update_selection_biases(model: nn.Module, sum_over_ranks: Callable[[torch.Tensor], Any] | None = None) -> None:
    """Step the aux-loss-free balancing of every sparse layer of ``model`` (after optimizer.step()).

    ``sum_over_ranks``: with several processes, a function that sums a tensor over them in place
    (``torch.distributed.all_reduce``); each expert's load is summed with one call for every layer,
    so every rank keeps the same biases. ``aoe.nn`` never communicates itself: under an initialized
    multi-process group a balancing model without it is refused (ValueError), as each rank would
    move its biases apart."""
    layers = [m for m in sparse_layers(model) if m.bias_update_rate > 0]
    if not layers:
        return
    if sum_over_ranks is not None:
        loads = torch.cat([m.load_since_update for m in layers])
        sum_over_ranks(loads)
        for m, load in zip(layers, loads.split([m.n_experts for m in layers])):
            m.load_since_update.copy_(load)
    elif torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        raise ValueError("update_selection_biases: this process is one of several; pass "
                         "sum_over_ranks=torch.distributed.all_reduce so that every rank keeps the same selection biases")
    for layer in layers:
        layer.update_selection_bias()
