"""torch.distributed set-up from the torchrun environment (gloo on CPU, nccl on CUDA) and small helpers.

A multi-process run also starts this rank's ``Watchdog`` (``aoe.train.watchdog``: heartbeats in
the rendezvous store; a rank that dies is named by the others, which exit within
``train.dist_timeout_s``); ``shutdown_distributed`` stops it before leaving the group.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_ranks() -> DistInfo:
    """This process's place as torchrun's environment gives it (RANK, WORLD_SIZE, LOCAL_RANK),
    before any process group exists; ``DistInfo()`` when not launched by torchrun."""
    if not launched_by_torchrun():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return DistInfo(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


_WATCHDOG = None  # this process's Watchdog while it is in a group (aoe.train.watchdog)


def init_distributed(device: torch.device, timeout_s: float | None = None,
                     collective_timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    A single process (no torchrun) returns DistInfo() without creating a group. The backend is nccl
    for CUDA devices and gloo otherwise. Idempotent. ``collective_timeout_s``: how long a collective
    may wait (None: torch's default, 30 min for gloo, 10 min for nccl). ``timeout_s``: start a
    ``Watchdog`` that ends this process when a peer has been silent that long (None: none).
    """
    global _WATCHDOG
    info = launch_ranks()
    rank, world = info.rank, info.world_size
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = {} if collective_timeout_s is None else {"timeout": timedelta(seconds=collective_timeout_s)}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **timeout)
        if timeout_s is not None:
            from aoe.train.watchdog import Watchdog

            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
            _WATCHDOG = Watchdog(rank, world, timeout_s, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 hosts_store=not agent_store).start()
            atexit.register(_stop_watchdog)  # a caller that never shuts down: not stopped mid-call by the exit
    return info


def current_watchdog():
    """This process's ``Watchdog`` (None: one process, or none was asked for)."""
    return _WATCHDOG


def _stop_watchdog() -> None:
    global _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.stop("done")
        _WATCHDOG = None


def shutdown_distributed(failed: bool = False) -> None:
    """Stop the watchdog (telling the peers this rank left: ``failed`` says whether with an error),
    then leave the process group."""
    global _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.stop("error" if failed else "done")
        _WATCHDOG = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op for one process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def all_reduce_sum_of(info: DistInfo) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The in-place sum over the ranks ``info`` describes (None for one process)."""
    return (lambda t: all_reduce_sum(t, info)) if info.enabled else None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of ``t`` over ranks in place (no-op for one process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool | int, info: DistInfo, device: torch.device) -> int:
    """The largest of every rank's ``flag`` (0 when none is set): the same answer on all ranks
    (the reduction runs on ``device`` when it is a GPU, else on the CPU)."""
    on = device if device.type == "cuda" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int64, device=on)
    return int(all_reduce_max(value, info)[0])
