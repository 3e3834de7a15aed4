"""Expert parallelism: the experts of every sparse layer sharded over the N ranks of an expert group.

    home rank (its own tokens)                          expert rank j (experts [j*M, (j+1)*M), M = E/N)
    scores over ALL E experts, route, sort by expert
    sorted rows [S, D (+L) + 1] -- counts, then rows -->  rows of its experts, source by source
      (x; AoE: the cached c_e; the gate weight)           regrouped by local expert (stable)
                                                          layer.run_experts on the local weight slice
    sorted outputs [S, D]  <---------- rows ------------  outputs put back in received order
    dispatch.combine (unchanged)

The layer is given an ``ExpertDispatcher`` (``layer.expert_dispatcher``, ``aoe.nn.sparse``): its
``expert_outputs`` moves the rows, and the experts' math is the layer's own ``run_experts``, the
one the layer runs on one process (what a row carries beside x is the layer's ``chosen_inputs``).

The sorted rows are already grouped by destination (experts are contiguous per rank), so the send
splits are sums of ``tokens_per_expert_E``. Received rows are ordered by source rank, then by
expert, then by sorted position: fixed by the ranks, so the result is deterministic; the rows
come back to exactly the places they left. Autograd flows through both all-to-alls.

Scoring stays with the tokens: MoE's router and AoE's ``w_down`` (every expert's norm enters the
softmax) are REPLICATED on every rank and their gradients averaged like any replicated parameter.
Only the chosen experts' remaining work travels; for AoE the chosen experts' cached low-rank
activations c_e (L numbers per row) travel with their rows, so no expert recomputes ``x @ w_down``.
The sharded parameters are the layer's ``CHOSEN_EXPERT_PARAMS`` (AoE: w_up, w_in, w_out; MoE:
w_gate (or its factors w_down, w_up), w_in, w_out); shared experts stay replicated.

The alternative for AoE, sharding w_down too, saves the replicated w_down (E*D*L per layer) but
adds, per token, an all-gather of its [E] norms (the softmax needs all of them) and, for the k
chosen experts, the c_e rows anyway; see ``scoring_bytes`` in benchmarks/bench_expert_parallel.py.

Shape legend: T tokens, D model dim, L AoE rank, S sorted rows sent, R rows received, E experts,
M = E / N experts per rank, N ranks of the expert group, C row width (D [+ L] + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aoe.config import ConfigError
from aoe.nn.aoe import AoE
from aoe.nn.moe import MoE
from aoe.nn.sparse import Routing, SparseFFN, sparse_layers
from aoe.parallel.all_to_all import all_to_all, exchange_counts
from aoe.parallel.groups import ExpertGroups


@dataclass(frozen=True)
class ExpertShard:
    """What a sharded layer knows of its place: experts [first, first + n_local) of n_experts."""

    group: object  # the expert group (all_to_all runs there)
    ep_size: int
    ep_rank: int
    n_local: int

    @property
    def first(self) -> int:
        return self.ep_rank * self.n_local


@dataclass(frozen=True)
class _Plan:
    """One layer call's split sizes (host ints) and received counts [N, M]."""

    send_splits: list[int]
    recv_splits: list[int]
    recv_counts_NM: torch.Tensor


def _plan(tokens_per_expert_E: torch.Tensor, shard: ExpertShard) -> _Plan:
    """Exchange the per-expert row counts, then read the split sizes (the one host sync)."""
    send_counts_NM = tokens_per_expert_E.to(torch.int64).view(shard.ep_size, shard.n_local)
    recv_counts_NM = exchange_counts(send_counts_NM, shard.group)
    send_recv = torch.stack([send_counts_NM.sum(1), recv_counts_NM.sum(1)]).cpu()
    return _Plan(send_recv[0].tolist(), send_recv[1].tolist(), recv_counts_NM)


