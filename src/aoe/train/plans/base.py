"""The plan of one process: the model as it is, nothing to synchronize, checkpoints as they are.

Every other plan (``plans.ddp``, ``plans.fsdp``, ``plans.expert``) changes some of these methods;
what a method does not change is this one-process behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aoe.io import checkpoint as ckpt
from aoe.io import sharded
from aoe.nn.sparse import update_selection_biases
from aoe.parallel.state import training_state
from aoe.train.distributed import DistInfo, all_reduce_sum_of

#: ``evaluate``'s argument: ``run(ranks, lockstep)`` runs ``aoe.train.evaluate`` with its batches
#: shared out as the ``DistInfo`` says (its sums reduced over the whole world), every rank running
#: the same number of forwards when ``lockstep`` (``evaluate``'s), and returns the result.
Evaluation = Callable[[DistInfo, bool], dict[str, Any]]


def compile_blocks(step_model: nn.Module) -> nn.Module:
    """Each transformer block of ``step_model`` compiled in place (``nn.Module.compile``: the
    module keeps its parameters, hooks and class, as FSDP and expert parallelism need); the
    embedding, final norm and loss stay eager. Returns ``step_model``."""
    for block in step_model.layers:
        block.compile()
    return step_model


class ParallelPlan:
    """``ParallelPlan(model, dist)``: ``model`` trained by this process alone (also the inner
    plan of expert parallelism without FSDP, whose ranks run it as one process each)."""

    #: what ``train.checkpoint_format=auto`` writes: this run's shards (True) or the one-process format
    sharded_checkpoints = False
    #: the expert sharding (``aoe.parallel.ExpertParallel``) a sharded checkpoint names, if any
    expert_parallel = None
    #: every forward is a collective of the ranks (FSDP's all-gathers, EP's all-to-alls): they
    #: run their evaluation forwards in lockstep
    collective_forward = False

    def __init__(self, model: nn.Module, dist: DistInfo):
        self.model = model
        self.dist = dist

    # -- a step ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the steps call (DDP wraps the model; here it is the model)."""
        return model

    def compile(self, step_model: nn.Module, device: torch.device) -> nn.Module:
        """``train.compile=true``: the module the steps call, compiled. Here (one process, DDP) the
        whole wrapped model, its loss with it; the sharded plans compile block by block instead."""
        return torch.compile(self._before_compiling(step_model, device))

    def _before_compiling(self, step_model: nn.Module, device: torch.device) -> nn.Module:
        """The input checks (data-dependent branches) off and the grouped-matmul probe run eagerly."""
        from aoe.nn.grouped_mm import probe_before_compile

        self.model.check_inputs = False
        probe_before_compile(device)
        return step_model

    def micro_batch(self, step_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward; ``last``: the step's last one,
        after which the gradients are complete."""
        return contextlib.nullcontext()

    def clip_gradients(self, max_norm: float) -> float:
        """Reduce the gradients where the wrapping did not, scale them to a norm of at most
        ``max_norm`` (``inf``: none) and return the whole model's norm before."""
        return float(torch.nn.utils.clip_grad_norm_(self._params_with_grad(), max_norm))

    def _params_with_grad(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.grad is not None]

    def update_selection_biases(self) -> None:
        """Collective: the aux-loss-free balancing step of every sparse layer (after the optimizer's
        step), each expert's load summed over the world first (every mode's ranks route their own
        tokens), so every rank keeps the same biases."""
        update_selection_biases(self.model, sum_over_ranks=all_reduce_sum_of(self.dist))

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, run: Evaluation) -> dict[str, Any]:
        """The validation result, each batch run by one rank (the batches shared out over the
        world), the sums reduced once at the end; in lockstep when the forward is collective."""
        return run(self.dist, self.collective_forward)

    # -- checkpoints in the single-process format ---------------------------------------------------
    @contextlib.contextmanager
    def full_state(self, optimizer: torch.optim.Optimizer,
                   optimizer_state: dict | None = None) -> Iterator[tuple[nn.Module | None, dict | None]]:
        """Collective: (the model to save, its optimizer state dict; None: the optimizer's own) in
        the single-process format, complete on rank 0. ``optimizer_state``: the state to start
        from (expert parallelism's, its experts gathered)."""
        yield self.model, optimizer_state

    def load_full(self, path: Path, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        """A one-process checkpoint's weights (read from ``path``) and optimizer state, this rank's part kept."""
        self.load_full_weights(path)
        self.load_full_optimizer(optimizer, optimizer_state)

    def load_full_weights(self, path: Path) -> None:
        ckpt.load_model_state(self.model, path)

    def load_full_optimizer(self, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        optimizer.load_state_dict(optimizer_state)

    # -- sharded checkpoints (aoe.io.sharded) -------------------------------------------------------
    def sharded_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's shards of the model and optimizer, keyed by name (``aoe.parallel.state``)."""
        return training_state(self.model, optimizer, self.expert_parallel)

    def load_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Collective: this rank's shards of the sharded checkpoint ``path``, in this run's layout."""
        sharded.load_training(path, self.model, optimizer, self.expert_parallel)
