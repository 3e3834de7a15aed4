"""The memory probe of a trained model, without a trainer: the peak memory of one micro-batch
forward + backward (``aoe.utils.memory.training_step_peak_bytes``) on the run's first batch.

``step_peak_bytes(model, cfg, data)`` measures a model in hand (the one a run just trained);
``finished_model(cfg, run_dir, data)`` loads a finished run's newest good checkpoint as the
trainer would resume it (refusing one of other settings than ``cfg``), to measure it again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aoe.config import ConfigError, RunConfig
from aoe.data import BatchSampler, TokenData
from aoe.io import checkpoint as ckpt
from aoe.io.models import load_weights
from aoe.model import Transformer
from aoe.train.build import Process, resolve_config, resolve_dtype
from aoe.train.distributed import DistInfo
from aoe.train.run_state import check_same_run, keep_saved_init
from aoe.utils.device import resolve_device
from aoe.utils.memory import training_step_peak_bytes


def step_peak_bytes(model: torch.nn.Module, cfg: RunConfig, data: TokenData) -> int:
    """Peak memory of one micro-batch forward + backward of ``model`` on the first batch of the
    run's (one-process) sampler, in ``train.dtype``'s autocast."""
    t = cfg.train
    x, y = BatchSampler(data.train, t.batch_size, t.seq_len, seed=t.seed).batch(0)
    device = next(model.parameters()).device
    autocast = Process(DistInfo(), device, resolve_dtype(t.dtype, device)).autocast()
    micro = t.micro_batch
    return training_step_peak_bytes(model, x[:micro].to(device), y[:micro].to(device), autocast)


def finished_model(cfg: RunConfig, run_dir: Path, data: TokenData) -> Transformer:
    """The model of ``run_dir``'s newest good checkpoint on ``train.device``, in training mode;
    a ConfigError when that run had other settings than ``cfg`` (as ``--resume`` says)."""
    cfg = resolve_config(cfg, data)
    path = ckpt.find_latest_checkpoint(run_dir)
    if path is None:
        raise ckpt.CheckpointError(f"{str(run_dir)!r} holds no complete checkpoint")
    saved = ckpt.load_run_config(path)
    keep_saved_init(cfg, saved)
    check_same_run(cfg, saved, path)
    model = Transformer(cfg.model)
    load_weights(model, path)
    device = resolve_device(cfg.train.device, 0, setting="train.device", error=ConfigError)
    return model.to(device).train()
