"""Parallel training beyond data parallelism: expert parallelism over torch.distributed.

``ExpertParallel(model, ep_size)`` shards every sparse layer's experts over ``ep_size`` ranks
and gives each layer an ``ExpertDispatcher`` that runs its chosen experts there
(``aoe.parallel.expert``), averages the gradients and clips their global norm without DDP, and
keeps checkpoints in the single-process format (``aoe.parallel.training``).
"""

from aoe.parallel.all_to_all import TRAFFIC, all_to_all
from aoe.parallel.expert import ExpertDispatcher, ExpertShard, shard_experts, shard_layer
from aoe.parallel.groups import ExpertGroups, check_expert_parallel, expert_groups
from aoe.parallel.training import ExpertParallel

__all__ = ["TRAFFIC", "ExpertDispatcher", "ExpertGroups", "ExpertParallel", "ExpertShard", "all_to_all",
           "check_expert_parallel", "expert_groups", "shard_experts", "shard_layer"]
