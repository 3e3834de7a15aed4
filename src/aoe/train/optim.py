"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from aoe.config import TrainConfig
from aoe.nn.factorized import gate_factor_parameters


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW(betas=(beta1, beta2)); ``weight_decay`` on parameters with >= 2 dims (every matrix and
    the stacked [E, ., .] expert weights), none on vectors (norm weights). Shared (tied)
    parameters appear once. Groups are in parameter-name order, so the state is reproducible.

    The factorized gates' w_down and w_up (``aoe.nn.factorized.gate_factor_parameters``) get a
    group of their own, with ``factor_weight_decay`` and ``lr * factor_lr_scale``, only when one of
    the two differs from the rest; otherwise the groups are the two above (so optimizer states
    saved before these options existed load unchanged). Every group carries ``lr_scale``, which
    ``set_lr`` multiplies in.
    """
    factor_ids = {id(p) for p in gate_factor_parameters(model)}
    factor_wd = cfg.weight_decay if cfg.factor_weight_decay is None else cfg.factor_weight_decay
    separate = factor_ids and (factor_wd != cfg.weight_decay or cfg.factor_lr_scale != 1.0)
    decay, no_decay, factors, seen = [], [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if separate and id(p) in factor_ids:
            factors.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if factors:
        groups.append({"params": factors, "weight_decay": factor_wd, "lr_scale": cfg.factor_lr_scale})
    kwargs = {}
    params = decay + no_decay + factors
    if fused is None:
        fused = all(p.is_cuda for p in params) and bool(params)
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
    """Set every group's lr to ``lr`` times its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
