"""``aoe checkpoint consolidate``: a sharded checkpoint (``aoe.io.sharded``) rewritten in the
one-process format (``aoe.io.checkpoint``). It builds the model and the run's optimizer to hold
the full state, so it sits with the trainer, above both checkpoint formats."""

from __future__ import annotations

import os
from pathlib import Path

from aoe.data import Tokenizer
from aoe.io import checkpoint as ckpt
from aoe.io import sharded
from aoe.io.layout import is_sharded
from aoe.model import Transformer
from aoe.parallel.fsdp import empty_model
from aoe.train.optim import build_optimizer

__all__ = ["consolidate"]


def consolidate(src: str | os.PathLike, out_run_dir: str | os.PathLike) -> Path:
    """Write the sharded checkpoint ``src`` (or a run directory's newest good one) in the
    one-process format, under ``out_run_dir/checkpoints/``, and return its path: weights,
    optimizer state in the one-process layout, counters, rank 0's data position and RNG, so the
    copy resumes like any one-process checkpoint. Holds the full model and moments in memory."""
    path = ckpt.resolve_checkpoint(src)
    ckpt.verify_checkpoint(path)
    if not is_sharded(path):
        raise ckpt.CheckpointError(f"{str(path)!r} is already in the one-process format: nothing to consolidate")
    cfg = ckpt.load_run_config(path)
    model = empty_model(lambda: Transformer(cfg.model))
    optimizer = build_optimizer(model, cfg.train, fused=False)
    sharded.load_training(path, model, optimizer)
    state = ckpt.load_trainer_state(path)
    state["optimizer"] = optimizer.state_dict()
    tok_file = path / ckpt.TOKENIZER_FILE
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return ckpt.save_checkpoint(out_run_dir, state["step"], model, cfg, state, tokenizer=tokenizer)
