"""Training with sharded experts: gradient averaging, global-norm clipping and full checkpoints.

No DDP under expert parallelism (its all-reduce would mix different experts). After the last
micro-batch's backward, ``reduce_gradients`` averages, over the W ranks' losses:

- a replicated parameter (attention, norms, embeddings, MoE's router, AoE's w_down, shared
  experts): all-reduce over the whole world, divided by W (what DDP does);
- an expert slice: its gradient already sums the contributions of every token of its expert
  group (the all-to-all's backward brought them); all-reduce over its replica group (the ranks
  holding the same experts), divided by W.

``clip_grad_norm_`` clips to the norm of the whole model's gradient: the replicated part (equal on
every rank) plus the expert slices' squares summed over the expert group.

With FSDP (``train.fsdp=true``, ``aoe.parallel.fsdp``) the replicated parameters are sharded over
the world instead (DTensors): FSDP reduce-scatters their gradients (the same average over W), so
``reduce_gradients`` leaves them alone, and their part of the norm is the DTensors' total norm.

Checkpoints are sharded by default (``aoe.io.sharded``, ``aoe.parallel.state``: each rank writes
its expert slices as part of the full tensors). The single-process format (``train.checkpoint_format
=full``, and every one-process checkpoint resumed here): ``full_experts_for_saving`` gathers every expert slice (and its AdamW moments) onto rank 0 for the
save, ``full_experts_for_loading`` gives the model full-size expert tensors to load into and keeps
this rank's slice after; ``slice_optimizer_state`` cuts a full optimizer state to this rank's
experts. Rank 0 holds one full copy of the expert tensors while it saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from aoe.nn.sparse import SparseFFN
from aoe.parallel.expert import shard_experts, sharded_names
from aoe.parallel.groups import ExpertGroups, expert_groups


class ExpertParallel:
    """The expert sharding of one model: ``ExpertParallel(model, ep_size)`` (collective: every rank
    of the initialized world calls it) shards every sparse layer in place."""

    def __init__(self, model: nn.Module, ep_size: int):
        self.groups: ExpertGroups = expert_groups(ep_size)
        self.layers: list[SparseFFN] = shard_experts(model, self.groups)

    # -- which parameters are sharded --------------------------------------------------------------
    def sharded(self) -> Iterator[tuple[SparseFFN, str, nn.Parameter]]:
        for layer in self.layers:
            for name in sharded_names(layer):
                yield layer, name, getattr(layer, name)

    def _sharded_ids(self) -> set[int]:
        return {id(p) for _, _, p in self.sharded()}

    # -- gradients ---------------------------------------------------------------------------------
    def reduce_gradients(self, model: nn.Module) -> None:
        """Average every gradient over the W ranks' losses (see the module docstring). A parameter
        without a gradient gets zeros, so every rank joins the same collectives."""
        sharded = self._sharded_ids()
        replicated_grads, expert_grads = [], []
        for p in model.parameters():
            if not p.requires_grad or _is_dtensor(p):  # FSDP's: reduced by its reduce-scatter
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (expert_grads if id(p) in sharded else replicated_grads).append(p.grad)
        world = self.groups.world_size
        _all_reduce_mean(replicated_grads, dist.group.WORLD, world)
        _all_reduce_mean(expert_grads, self.groups.dp_group, world)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Scale the gradients so the whole model's gradient norm is at most ``max_norm``; returns
        the norm before clipping (as ``torch.nn.utils.clip_grad_norm_`` does for one process)."""
        sharded = self._sharded_ids()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        squares = torch.zeros(2, dtype=torch.float32, device=grads[0].device)  # replicated, expert slices
        fsdp_grads = [g for g in grads if _is_dtensor(g)]
        if fsdp_grads:  # sharded by FSDP: the total norm of the DTensors (collective)
            squares[0] += torch.nn.utils.get_total_norm(fsdp_grads).full_tensor().float() ** 2
        for p in params:
            if p.grad is not None and not _is_dtensor(p.grad):
                squares[int(id(p) in sharded)] += torch.linalg.vector_norm(p.grad.float()) ** 2
        dist.all_reduce(squares[1:], group=self.groups.ep_group)
        total = squares.sum().sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return float(total)

    # -- checkpoints -------------------------------------------------------------------------------
    def _gather_full(self, local: torch.Tensor) -> torch.Tensor | None:
        """The full tensor [E, ...] on global rank 0 from its expert group's slices (None elsewhere)."""
        g = self.groups
        if g.dp_rank != 0:
            return None
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(g.ep_size)] if dist.get_rank() == 0 else None
        dist.gather(local, parts, dst=0, group=g.ep_group)
        return torch.cat(parts) if parts is not None else None

    def _optimizer_indices(self, optimizer: torch.optim.Optimizer) -> dict[int, int]:
        """Index in ``optimizer.state_dict()['state']`` of each sharded parameter (by id)."""
        order = [id(p) for group in optimizer.param_groups for p in group["params"]]
        sharded = self._sharded_ids()
        return {pid: i for i, pid in enumerate(order) if pid in sharded}

    def _expert_moments(self, state: dict, indices: dict[int, int], n_local: int):
        for i in sorted(indices.values()):
            for key, value in sorted(state.get(i, {}).items()):
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n_local:
                    yield i, key, value

    @contextlib.contextmanager
    def full_experts_for_saving(self, optimizer: torch.optim.Optimizer):
        """Collective: inside, rank 0's model holds the full expert tensors, and the value is the
        optimizer's full state dict on rank 0 (None on other ranks)."""
        state = optimizer.state_dict()
        full_state = {**state, "state": {i: dict(s) for i, s in state["state"].items()}}
        n_local = self.layers[0].expert_dispatcher.shard.n_local
        for i, key, value in list(self._expert_moments(state["state"], self._optimizer_indices(optimizer), n_local)):
            full_state["state"][i][key] = self._gather_full(value)
        swapped = [(p, p.data, self._gather_full(p.data)) for _, _, p in self.sharded()]
        if dist.get_rank() != 0:
            yield None
            return
        for p, _, full in swapped:
            p.data = full
        try:
            yield full_state
        finally:
            for p, local, _ in swapped:
                p.data = local

    @contextlib.contextmanager
    def full_experts_for_loading(self):
        """Inside, every sharded parameter has its full size (uninitialized) to load a checkpoint
        into; on leaving, each keeps this rank's slice of what was loaded."""
        for layer, _, p in self.sharded():
            p.data = p.data.new_empty((layer.n_experts, *p.shape[1:]))
        try:
            yield
        finally:
            for layer, _, p in self.sharded():
                lo = layer.expert_dispatcher.shard.first
                p.data = p.data[lo:lo + layer.expert_dispatcher.shard.n_local].clone()

    def slice_optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A full optimizer state dict (a checkpoint's) cut to this rank's experts."""
        indices = self._optimizer_indices(optimizer)
        sliced = {**state, "state": {i: dict(s) for i, s in state["state"].items()}}
        shard = self.layers[0].expert_dispatcher.shard
        n_experts = self.layers[0].n_experts
        for i, key, value in list(self._expert_moments(state["state"], indices, n_experts)):
            sliced["state"][i][key] = value[shard.first:shard.first + shard.n_local].clone()
        return sliced


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _all_reduce_mean(grads: list[torch.Tensor], group, divide: int) -> None:
    """Sum ``grads`` over ``group`` (one flat buffer per dtype; None: no other rank) and divide."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.div_(divide)
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))
