"""The parallel plans: how one run's model is spread over its processes, one class per mode.

    single process     ``ParallelPlan``           (``plans.base``)
    DDP                ``DataParallelPlan``       (``plans.ddp``)
    FSDP2 / HSDP       ``FullyShardedPlan``       (``plans.fsdp``)
    EP (+ FSDP)        ``ExpertParallelPlan``     (``plans.expert``: around one of the two above)

``make_plan(model, cfg.train, dist, device)`` shards the model as ``train.expert_parallel`` and
``train.fsdp`` say, puts it on the device and returns its plan. A plan owns what differs between
the modes: the module the steps call (``wrap``), the gradient synchronization of the micro-batches
(``micro_batch``), the reduction and clipping of the gradients (``clip_gradients``), the state of a
checkpoint in the single-process format (``full_state``, ``load_full``) or in this run's shards
(``sharded_state``, ``load_sharded``), which ranks evaluate which batches (``evaluate``), and the
sum over the ranks of the experts' loads for the aux-loss-free bias (``update_selection_biases``). The
training loop (``aoe.train.trainer``) calls these and never asks which mode it runs in.
"""

from __future__ import annotations

import torch
from torch import nn

from aoe.config import TrainConfig
from aoe.train.distributed import DistInfo
from aoe.train.plans.base import ParallelPlan
from aoe.train.plans.ddp import DataParallelPlan
from aoe.train.plans.expert import ExpertParallelPlan
from aoe.train.plans.fsdp import FullyShardedPlan

__all__ = ["DataParallelPlan", "ExpertParallelPlan", "FullyShardedPlan", "ParallelPlan", "make_plan"]


def make_plan(model: nn.Module, t: TrainConfig, dist: DistInfo, device: torch.device) -> ParallelPlan:
    """Collective: shard ``model`` (full, on the CPU, before its optimizer exists) in place as
    ``t`` says, move it to ``device``, and return its plan."""
    experts = _shard_experts(model, t, dist)
    model.to(device)
    if t.fsdp:
        from aoe.parallel.fsdp import check_fsdp

        check_fsdp(dist.world_size, t.fsdp_shard_size)
        ignored = {p for _, _, p in experts.sharded()} if experts is not None else None
        inner: ParallelPlan = FullyShardedPlan(model, dist, device, t.fsdp_shard_size, ignored)
    elif experts is None and dist.enabled:
        return DataParallelPlan(model, dist, device)
    else:
        inner = ParallelPlan(model, dist)
    return inner if experts is None else ExpertParallelPlan(inner, experts)


def _shard_experts(model: nn.Module, t: TrainConfig, dist: DistInfo):
    """``train.expert_parallel > 1``: the model's experts sharded (``aoe.parallel.ExpertParallel``)."""
    if t.expert_parallel == 1:
        return None
    from aoe.parallel import ExpertParallel, check_expert_parallel

    check_expert_parallel(t.expert_parallel, dist.world_size, model.config.n_experts)
    return ExpertParallel(model, t.expert_parallel)
