"""Layer configs: build() gives the layer, the counts match the built layer, defaults come from it."""

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aoe import AoE, DenseFFN, MoE
from aoe.config import ModelConfig
from aoe.nn.configs import AoEFFNConfig, DenseFFNConfig, MoEFFNConfig

CONFIGS = [
    DenseFFNConfig(32, 48),
    DenseFFNConfig(32, 48, gate_rank=8, gate_init="balanced"),
    MoEFFNConfig(32, 48, 4, 2),
    MoEFFNConfig(32, 40, 4, 1, gate_rank=8, router_hidden=12, renormalize=False),
    AoEFFNConfig(32, 8, 4, 2, 56),
    AoEFFNConfig(32, 4, 6, 3, 40, norm="l1", recompute_scores=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_counts_match_the_built_layer(cfg):
    layer = cfg.build()
    assert type(layer) is cfg.LAYER
    assert cfg.num_params() == sum(p.numel() for p in layer.parameters())
    x = torch.randn(30, 32)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert cfg.flops_per_token() * 30 == counter.get_total_flops()
    if isinstance(layer, DenseFFN):
        assert cfg.num_active_params() == cfg.num_params()
    else:  # per chosen expert: k / E of the stacked expert weights
        shared = sum(p.numel() for n, p in layer.named_parameters() if n not in layer.CHOSEN_EXPERT_PARAMS)
        chosen = sum(p.numel() for n, p in layer.named_parameters() if n in layer.CHOSEN_EXPERT_PARAMS)
        assert cfg.num_active_params() == shared + chosen * layer.top_k // layer.n_experts


def test_active_params_by_hand():
    D, F, E, k, L, W = 32, 48, 4, 2, 8, 56
    assert MoEFFNConfig(D, F, E, k).num_active_params() == D * E + k * 3 * D * F
    assert AoEFFNConfig(D, L, E, k, W).num_active_params() == E * D * L + k * (L * W + 2 * D * W)
    assert MoEFFNConfig(D, F, E, k, gate_rank=L).num_active_params() == D * E + k * (D * L + L * F + 2 * D * F)


@pytest.mark.parametrize("cfg", [DenseFFNConfig(32, 48), MoEFFNConfig(32, 48, 4, 2), AoEFFNConfig(32, 8, 4, 2, 56)],
                         ids=lambda c: type(c).__name__)
def test_defaults_are_the_layers_own(cfg):
    """A config given only its required fields builds the layer its constructor builds from those
    alone: the same weights from the same seed, the same output; every optional field is one of the
    layer's keyword arguments."""
    import dataclasses

    params = inspect.signature(cfg.LAYER.__init__).parameters
    fields = dataclasses.fields(cfg)
    optional = [f.name for f in fields if f.default is not dataclasses.MISSING]
    assert optional and all(params[name].default is not inspect.Parameter.empty for name in optional)
    required = {f.name: getattr(cfg, f.name) for f in fields if f.default is dataclasses.MISSING}
    torch.manual_seed(0)
    built = cfg.build()
    torch.manual_seed(0)
    plain = cfg.LAYER(**required)
    assert built.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in built.state_dict().items())
    x = torch.randn(2, 5, 32)
    assert torch.equal(built(x), plain(x))


def test_model_config_maps_its_fields_onto_the_layer_configs():
    base = dict(d_model=32, n_heads=2, d_ffn=48, n_experts=4, top_k=2, d_low=8, gate_init="balanced")
    aoe = ModelConfig(ffn="aoe", **base).ffn_config(0)
    assert aoe == AoEFFNConfig(32, 8, 4, 2, ModelConfig(**base).resolved_d_wide, gate_init="balanced")
    assert aoe.renormalize is True and aoe.recompute_gate is True  # Algorithm 2; None = the layer's default
    legacy = [ModelConfig(ffn=f, renormalize=None, **base).ffn_config(0).renormalize for f in ("aoe", "moe")]
    assert legacy == [False, True]  # null: what configs saved before Algorithm 2's default computed
    moe = ModelConfig(ffn="moe", renormalize=False, moe_gate_rank=8, z_loss_coef=0.1, **base).ffn_config(1)
    assert (moe.renormalize, moe.gate_rank, moe.z_loss_coef, moe.recompute_gate) == (False, 8, 0.1, False)
    dense = ModelConfig(ffn="moe", dense_layers=[0], dense_d_ffn=64, dense_gate_rank=4, **base)
    assert dense.ffn_config(0) == DenseFFNConfig(32, 64, gate_rank=4, gate_init="balanced")
    assert isinstance(dense.ffn_config(1), MoEFFNConfig)
