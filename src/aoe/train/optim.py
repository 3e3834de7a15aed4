"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from aoe.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW(betas=(beta1, beta2)); ``weight_decay`` on parameters with >= 2 dims (every matrix and
    the stacked [E, ., .] expert weights), none on vectors (norm weights). Shared (tied)
    parameters appear once. Groups are in parameter-name order, so the state is reproducible."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {}
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay) and bool(decay + no_decay)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warm-up from lr / warmup_steps to lr over the first ``warmup_steps`` steps, then a
    cosine decay from lr to ``lr * min_lr_ratio`` at the last step (max_steps - 1).
    """
    lr, warmup, total = cfg.lr, cfg.warmup_steps, cfg.max_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * cfg.min_lr_ratio
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
