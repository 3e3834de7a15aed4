"""Expert parallelism (``train.expert_parallel=N > 1``, ``aoe.parallel``): each sparse layer's
experts sharded over N ranks, around an inner plan for the rest of the model.

The inner plan is the one-process ``ParallelPlan`` (every rank holds the other parameters whole;
no DDP, whose all-reduce would mix different experts: ``ExpertParallel.reduce_gradients`` averages)
or ``FullyShardedPlan`` (FSDP shards the other parameters over the world).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from aoe.train.plans.base import ParallelPlan, compile_blocks


class ExpertParallelPlan(ParallelPlan):
    """``ExpertParallelPlan(inner, expert_parallel)``: ``inner``'s model, its experts sharded by
    ``expert_parallel`` (``aoe.parallel.ExpertParallel``)."""

    sharded_checkpoints = True
    collective_forward = True  # the tokens travel to their experts' ranks and back

    def __init__(self, inner: ParallelPlan, expert_parallel):
        super().__init__(inner.model, inner.dist)
        self.inner = inner
        self.expert_parallel = expert_parallel

    def compile(self, step_model: nn.Module, device: torch.device) -> nn.Module:
        """Each transformer block compiled in place (``compile_blocks``), with or without FSDP; the
        dispatcher's exchange of rows between ranks runs eagerly inside the sparse layer (its
        sizes are data: ``aoe.parallel.expert.ExpertDispatcher``), the layer's math before and
        after it compiled."""
        return compile_blocks(self._before_compiling(step_model, device))

    def micro_batch(self, step_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return self.inner.micro_batch(step_model, last)

    def clip_gradients(self, max_norm: float) -> float:
        """Average the gradients here (no DDP), then clip to the norm over every shard."""
        self.expert_parallel.reduce_gradients(self.model)
        return self.expert_parallel.clip_grad_norm_(self._params_with_grad(), max_norm)

    @contextlib.contextmanager
    def full_state(self, optimizer: torch.optim.Optimizer,
                   optimizer_state: dict | None = None) -> Iterator[tuple[nn.Module | None, dict | None]]:
        """The experts gathered onto rank 0 (its model holds them inside), then the inner plan's
        full state of the rest."""
        with self.expert_parallel.full_experts_for_saving(optimizer) as with_experts:
            with self.inner.full_state(optimizer, with_experts) as full:
                yield full

    def load_full(self, path: Path, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        """Every rank reads the full experts and keeps its slice (of the moments too)."""
        with self.expert_parallel.full_experts_for_loading():
            self.inner.load_full_weights(path)
        self.inner.load_full_optimizer(optimizer, self.expert_parallel.slice_optimizer_state(optimizer_state, optimizer))
