"""Each feed-forward layer as data: ``DenseFFNConfig``, ``MoEFFNConfig``, ``AoEFFNConfig``.

A config holds exactly the arguments of its layer's constructor and offers

    build()              the layer (``DenseFFN`` / ``MoE`` / ``AoE``)
    num_params()         its parameters
    num_active_params()  the parameters one token uses (k of E experts' expert weights; a router,
                         AoE's w_down of every expert and the shared experts in full; for top-p
                         and expert choice k is the layer's ``experts_per_token_count()``)
    flops_per_token()    forward matmul FLOPs per token (2 x multiply-adds)

The fields live once, in the layers' signatures (``MoE`` and ``AoE`` list the options they share,
``aoe.nn.options.SparseOptions``): each config class is made from its layer's, the defaults read from
it (AoE's config takes ``d_wide``; the layer's alternative ``d_ffn`` is ``aoe.nn.match_d_wide``'s).
The counts come from the layer itself (``num_active_params`` and ``forward_flops`` of the layer,
built on the meta device, where no memory is allocated), so a layer's structure is described in
one place only.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from aoe.nn.aoe import AoE
from aoe.nn.dense import DenseFFN
from aoe.nn.moe import MoE

__all__ = ["DenseFFNConfig", "MoEFFNConfig", "AoEFFNConfig", "FFNConfig"]


def _layer_config(name: str, layer: type, doc: str, required: tuple[str, ...], leave_out: tuple[str, ...] = ()):
    """A frozen dataclass ``name`` whose fields are ``layer.__init__``'s arguments in their order
    (``required`` ones without a default, the rest with the layer's), less ``leave_out``."""
    fields = []
    for p in inspect.signature(layer.__init__).parameters.values():
        if p.name == "self" or p.name in leave_out:
            continue
        if p.name in required:
            fields.append((p.name, p.annotation))
        else:
            fields.append((p.name, p.annotation, dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass(name, fields, bases=(_LayerConfig,), frozen=True,
                                      namespace={"LAYER": layer, "__doc__": doc, "__module__": __name__})


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


DenseFFNConfig = _layer_config("DenseFFNConfig", DenseFFN, "A SwiGLU FFN of width ``d_ffn`` (``aoe.nn.DenseFFN``).",
                               required=("d_model", "d_ffn"))
MoEFFNConfig = _layer_config("MoEFFNConfig", MoE, "A router MoE layer (``aoe.nn.MoE``).",
                             required=("d_model", "d_ffn", "n_experts", "top_k"))
AoEFFNConfig = _layer_config("AoEFFNConfig", AoE,
                             "An Autonomy-of-Experts layer (``aoe.nn.AoE``) of expert width ``d_wide``.",
                             required=("d_model", "d_low", "n_experts", "top_k", "d_wide"), leave_out=("d_ffn",))
FFNConfig = DenseFFNConfig | MoEFFNConfig | AoEFFNConfig
