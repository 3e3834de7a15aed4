"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``): ``train.fsdp=true``.

Every rank holds 1/S of each parameter, gradient and AdamW moment: S = ``train.fsdp_shard_size``
(default: the world size W, one shard group, a 1-D device mesh). With S < W the device mesh is
2-D, (W/S replicas) x (S shards): hybrid sharding, FSDP inside each group of S consecutive ranks
(one node, say) and data parallelism across the groups (HSDP). With expert parallelism, FSDP
shards every parameter but the expert slices (over the world, or over groups of S ranks with
``fsdp_shard_size``: the two meshes are independent); EP has sharded the expert slices over its
expert group already, and averages their gradients over its replica group. Each ``Block`` is a unit
of its own (its parameters are all-gathered just before its forward and backward and freed
after), and the root (embeddings, final norm, output head) is the last unit. Gradients are reduce-scattered and averaged over the W ranks, so
with each rank's share of the global batch a step equals the single-process step (as DDP does).

Checkpoints are sharded by default (``aoe.io.sharded``: each rank writes its own shards, no
gather). With ``train.checkpoint_format=full`` they are the single-process format:
``full_state_for_saving`` gathers every parameter and moment, one tensor at
a time, onto rank 0, which writes them from a plain CPU copy of the model (rank 0 holds one full
copy of the weights and both moments, 3x the fp32 model, in CPU memory while it saves);
``load_full_model`` and ``load_full_optimizer`` hand every rank its shard of a checkpoint's tensors (each rank reads the
file); that is also how a one-process checkpoint resumes under FSDP.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from aoe.config import ConfigError


def check_fsdp(world_size: int, shard_size: int | None = None) -> None:
    """One-line ConfigErrors for a ``train.fsdp=true`` this run cannot use. Any expert parallelism
    goes with any shard size: the two shard different parameters."""
    if shard_size is not None and (shard_size > world_size or world_size % shard_size):
        raise ConfigError(f"train.fsdp_shard_size={shard_size} does not divide the world size {world_size} "
                          "(launch a multiple of it with torchrun --nproc-per-node, or leave it unset: all ranks)")
    if world_size < 2:
        raise ConfigError("train.fsdp=true needs several processes: launch with torchrun --nproc-per-node N (N >= 2), "
                          "or set train.fsdp=false")


class FullyShardedData:
    """``FullyShardedData(model, device, shard_size, ignored)`` (collective: every rank calls it)
    shards ``model`` in place: each block, then the root. ``ignored``: parameters FSDP leaves alone
    (expert slices, which expert parallelism has sharded already and reduces itself)."""

    def __init__(self, model: nn.Module, device: torch.device, shard_size: int | None = None,
                 ignored: set[nn.Parameter] | None = None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world = dist.get_world_size()
        shard = world if shard_size is None else shard_size
        if shard == world:
            self.mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
        else:  # HSDP: replicate over dim 0, shard over dim 1 (consecutive ranks share a shard group)
            self.mesh = init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, ignored_params=ignored or None)
        fully_shard(model, mesh=self.mesh, ignored_params=ignored or None)
        self.model = model

    # -- a step --------------------------------------------------------------------------------------
    def sync_gradients(self, sync: bool) -> None:
        """False for the micro-batches before the last: gradients accumulate unsharded, reduced once."""
        self.model.set_requires_gradient_sync(sync)

    @staticmethod
    def grad_norm(total) -> float:
        """``clip_grad_norm_``'s total (a DTensor under FSDP) as a float."""
        return float(_full(total))

    # -- checkpoints ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_state_for_saving(self, optimizer: torch.optim.Optimizer, make_model, optimizer_state: dict | None = None):
        """Collective: the value is (a plain CPU model holding the full weights, the optimizer's full
        state dict in the single-process layout) on rank 0, None on the other ranks; the copy is
        dropped after. ``make_model()`` builds the plain model (``empty_model``: no init). Every
        rank holds one full tensor at a time. ``optimizer_state``: the state dict to gather from
        (default ``optimizer.state_dict()``; expert parallelism passes its own, experts full)."""
        main = dist.get_rank() == 0
        shadow = make_model() if main else None
        target = shadow.state_dict() if main else None
        done: set[int] = set()
        for name, value in self.model.state_dict().items():
            if id(value) in done:  # a tied weight: gathered once
                continue
            done.add(id(value))
            full = _full(value).detach().cpu()
            if main:
                target[name].copy_(full)
        state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        full_state = {**state, "state": {}}
        for i in sorted(state["state"]):
            full_state["state"][i] = {k: (_full(v).detach().cpu() if isinstance(v, torch.Tensor) else v)
                                      for k, v in sorted(state["state"][i].items())}
        yield (shadow, full_state) if main else None

    def load_full_model(self, state: dict[str, torch.Tensor]) -> None:
        """Give the model this rank's shards of a full state dict (a checkpoint's; every rank passes
        the same). Parameters FSDP ignores are copied as they are."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def load_full_optimizer(self, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        """Give ``optimizer`` this rank's shards of a full optimizer state dict (single-process layout)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {**optimizer_state, "state": {}}
        for i, entry in optimizer_state["state"].items():
            p = params[int(i)]
            sharded["state"][i] = {k: (_shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape and
                                       v.dim() > 0 else v) for k, v in entry.items()}
        optimizer.load_state_dict(sharded)


def empty_model(make) -> nn.Module:
    """``make()`` built on the meta device, then given uninitialized CPU storage: a model to copy or
    load a full state into, without the cost of a random init. For its state dict only: caches that
    are not buffers stay on the meta device, so it cannot run a forward."""
    with torch.device("meta"):
        model = make()
    shared: dict[int, list[str]] = {}  # to_empty gives each name its own storage: tie them again
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model.to_empty(device="cpu")
    for first, *others in shared.values():
        for name in others:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, model.get_parameter(first))
    return model


def _full(value):
    """The full tensor of a DTensor (collective), or ``value`` itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of ``full`` laid out as ``param`` (a DTensor), computed locally."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
