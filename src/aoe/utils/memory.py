"""Peak tensor memory of a block of code, on any device (CPU included).

CUDA has an allocator counter (``torch.cuda.max_memory_allocated``); the CPU has none, so
``TensorMemoryTracker`` watches every tensor storage that an operator creates while it is active
(forward and backward ops alike: on the CPU the autograd engine runs backward in the calling
thread) and the moment each storage is freed. The peak it reports is the most bytes of those
storages alive at once, plus ``baseline`` (what existed before, e.g. parameters and inputs, which
the caller counts). It counts tensor storages only, not allocator slack or Python objects.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class TensorMemoryTracker(TorchDispatchMode):
    def __init__(self, baseline_bytes: int = 0):
        super().__init__()
        self.baseline = baseline_bytes
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out

    @property
    def peak_bytes(self) -> int:
        return self.baseline + self.peak


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def training_step_peak_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast=None) -> int:
    """Peak memory of one forward + backward of ``model(x, y)`` (loss + aux loss): the parameters
    plus the most bytes of activations, temporaries and gradients alive at once. Optimizer state is
    not included. CUDA: the allocator's peak; CPU: ``TensorMemoryTracker``. Gradients are cleared after."""
    import contextlib

    params = [p for p in model.parameters()]
    ctx = autocast or contextlib.nullcontext()
    model.zero_grad(set_to_none=True)
    device = params[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with ctx:
            out = model(x, y)
        (out.loss + out.aux_loss).backward()
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        tracker = TensorMemoryTracker(baseline_bytes=tensor_bytes(params))
        with tracker:
            with ctx:
                out = model(x, y)
            (out.loss + out.aux_loss).backward()
        peak = tracker.peak_bytes
    model.zero_grad(set_to_none=True)
    return peak
