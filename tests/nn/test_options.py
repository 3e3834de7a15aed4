"""The options both sparse layers share, declared once (aoe.nn.options): they reach every place
that describes a layer (its signature, the layer configs, the run config, the HF config) without
a second list, and are checked by one rule set."""

import dataclasses
import inspect

import pytest

from aoe.config import ConfigError, ModelConfig
from aoe.hf.configuration import AoEConfig, HF_TO_NATIVE
from aoe.nn import AoE, MoE, SparseOptions
from aoe.nn.configs import AoEFFNConfig, MoEFFNConfig
from aoe.nn.options import CONFIG_KEYS, OptionError

FIELDS = dataclasses.fields(SparseOptions)

#: a value other than the default for each option, valid with selection=top_p and 8 experts
OTHER = {"renormalize": False, "aux_loss_coef": 0.01, "bias_update_rate": 0.001, "entropy_loss_coef": 1e-4,
         "grouped_mm": "loop", "backward_chunks": 2, "init_std": 0.03, "gate_init": "normal",
         "selection": "top_p", "top_p": 0.6, "min_k": 2, "max_k": 3, "capacity_factor": 1.0,
         "ec_inference": "top_k", "n_shared_experts": 1, "d_shared": 24, "shared_gate": True}


def test_every_option_has_a_test_value():
    assert set(OTHER) == {f.name for f in FIELDS}


@pytest.mark.parametrize("layer", [MoE, AoE])
def test_signatures_and_layer_configs_list_every_option_with_its_default(layer):
    params = inspect.signature(layer).parameters
    config = {MoE: MoEFFNConfig, AoE: AoEFFNConfig}[layer].__dataclass_fields__
    for f in FIELDS:
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default
        assert config[f.name].default == f.default


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_every_option_reaches_the_layer_from_the_run_config_and_the_hf_config(ffn):
    keys = {CONFIG_KEYS.get(name, name): value for name, value in OTHER.items()}
    keys["capacity_factor"] = 1.0  # idle with top_p: its off value
    cfg = ModelConfig(ffn=ffn, vocab_size=64, **keys)
    for source in (cfg, AoEConfig.from_model_config(cfg).to_model_config()):
        layer = source.ffn_config(0).build()
        for name, value in OTHER.items():
            assert getattr(layer.options, name) == value, name
        assert layer.shared is not None and layer.shared.d_shared == 24 and layer.max_k == 3


def test_model_config_defaults_are_the_layers():
    m = ModelConfig()
    for f in FIELDS:
        assert getattr(m, CONFIG_KEYS.get(f.name, f.name)) == f.default, f.name
    assert {n for _, n in HF_TO_NATIVE} == {f.name for f in dataclasses.fields(ModelConfig)}


def test_an_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="MoE\\(\\) got an unexpected keyword argument 'topp'"):
        MoE(16, 24, 4, 2, topp=0.5)
    with pytest.raises(TypeError, match="'d_wdie'"):
        AoE(16, 4, 4, 2, d_wide=24, d_wdie=8)


@pytest.mark.parametrize("kw, layer_message, config_message", [
    (dict(selection="top_p", max_k=9), "max_k=9 must be in [min_k=1, n_experts=8]",
     "model.max_k=9 must be in [model.min_k=1, model.n_experts=8]"),
    (dict(shared_gate=True), "shared_gate=True is set, but shared experts need n_shared_experts >= 1",
     "model.shared_expert_gate=True applies with model.n_shared_experts >= 1 only"),
    (dict(selection="expert_choice", bias_update_rate=0.1), "bias_update_rate=0.1 has no effect",
     "model.bias_update_rate=0.1 has no effect"),
])
def test_one_rule_set_speaks_in_each_vocabulary(kw, layer_message, config_message):
    with pytest.raises(OptionError) as e:
        SparseOptions(**kw).check(8)
    assert str(e.value).startswith(layer_message)
    keys = {CONFIG_KEYS.get(k, k): v for k, v in kw.items()}
    with pytest.raises(ConfigError) as e:
        ModelConfig(ffn="moe", **keys)
    assert str(e.value).startswith(config_message) and "\n" not in str(e.value)
