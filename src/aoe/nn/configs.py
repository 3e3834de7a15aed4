"""Each feed-forward layer as data: ``DenseFFNConfig``, ``MoEFFNConfig``, ``AoEFFNConfig``.

A config holds exactly the arguments of its layer's constructor and offers

    build()              the layer (``DenseFFN`` / ``MoE`` / ``AoE``)
    num_params()         its parameters
    num_active_params()  the parameters one token uses (k of E experts' expert weights; a router,
                         AoE's w_down of every expert and the shared experts in full; for top-p
                         and expert choice k is the layer's ``experts_per_token_count()``)
    flops_per_token()    forward matmul FLOPs per token (2 x multiply-adds)

The defaults live once, in the layers' signatures: a config's field defaults are read from them.
The counts come from the layer itself (``num_active_params`` and ``forward_flops`` of the layer,
built on the meta device, where no memory is allocated), so a layer's structure is described in
one place only.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aoe.nn.aoe import AoE
from aoe.nn.dense import DenseFFN
from aoe.nn.moe import MoE

__all__ = ["DenseFFNConfig", "MoEFFNConfig", "AoEFFNConfig", "FFNConfig"]


def _default(layer: type, name: str) -> Any:
    """The default of ``layer.__init__``'s argument ``name``."""
    return inspect.signature(layer.__init__).parameters[name].default


class _LayerConfig:
    """What the three configs share: build, and the counts read off a meta-device build."""

    LAYER: type[nn.Module]

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if device is None:
            return self.LAYER(**kwargs)
        with torch.device(device):
            return self.LAYER(**kwargs)

    def _meta(self) -> nn.Module:
        return self.build("meta")

    def num_params(self) -> int:
        return sum(p.numel() for p in self._meta().parameters())

    def num_active_params(self) -> int:
        return self._meta().num_active_params()

    def flops_per_token(self) -> int:
        return self._meta().forward_flops()


@dataclass(frozen=True)
class DenseFFNConfig(_LayerConfig):
    """A SwiGLU FFN of width ``d_ffn`` (``aoe.nn.DenseFFN``)."""

    LAYER = DenseFFN
    d_model: int
    d_ffn: int
    init_std: float = _default(DenseFFN, "init_std")
    gate_rank: int | None = _default(DenseFFN, "gate_rank")
    gate_init: str = _default(DenseFFN, "gate_init")


@dataclass(frozen=True)
class MoEFFNConfig(_LayerConfig):
    """A router MoE layer (``aoe.nn.MoE``)."""

    LAYER = MoE
    d_model: int
    d_ffn: int
    n_experts: int
    top_k: int
    renormalize: bool = _default(MoE, "renormalize")
    aux_loss_coef: float = _default(MoE, "aux_loss_coef")
    z_loss_coef: float = _default(MoE, "z_loss_coef")
    bias_update_rate: float = _default(MoE, "bias_update_rate")
    recompute_gate: bool = _default(MoE, "recompute_gate")
    grouped_mm: str = _default(MoE, "grouped_mm")
    backward_chunks: int | None = _default(MoE, "backward_chunks")
    init_std: float = _default(MoE, "init_std")
    gate_rank: int | None = _default(MoE, "gate_rank")
    router_hidden: int | None = _default(MoE, "router_hidden")
    gate_init: str = _default(MoE, "gate_init")
    n_shared_experts: int = _default(MoE, "n_shared_experts")
    d_shared: int | None = _default(MoE, "d_shared")
    shared_gate: bool = _default(MoE, "shared_gate")
    selection: str = _default(MoE, "selection")
    top_p: float | None = _default(MoE, "top_p")
    min_k: int = _default(MoE, "min_k")
    max_k: int | None = _default(MoE, "max_k")
    capacity_factor: float = _default(MoE, "capacity_factor")
    ec_inference: str = _default(MoE, "ec_inference")
    entropy_loss_coef: float = _default(MoE, "entropy_loss_coef")
    erc_loss_coef: float = _default(MoE, "erc_loss_coef")
    erc_alpha: float = _default(MoE, "erc_alpha")


@dataclass(frozen=True)
class AoEFFNConfig(_LayerConfig):
    """An Autonomy-of-Experts layer (``aoe.nn.AoE``) of expert width ``d_wide``."""

    LAYER = AoE
    d_model: int
    d_low: int
    n_experts: int
    top_k: int
    d_wide: int
    renormalize: bool = _default(AoE, "renormalize")
    norm: str = _default(AoE, "norm")
    aux_loss_coef: float = _default(AoE, "aux_loss_coef")
    bias_update_rate: float = _default(AoE, "bias_update_rate")
    recompute_scores: bool = _default(AoE, "recompute_scores")
    scores_backend: str = _default(AoE, "scores_backend")
    recompute_gate: bool = _default(AoE, "recompute_gate")
    grouped_mm: str = _default(AoE, "grouped_mm")
    backward_chunks: int | None = _default(AoE, "backward_chunks")
    init_std: float = _default(AoE, "init_std")
    gate_init: str = _default(AoE, "gate_init")
    n_shared_experts: int = _default(AoE, "n_shared_experts")
    d_shared: int | None = _default(AoE, "d_shared")
    shared_gate: bool = _default(AoE, "shared_gate")
    selection: str = _default(AoE, "selection")
    top_p: float | None = _default(AoE, "top_p")
    min_k: int = _default(AoE, "min_k")
    max_k: int | None = _default(AoE, "max_k")
    capacity_factor: float = _default(AoE, "capacity_factor")
    ec_inference: str = _default(AoE, "ec_inference")
    entropy_loss_coef: float = _default(AoE, "entropy_loss_coef")


FFNConfig = DenseFFNConfig | MoEFFNConfig | AoEFFNConfig
