"""FSDP2 and HSDP (``train.fsdp=true``, ``aoe.parallel.fsdp``): every parameter, gradient and AdamW
moment sharded over the ranks (or over the shard groups of a 2-D mesh)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from aoe.io import checkpoint as ckpt
from aoe.train.distributed import DistInfo
from aoe.train.plans.base import ParallelPlan, compile_blocks


class FullyShardedPlan(ParallelPlan):
    """``FullyShardedPlan(model, dist, device, shard_size, ignored)`` (collective) shards ``model``
    in place (``aoe.parallel.fsdp.FullyShardedData``); ``ignored``: the expert slices, when expert
    parallelism has sharded them already (this plan is then its inner plan)."""

    sharded_checkpoints = True
    collective_forward = True  # each block's parameters are all-gathered for its forward

    def __init__(self, model: nn.Module, dist: DistInfo, device: torch.device, shard_size: int | None = None,
                 ignored: set[nn.Parameter] | None = None):
        from aoe.parallel.fsdp import FullyShardedData

        super().__init__(model, dist)
        self.fsdp = FullyShardedData(model, device, shard_size, ignored=ignored)

    def compile(self, step_model: nn.Module, device: torch.device) -> nn.Module:
        """Each transformer block compiled in place (``compile_blocks``): FSDP's all-gathers and
        reduce-scatters run eagerly at the blocks' edges, the block's math as one graph."""
        return compile_blocks(self._before_compiling(step_model, device))

    def micro_batch(self, step_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradients accumulate unsharded until the last micro-batch, reduce-scattered once."""
        self.fsdp.sync_gradients(last)
        return contextlib.nullcontext()

    def clip_gradients(self, max_norm: float) -> float:
        return self.fsdp.grad_norm(torch.nn.utils.clip_grad_norm_(self._params_with_grad(), max_norm))

    @contextlib.contextmanager
    def full_state(self, optimizer: torch.optim.Optimizer,
                   optimizer_state: dict | None = None) -> Iterator[tuple[nn.Module | None, dict | None]]:
        """A plain CPU copy of the gathered weights and the gathered moments on rank 0, (None, None) elsewhere."""
        with self.fsdp.full_state_for_saving(optimizer, self._plain_model, optimizer_state) as full:
            yield full if full is not None else (None, None)

    def load_full_weights(self, path: Path) -> None:
        """Every rank reads the full tensors and keeps its shards."""
        plain = self._plain_model()
        ckpt.load_model_state(plain, path)
        self.fsdp.load_full_model(plain.state_dict())

    def load_full_optimizer(self, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        self.fsdp.load_full_optimizer(optimizer, optimizer_state)

    def _plain_model(self) -> nn.Module:
        """An unsharded copy of this run's model for a full state dict (``aoe.parallel.fsdp.empty_model``)."""
        from aoe.model import Transformer
        from aoe.parallel.fsdp import empty_model

        config = self.model.config  # the class of a sharded model is FSDP's subclass: build the plain one
        return empty_model(lambda: Transformer(config))
