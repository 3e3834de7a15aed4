"""Which device a process computes on, from a setting such as ``train.device`` or ``--device``.

``resolve_device(name, local_rank)``: "auto" (or None) is CUDA when this machine has it, else the
CPU; a CUDA device without an index is ``cuda:LOCAL_RANK`` when a launcher gave this process a
local rank (torchrun: one GPU per process), else left as it is. A name that is no torch device,
or CUDA on a machine without it, is refused by ``error`` naming the setting.
"""

from __future__ import annotations

import torch

from aoe.errors import InputError


def resolve_device(name: str | None, local_rank: int | None = None, *, setting: str = "--device",
                   error: type[Exception] = InputError) -> torch.device:
    """The torch device ``name`` means here (see the module docstring); ``setting``: the flag or key
    to name in an error ("--device", "train.device")."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise error(f"{setting} {name!r} is not a torch device: use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"{setting} {name}: CUDA is not available on this machine; use {setting} cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device
