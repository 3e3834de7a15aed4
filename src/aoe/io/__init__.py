"""Models on disk, below training: the native checkpoint format (write atomically, verify, list,
load a model for inference). Evaluation, export, comparison and the CLI load models from here
without importing the trainer."""

from aoe.io.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    find_latest_checkpoint,
    list_checkpoints,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
    save_model_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError", "CheckpointWriteError", "save_checkpoint", "save_model_checkpoint", "load_model",
    "resolve_checkpoint", "find_latest_checkpoint", "list_checkpoints", "verify_checkpoint",
]