def _local_order(recv_counts_NM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The received rows regrouped by local expert: (order_R, inverse_R, offsets_M int32)."""
    n, m = recv_counts_NM.shape
    device = recv_counts_NM.device
    local_R = torch.arange(m, device=device).repeat(n).repeat_interleave(recv_counts_NM.reshape(-1))
    order_R = torch.argsort(local_R, stable=True)
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=device)
    return order_R, inverse_R, recv_counts_NM.sum(0).cumsum(0).to(torch.int32)


class ExpertDispatcher:
    """``ExpertDispatcher(shard)``: runs a sharded layer's chosen experts on the ranks of ``shard``'s
    expert group that hold them (given to the layer by ``shard_layer``)."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    @torch.compiler.disable
    def expert_outputs(self, layer: SparseFFN, x_TD: torch.Tensor, chosen_SC, routing: Routing, dtype) -> torch.Tensor:
        """The weighted outputs [S, D] of the sorted rows, the experts' work done on the ranks that
        hold them (see the module docstring). Eager under torch.compile: how many rows travel is
        known only from the routing (the split sizes are read to the host), so a compiled layer
        runs its scores and selection as one graph, this exchange eagerly, and its combine as another."""
        plan = _plan(routing.dispatch.tokens_per_expert_E, self.shard)
        rows_RC = all_to_all(_rows_to_send(x_TD, chosen_SC, routing, dtype), plan.recv_splits, plan.send_splits,
                             self.shard.group)
        y_RD = _run_local_experts(layer, rows_RC, plan, dtype)
        return all_to_all(y_RD, plan.send_splits, plan.recv_splits, self.shard.group)


def _rows_to_send(x_TD: torch.Tensor, chosen_SC, routing: Routing, dtype) -> torch.Tensor:
    """[S, C]: each sorted row's token vector, what its expert needs beside it (the layer's
    ``chosen_inputs``: AoE's cached activation c_e), and its gate weight (in the compute dtype, as
    ``swiglu_experts`` casts it)."""
    dispatch = routing.dispatch
    cols = [dispatch.gather_tokens(x_TD), *([] if chosen_SC is None else [chosen_SC])]
    cols.append(routing.gate_weight_S.to(dtype).unsqueeze(1))
    return torch.cat([c.to(dtype) for c in cols], dim=1)


def _run_local_experts(layer: SparseFFN, rows_RC: torch.Tensor, plan: _Plan, dtype) -> torch.Tensor:
    """The received rows through this rank's experts (``layer.run_experts``); outputs [R, D] in
    received order."""
    order_R, inverse_R, offsets_M = _local_order(plan.recv_counts_NM)
    rows_RC = rows_RC.index_select(0, order_R)
    D = layer.d_model
    x_RD, gate_weight_R = rows_RC[:, :D].contiguous(), rows_RC[:, -1].contiguous()
    chosen_RC = rows_RC[:, D:-1].contiguous() if rows_RC.shape[1] > D + 1 else None
    y_RD = layer.run_experts(x_RD, chosen_RC, gate_weight_R, offsets_M, dtype)
    return y_RD.index_select(0, inverse_R)


def sharded_names(layer: SparseFFN) -> tuple[str, ...]:
    """The layer's per-expert parameters of the chosen experts: the ones sharded (dim 0 = expert)."""
    return tuple(n for n in layer.CHOSEN_EXPERT_PARAMS if isinstance(getattr(layer, n, None), nn.Parameter))


def shard_layer(layer: SparseFFN, shard: ExpertShard) -> None:
    """Keep experts [first, first + n_local) of ``layer`` and send its expert work to their owners."""
    if not isinstance(layer, (MoE, AoE)):
        raise TypeError(f"expert parallelism knows MoE and AoE layers, not {type(layer).__name__}")
    lo, hi = shard.first, shard.first + shard.n_local
    for name in sharded_names(layer):
        full = getattr(layer, name)
        setattr(layer, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
    layer.expert_dispatcher = ExpertDispatcher(shard)


def shard_experts(model: nn.Module, groups: ExpertGroups) -> list[SparseFFN]:
    """Shard every sparse layer of ``model`` over ``groups``' expert group (in place; before the
    optimizer is built, as the parameters are replaced). Returns the sharded layers."""
    layers = sparse_layers(model)
    if not layers:
        raise ConfigError(f"train.expert_parallel={groups.ep_size} needs sparse layers (model.ffn=moe or aoe)")
    for layer in layers:
        if layer.n_experts % groups.ep_size:
            raise ConfigError(f"train.expert_parallel={groups.ep_size} does not divide model.n_experts="
                              f"{layer.n_experts}: every rank must hold the same number of experts")
        shard_layer(layer, ExpertShard(groups.ep_group, groups.ep_size, groups.ep_rank,
                                       layer.n_experts // groups.ep_size))
    return layers
