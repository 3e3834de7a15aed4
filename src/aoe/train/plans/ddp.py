"""Plain data parallelism: the model replicated on every rank, its gradients averaged by DDP."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from aoe.train.distributed import DistInfo
from aoe.train.plans.base import ParallelPlan


class DataParallelPlan(ParallelPlan):
    """``DataParallelPlan(model, dist, device)``: each rank steps on its share of the global batch
    inside ``DistributedDataParallel``, which all-reduces the gradients after the last micro-batch.
    Every rank holds the whole model, so checkpoints and clipping are the one-process ones."""

    def __init__(self, model: nn.Module, dist: DistInfo, device: torch.device):
        super().__init__(model, dist)
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def micro_batch(self, step_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Before the last micro-batch the gradients accumulate locally (``no_sync``)."""
        return contextlib.nullcontext() if last else step_model.no_sync()
