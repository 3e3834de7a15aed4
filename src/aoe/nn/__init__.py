"""The layers: AoE, MoE and DenseFFN on one dropless expert engine."""

from aoe.nn.aoe import AoE, match_d_wide
from aoe.nn.balance import RoutingInfo, confidence_entropy, imbalance, load_balancing_loss, load_entropy, router_z_loss
from aoe.nn.dense import DenseFFN
from aoe.nn.erc import erc_loss
from aoe.nn.moe import MoE
from aoe.nn.options import SparseOptions
from aoe.nn.sparse import SparseFFN, sparse_layers, total_aux_loss, update_selection_biases

__all__ = [
    "AoE", "MoE", "DenseFFN", "SparseFFN", "SparseOptions", "match_d_wide", "RoutingInfo", "total_aux_loss",
    "update_selection_biases", "sparse_layers", "load_balancing_loss", "router_z_loss",
    "load_entropy", "confidence_entropy", "imbalance", "erc_loss",
]
