"""Training, in three parts: the build step (``build``: processes, data, config, model, parallel
plan, each stage one call), the loop (``trainer``: ``Trainer``/``train``; saving and resuming in
``run_state``) and one parallel plan per mode (``plans``); beside them the optimizer and schedule,
metrics, evaluation, distributed helpers, stop signals and the watchdog."""

from aoe.io.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from aoe.io.models import load_model
from aoe.train.evaluate import evaluate
from aoe.train.metrics import MetricsLogger, RoutingStats, read_metrics
from aoe.train.optim import build_optimizer, lr_at
from aoe.train.trainer import Trainer, TrainingError, prepare_data, train

__all__ = [
    "Trainer", "TrainingError", "train", "prepare_data", "evaluate",
    "CheckpointError", "save_checkpoint", "load_model", "find_latest_checkpoint", "list_checkpoints",
    "verify_checkpoint", "MetricsLogger", "RoutingStats", "read_metrics", "build_optimizer", "lr_at",
]
