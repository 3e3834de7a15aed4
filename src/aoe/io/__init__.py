"""Models on disk, below training: the native checkpoint format (write atomically, verify, list;
``aoe.io.checkpoint``), its sharded variant built on it (``aoe.io.sharded``; what both hold:
``aoe.io.layout``; writes in the background: ``aoe.io.background``) and loading a model for
inference from any directory the project writes (``aoe.io.models``, the one reader of both formats). Evaluation, export, comparison and the CLI load models from here without
importing the trainer. The names below are imported on first use, so that a command's ``--help``
(which wires ``aoe checkpoint`` from ``aoe.io.commands``) does not import torch."""

import importlib

_NAMES = {
    "aoe.io.checkpoint": ("CheckpointError", "CheckpointWriteError", "find_latest_checkpoint", "list_checkpoints",
                          "resolve_checkpoint", "save_checkpoint", "save_model_checkpoint", "verify_checkpoint"),
    "aoe.io.models": ("load_model",),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = [
    "CheckpointError", "CheckpointWriteError", "save_checkpoint", "save_model_checkpoint", "load_model",
    "resolve_checkpoint", "find_latest_checkpoint", "list_checkpoints", "verify_checkpoint",
]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'aoe.io' has no attribute {name!r}")
