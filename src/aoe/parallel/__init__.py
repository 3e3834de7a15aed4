"""Parallel training beyond data parallelism: expert parallelism over torch.distributed.

``ExpertParallel(model, ep_size)`` shards every sparse layer's experts over ``ep_size`` ranks
(``aoe.parallel.expert``), averages the gradients and clips their global norm without DDP, and
keeps checkpoints in the single-process format (``aoe.parallel.training``).
"""

from aoe.parallel.all_to_all import TRAFFIC, all_to_all
from aoe.parallel.expert import parallel_expert_outputs, shard_experts, shard_layer
from aoe.parallel.groups import ExpertGroups, check_expert_parallel, expert_groups
from aoe.parallel.training import ExpertParallel

__all__ = ["TRAFFIC", "ExpertGroups", "ExpertParallel", "all_to_all", "check_expert_parallel", "expert_groups",
           "parallel_expert_outputs", "shard_experts", "shard_layer"]
