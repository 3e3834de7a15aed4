"""The selection rules' model keys: defaults (old configs mean top-k), validation, and the layer
configs they build."""

import pytest

from aoe.config import ConfigError, ModelConfig
from aoe.nn.configs import AoEFFNConfig, MoEFFNConfig


def test_defaults_are_top_k():
    m = ModelConfig(ffn="moe")
    cfg = m.ffn_config(0)
    assert cfg.selection == "top_k" and cfg.top_p is None and cfg.max_k is None and cfg.ec_inference == "top_k"
    layer = cfg.build()
    assert layer.selection == "top_k" and layer.experts_per_token_count() == m.top_k


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_keys_reach_the_layer(ffn):
    m = ModelConfig(ffn=ffn, selection="top_p", top_p=0.4, min_k=1, max_k=3)
    layer = m.ffn_config(0).build()
    assert (layer.selection, layer.top_p, layer.min_k, layer.max_k) == ("top_p", 0.4, 1, 3)
    m = ModelConfig(ffn=ffn, selection="expert_choice", capacity_factor=1.25, ec_inference="expert_choice")
    layer = m.ffn_config(0).build()
    assert (layer.selection, layer.capacity_factor, layer.ec_inference) == ("expert_choice", 1.25, "expert_choice")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(selection="topp"), "model.selection='topp' is not one of"),
        (dict(top_p=0.0), "model.top_p=0.0 must be in (0, 1]"),
        (dict(top_p=1.01), "model.top_p=1.01 must be in (0, 1]"),
        (dict(min_k=0), "model.min_k=0 must be > 0"),
        (dict(min_k=9), "model.min_k=9 exceeds model.n_experts=8"),
        (dict(min_k=3, max_k=2), "model.max_k=2 must be in [model.min_k=3, model.n_experts=8]"),
        (dict(capacity_factor=0.0), "model.capacity_factor=0.0 must be > 0"),
        (dict(capacity_factor=float("inf")), "model.capacity_factor=inf must be finite"),
        (dict(ec_inference="none"), "model.ec_inference='none' is not one of"),
        (dict(selection="expert_choice", bias_update_rate=0.01), "model.bias_update_rate=0.01 has no effect"),
    ],
)
def test_bad_keys_are_refused_naming_the_key(kw, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_layer_configs_read_their_defaults_from_the_layers():
    for cls in (MoEFFNConfig, AoEFFNConfig):
        fields = cls.__dataclass_fields__
        assert fields["selection"].default == "top_k" and fields["capacity_factor"].default == 1.0
