"""The factorized gate projection ``W_g = w_down @ w_up``: how it starts, and which parameters it is.

AoE (and the "MoE + factorized W_g" and dense rank-r ablations) replace an expert's gate matrix
W_g [D, W] by the product of w_down [D, L] and w_up [L, W]. Two schemes:

- ``"normal"`` (the authors' code): every factor ~ N(0, std), like every other matrix. The
  product's entries then have std ``sqrt(L) * std**2`` (0.0113 for L = 32, std = 0.02), so the
  gate pre-activation ``x @ W_g`` starts ``1 / (sqrt(L) * std)`` times smaller than an
  unfactorized gate's (8.8x for L = 32), and SiLU of it is near zero: the expert's output starts
  about that much smaller too.
- ``"balanced"``: w_down ~ N(0, std) as before (AoE's scores ``||x @ w_down||`` keep their scale),
  and w_up ~ N(0, 1 / L), so the product has the std of an unfactorized N(0, std) gate and the
  expert starts as a plain SwiGLU expert of width W would.

Both consume the random stream in the same order (w_down, then w_up), so for a fixed seed the
schemes differ only in w_up's scale.

``"balanced"`` is the default of every layer and of ``ModelConfig`` (new models; why, with the
measurements: docs/results/tiny-balanced); ``"normal"`` is one option away. A saved run config
without the key reads as ``"normal"``, what such a run was trained with
(``aoe.config.files.SAVED_MODEL_DEFAULTS``).

``gate_factor_parameters(model)`` lists every layer's w_down and w_up, for optimizer settings of
their own (``train.factor_weight_decay``, ``train.factor_lr_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

GATE_INITS = ("normal", "balanced")


def check_gate_init(gate_init: str) -> str:
    if gate_init not in GATE_INITS:
        raise ValueError(f"gate_init={gate_init!r} must be one of {list(GATE_INITS)}")
    return gate_init


def w_up_std(gate_init: str, std: float, d_low: int) -> float:
    """The std of w_up [..., L, W] under ``gate_init`` (w_down's is always ``std``)."""
    return std if check_gate_init(gate_init) == "normal" else 1.0 / math.sqrt(d_low)


@torch.no_grad()
def init_factorized_gate(w_down: torch.Tensor, w_up: torch.Tensor, std: float, gate_init: str) -> None:
    """Initialize w_down [..., D, L] and w_up [..., L, W] in place by the scheme ``gate_init``."""
    nn.init.normal_(w_down, std=std)
    nn.init.normal_(w_up, std=w_up_std(gate_init, std, w_up.shape[-2]))


def gate_factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The w_down and w_up of every factorized gate in ``model`` (AoE layers, MoE with ``gate_rank``,
    DenseFFN with ``gate_rank``: every module that holds both as its own parameters), in module
    order, each once. (Read by name, so this module needs none of the layers that use it.)"""
    out: list[nn.Parameter] = []
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if "w_down" in own and "w_up" in own:
            out += [p for p in (own["w_down"], own["w_up"]) if all(p is not q for q in out)]
    return out
