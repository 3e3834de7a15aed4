"""The model and optimizer state of any layout, keyed by parameter name, for sharded checkpoints.

``training_state(model, optimizer, expert_parallel)`` is ``{"model": ..., "optim": ...}`` as
``torch.distributed.checkpoint`` (DCP) saves and loads it: every tensor carries its global shape
and this rank's place in it, so a checkpoint written in one layout loads into any other.

- one process, DDP: plain tensors (replicated: DCP writes each once);
- FSDP (``aoe.parallel.fsdp``): the parameters and AdamW moments are DTensors already (this
  rank's shard, ``Shard(0)`` over the FSDP mesh);
- expert parallelism: an expert slice ``[E/N, ...]`` is a plain tensor on each rank, under the
  same name on every rank; it is wrapped as a DTensor over the ``(replica, expert)`` mesh of
  ``aoe.parallel.groups`` (``Shard(0)`` over the expert group, replicated over the replicas), so
  DCP sees the full ``[E, ...]`` tensor. The wrapper shares the slice's storage.

Optimizer state is keyed by parameter name (``get_optimizer_state_dict``), not by position, so
it follows a parameter from one layout to another. Nothing here gathers a tensor: each rank
holds only its own shards.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL, OPTIM = "model", "optim"
_MESHES: dict[tuple[int, int], object] = {}  # (world, ep_size) -> the expert mesh (created once: collective)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, expert_parallel=None) -> dict:
    """``{"model": state, "optim": state}`` of this rank's shards (``optim`` left out without an
    optimizer); an optimizer that has not stepped gets zero moments first (lr 0, nothing moves)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {MODEL: get_model_state_dict(model)}
    if optimizer is not None:
        state[OPTIM] = get_optimizer_state_dict(model, optimizer)
    if expert_parallel is not None:
        _wrap_experts(state, _expert_names(model, expert_parallel), _expert_mesh(expert_parallel))
    return state


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
                        expert_parallel=None) -> None:
    """Put ``state`` (``training_state``'s layout, filled by ``dcp.load``) into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if expert_parallel is not None:
        _unwrap_experts(state, _expert_names(model, expert_parallel))
    set_model_state_dict(model, state[MODEL])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIM])


def _expert_names(model: nn.Module, expert_parallel) -> set[str]:
    ids = {id(p) for _, _, p in expert_parallel.sharded()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _expert_mesh(expert_parallel):
    """The ``(replica, expert)`` device mesh of the expert groups (1-D when there is one replica)."""
    from torch.distributed.device_mesh import init_device_mesh

    g = expert_parallel.groups
    key = (g.world_size, g.ep_size)
    if key not in _MESHES:
        device = expert_parallel.layers[0].w_in.device.type
        shape, names = ((g.ep_size,), ("expert",)) if g.dp_size == 1 else ((g.dp_size, g.ep_size),
                                                                           ("replica", "expert"))
        _MESHES[key] = init_device_mesh(device, shape, mesh_dim_names=names)
    return _MESHES[key]


def _wrap_experts(state: dict, names: set[str], mesh) -> None:
    """Each expert slice (a parameter's, and each of its moments) as a DTensor of the full shape."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [Shard(0)] if mesh.ndim == 1 else [Replicate(), Shard(0)]

    def wrap(t):
        return DTensor.from_local(t, mesh, placements, run_check=False)

    per_param = state.get(OPTIM, {}).get("state", {})
    for name in names:
        state[MODEL][name] = wrap(state[MODEL][name])
        if name in per_param:  # a new dict: the one given may be the optimizer's own state of the parameter
            per_param[name] = {key: wrap(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                               for key, v in per_param[name].items()}


def _unwrap_experts(state: dict, names: set[str]) -> None:
    """Back to this rank's plain slices: the DTensors ``_wrap_experts`` made (FSDP's stay)."""
    from torch.distributed.tensor import DTensor

    def local(value):
        return value.to_local() if isinstance(value, DTensor) else value

    per_param = state.get(OPTIM, {}).get("state", {})
    for name in names:
        state[MODEL][name] = local(state[MODEL][name])
        if name in per_param:
            per_param[name] = {key: local(v) for key, v in per_param[name].items()}
