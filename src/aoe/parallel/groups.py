"""The process groups of expert parallelism x data parallelism.

World W = N x P ranks, N = ``expert_parallel``. Rank r is expert-parallel rank ``r % N`` of the
expert group ``r // N`` (consecutive ranks: on one node with several GPUs, the all-to-all stays
inside the node), and holds experts ``[(r % N) * E/N, (r % N + 1) * E/N)`` of every sparse layer.
The ranks holding the same experts, ``{r % N + j * N}``, form its replica group (P ranks): the
gradients of its expert slice are averaged there. Every rank sees its own tokens (the global batch
is shared over all W ranks, as in plain data parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from aoe.config import ConfigError


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's place in the N x P grid, and its two groups (``dist.group.WORLD`` when a group is
    the whole world; ``dp_group`` None when each shard has one replica: nothing to average)."""

    ep_size: int  # N: ranks an expert layer is sharded over
    ep_rank: int  # this rank's index in its expert group (which experts it holds)
    dp_size: int  # P: replicas of each expert shard
    dp_rank: int  # which expert group this rank belongs to
    ep_group: object
    dp_group: object
    ep_ranks: tuple[int, ...]  # global ranks of this rank's expert group
    dp_ranks: tuple[int, ...]  # global ranks of this rank's replica group

    @property
    def world_size(self) -> int:
        return self.ep_size * self.dp_size


def check_expert_parallel(ep_size: int, world_size: int, n_experts: int | None) -> None:
    """One-line ConfigErrors for a ``train.expert_parallel`` this run cannot use."""
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConfigError(f"train.expert_parallel={ep_size!r} must be a positive integer (1 = off)")
    if world_size % ep_size:
        raise ConfigError(f"train.expert_parallel={ep_size} does not divide the world size {world_size} "
                          f"(launch a multiple of {ep_size} processes with torchrun --nproc-per-node)")
    if n_experts is not None and n_experts % ep_size:
        raise ConfigError(f"train.expert_parallel={ep_size} does not divide model.n_experts={n_experts}: "
                          "every rank must hold the same number of experts")


def expert_groups(ep_size: int) -> ExpertGroups:
    """Create the expert and replica groups of the initialized world (every rank must call this,
    in the same order: ``new_group`` is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_expert_parallel(ep_size, world, None)
    dp_size = world // ep_size
    ep_group, dp_group = dist.group.WORLD, (dist.group.WORLD if ep_size == 1 else None)
    ep_ranks = tuple(range(rank - rank % ep_size, rank - rank % ep_size + ep_size))
    dp_ranks = tuple(range(rank % ep_size, world, ep_size))
    for start in range(0, world, ep_size):  # every rank creates every group, in one order
        ranks = list(range(start, start + ep_size))
        group = dist.new_group(ranks) if dp_size > 1 else dist.group.WORLD
        if rank in ranks:
            ep_group = group
    for first in range(ep_size):
        ranks = list(range(first, world, ep_size))
        if ep_size > 1 and dp_size > 1:
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
    return ExpertGroups(ep_size, rank % ep_size, dp_size, rank // ep_size, ep_group, dp_group, ep_ranks, dp_ranks)
