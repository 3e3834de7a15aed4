"""aoe.config: defaults, YAML, overrides, unknown keys, validation, round trips."""

import json

import pytest
import torch
import yaml

from aoe.config import (
    ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, config_from_dict, config_to_dict,
    list_configs, load_config, save_config,
)
from aoe.model import Transformer


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.model.ffn == "aoe" and cfg.model.vocab_size is None
    assert cfg.train.micro_batch == cfg.train.batch_size
    assert cfg.model.kv_heads == cfg.model.n_heads
    assert cfg.model.ffn_width_dense == cfg.model.d_ffn
    assert load_config() == cfg
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("name", ["tiny", "small", "paper-732m", "paper-4b"])
def test_packaged_recipes_load_and_build(name):
    assert name in list_configs()
    for ffn in ("dense", "moe", "aoe"):
        cfg = load_config(name, [f"model.ffn={ffn}"])
        cfg.model.vocab_size = cfg.data.vocab_size
        cfg.validate()
        with torch.device("meta"):
            model = Transformer(cfg.model)
        assert model.num_params() > 0


def _meta_model(name, *overrides):
    cfg = load_config(name, ["model.vocab_size=32000", *overrides])
    with torch.device("meta"):
        return cfg.model, Transformer(cfg.model)


def test_paper_recipe_sizes():
    m, model = _meta_model("paper-732m", "model.ffn=moe")
    assert abs(model.num_params() / 732e6 - 1) < 0.01
    # the paper's 247M active counts the tied embedding again as the lm_head
    assert abs((model.num_params(active=True) + m.vocab_size * m.d_model) / 247e6 - 1) < 0.02
    m, model = _meta_model("paper-4b", "model.ffn=moe")
    assert abs(model.num_params() / 4e9 - 1) < 0.01
    assert abs((model.num_params(active=True) + m.vocab_size * m.d_model) / 1.18e9 - 1) < 0.01


def _eq5(d_model, d_ffn, d_low):
    """The paper's Eq. 5 solved for d_wide: d_low*D + d_low*W + 2*D*W = 3*D*d_ffn."""
    return (3 * d_model * d_ffn - d_low * d_model) / (d_low + 2 * d_model)


def test_paper_recipes_match_aoe_to_moe_by_eq5():
    m, aoe = _meta_model("paper-732m")
    assert _eq5(768, 3072, 256) == 3840 and m.resolved_d_wide == 3840  # exact: no rounding
    _, moe = _meta_model("paper-732m", "model.ffn=moe")
    assert abs(aoe.num_params() / moe.num_params() - 1) < 1e-3
    m, _ = _meta_model("paper-4b")
    assert round(_eq5(1280, 5120, 400), 2) == 6469.19  # the paper rounds to 6470
    assert m.resolved_d_wide % 8 == 0 and abs(m.resolved_d_wide - _eq5(1280, 5120, 400)) < 4  # nearest aligned


def test_paper_recipes_have_the_published_schedule():
    for name, lr, final in (("paper-732m", 2e-4, 1.28e-5), ("paper-4b", 3.2e-4, 1.28e-5)):
        t = load_config(name).train
        assert (t.lr, t.warmup_steps, t.weight_decay, t.grad_clip, t.beta1, t.beta2) == (lr, 4800, 0.1, 1.0, 0.9, 0.95)
        assert t.lr * t.min_lr_ratio == pytest.approx(final)
        assert abs(t.batch_size * t.seq_len / 4.2e6 - 1) < 0.01 and abs(t.max_steps * t.batch_size * t.seq_len / 1e11 - 1) < 1e-3


def test_yaml_file_partial_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 2\n  ffn: moe\ntrain:\n  lr: 3e-4\n  seq_len: 64\ndata:\n")
    cfg = load_config(path)
    assert cfg.model.d_model == 64 and cfg.model.ffn == "moe"
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as text
    assert cfg.model.n_layers == ModelConfig().n_layers
    assert cfg.data == DataConfig()


def test_override_values_are_parsed_and_typed():
    cfg = load_config("tiny", [
        "train.max_steps=7", "train.lr=3e-4", "train.weight_decay=0", "train.compile=true",
        "data.tokenizer=/tmp/tok.json", "data.max_bytes=null", "model.dense_layers=[0, 3]",
        "model.renormalize=true", "model.n_kv_heads=2", "train.micro_batch_size=4",
    ])
    assert cfg.train.max_steps == 7
    assert cfg.train.lr == 3e-4
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.compile is True
    assert cfg.data.tokenizer == "/tmp/tok.json" and cfg.data.max_bytes is None
    assert cfg.model.dense_layers == [0, 3]
    assert cfg.model.renormalize is True and cfg.model.n_kv_heads == 2
    assert cfg.train.grad_accum_steps() == 4 and cfg.train.grad_accum_steps(world_size=2) == 2
    with pytest.raises(ConfigError, match="world_size=3"):
        cfg.train.grad_accum_steps(world_size=3)
    # later overrides win
    assert load_config(None, ["train.seed=1", "train.seed=2"]).train.seed == 2


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.lr=true", "train.lr"),
    ("train.lr=fast", "train.lr"),
    ("model.tie_embeddings=1", "model.tie_embeddings"),
    ("model.ffn=3", "model.ffn"),
    ("model.dense_layers=1", "model.dense_layers"),
    ("model.dense_layers=[a]", "model.dense_layers[0]"),
    ("data.vocab_size=null", "data.vocab_size"),
])
def test_override_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_unknown_keys_are_refused_with_their_dotted_name(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.d_modle=64"])
    msg = str(e.value)
    assert "model.d_modle" in msg and "model.d_model" in msg  # the name and a suggestion
    assert "n_experts" in msg and "valid keys of model" in msg  # the section's valid keys
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config(None, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="'model.d_model.x'"):
        load_config(None, ["model.d_model.x=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="'train.learning_rate'.*valid keys of train: seed"):
        load_config(path)
    path.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'optimizer'.*model, data, train"):
        load_config(path)
    with pytest.raises(ConfigError, match="data.tokeniser"):
        config_from_dict({"data": {"tokeniser": "x"}})


@pytest.mark.parametrize("bad", ["model.d_model", "d_model=3", "=3", "model.=3"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


@pytest.mark.parametrize("overrides, message", [
    (["model.n_heads=6", "model.d_model=512"], "model.n_heads=6 does not divide model.d_model=512"),
    (["model.d_model=120", "model.n_heads=8"], "head_dim 15 must be even"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 does not divide model.n_heads=4"),
    (["model.top_k=9"], "model.top_k=9 exceeds model.n_experts=8"),
    (["model.ffn=mixture"], "model.ffn='mixture' is not one of"),
    (["model.norm=l3"], "model.norm='l3'"),
    (["model.d_low=0"], "model.d_low=0 must be > 0"),
    (["model.d_low=4096"], "model.d_low=4096"),
    (["model.n_experts=0"], "model.n_experts=0"),
    (["model.vocab_size=-1"], "model.vocab_size=-1"),
    (["model.init_std=0"], "model.init_std"),
    (["model.aux_loss_coef=-0.1"], "model.aux_loss_coef"),
    (["model.z_loss_coef=0.001"], "model.z_loss_coef"),  # AoE has no router logits
    (["model.dense_layers=[4]"], "model.dense_layers contains 4"),
    (["model.dense_layers=[1, 1]"], "model.dense_layers contains 1 twice"),
    (["model.grouped_mm=fast"], "model.grouped_mm"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than data.vocab_size=4096"),
    (["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    (["train.lr=.nan"], "train.lr"),
    (["train.max_steps=0"], "train.max_steps=0"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio"),
    (["train.beta2=1"], "train.beta2"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "train.micro_batch_size=4 does not divide train.batch_size=10"),
    (["train.dtype=float16"], "train.dtype"),
    (["train.device=gpu7"], "train.device"),
    (["train.nan_policy=ignore"], "train.nan_policy"),
    (["train.seq_len=512"], "train.seq_len=512 exceeds model.max_seq_len=256"),
    (["data.val_fraction=1"], "data.val_fraction"),
    (["data.on_decode_error=strict"], "data.on_decode_error"),
    (["data.source="], "data.source"),
    (["model.gate_init=xavier"], "model.gate_init='xavier' is not one of"),
    (["model.dense_gate_rank=8"], "model.dense_gate_rank=8 applies to dense FFNs only"),
    (["model.ffn=dense", "model.dense_gate_rank=0"], "model.dense_gate_rank=0 must be > 0"),
    (["train.factor_lr_scale=0"], "train.factor_lr_scale=0.0 must be > 0"),
    (["train.factor_weight_decay=-1"], "train.factor_weight_decay=-1.0 must be >= 0"),
    (["train.stop_signals=[SIGKILL]"], "not a signal a process can catch"),
    (["train.stop_signals=[SIGNOPE]"], "train.stop_signals"),
    (["train.stop_signals=[SIGTERM, SIGTERM]"], "lists a signal twice"),
    (["train.dist_timeout_s=0"], "train.dist_timeout_s=0.0 must be > 0"),
    (["train.dist_timeout_s=.inf"], "train.dist_timeout_s=inf must be finite"),
    (["train.collective_timeout_s=-5"], "train.collective_timeout_s=-5.0 must be > 0"),
])
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert message in str(e.value)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="model.top_k=3 exceeds model.n_experts=2"):
        ModelConfig(n_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size="8")
    cfg = RunConfig()
    cfg.model.n_heads = 5
    with pytest.raises(ConfigError, match="model.n_heads=5"):
        cfg.validate()


def test_dict_round_trip_is_exact(tmp_path):
    cfg = load_config("tiny", [
        "train.lr=3e-4", "model.norm_eps=1e-6", "model.rope_theta=500000", "model.dense_layers=[0]",
        "data.val_fraction=0.1", "model.renormalize=false", "model.n_kv_heads=2", "model.vocab_size=5000",
    ])
    d = config_to_dict(cfg)
    assert set(d) == {"model", "data", "train"}
    assert config_from_dict(d) == cfg
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    for name in ("resolved.yaml", "resolved.json"):
        path = save_config(cfg, tmp_path / name)
        back = load_config(path)
        assert back == cfg and config_to_dict(back) == d


def test_resolved_d_wide_matches_the_layer_rule():
    from aoe.nn import match_d_wide

    m = ModelConfig()
    assert m.resolved_d_wide == match_d_wide(m.d_model, m.d_ffn, m.d_low)
    assert ModelConfig(d_wide=100).resolved_d_wide == 100


# ---------------------------------------------------------------------------------------------
# Input that is not a config: one ConfigError naming the file, section or key, on one line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shown", [("model: 5\n", "an integer (5)"),
                                         ("model: [d_model, 128]\n", "a list (['d_model', 128])")])
def test_a_section_that_is_not_a_mapping_names_the_file_and_the_section(tmp_path, text, shown):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "section 'model' must be a mapping" in msg and shown in msg


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model:\n  d_model: 64\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml' is not UTF-8 text \(byte 0xe9 at offset 26\)"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("train.lr=1e300", "train.lr=1e+300 is out of range"),
    ("model.rope_theta=1e39", "model.rope_theta=1e+39 is out of range"),
    ("train.weight_decay=" + "9" * 400, "train.weight_decay=9999"),  # an integer too large for a float
    ("train.seed=18446744073709551616", "train.seed=18446744073709551616 is out of range"),
])
def test_numbers_beyond_what_the_tensors_hold_are_refused(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "out of range" in str(e.value)
    assert load_config(None, ["train.lr=3e38"]).train.lr == 3e38  # float32's range itself is fine


@pytest.mark.parametrize("text", ["model: {d_model: [1, 2\n", "model: {d_model: 2001-13-01}\n", "[" * 600 + "]" * 600])
def test_yaml_the_parser_refuses_is_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"cannot parse config file {str(path)!r}") and "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["model.dense_layers=[0", "model.d_model=2001-13-01", "model.d_model=!!int x"])
def test_override_values_the_parser_refuses_are_one_line(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override in str(e.value) and "cannot parse the value" in str(e.value) and "\n" not in str(e.value)


def test_dicts_of_the_wrong_shape_are_config_errors():
    from aoe.config import apply_overrides

    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        apply_overrides({"train": 3}, ["train.lr=1"])
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        config_from_dict(["model"])


def test_values_too_deep_or_too_long_to_show_keep_the_message_short():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"model.d_model=<a list nested too deeply to show> must be an integer"):
        config_from_dict({"model": {"d_model": deep}})
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"source": ["x" * 10_000]}})
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("overrides, message", [
    (["model.top_p=0.5"], "model.top_p=0.5 applies with model.selection=top_p only; set it to null"),
    (["model.max_k=3"], "model.max_k=3 applies with model.selection=top_p only; set it to null"),
    (["model.min_k=2"], "model.min_k=2 applies with model.selection=top_p only; set it to 1"),
    (["model.capacity_factor=2.0"], "model.capacity_factor=2.0 applies with model.selection=expert_choice only; "
                                    "set it to 1.0"),
    (["model.selection=top_p", "model.ec_inference=expert_choice"],
     "model.ec_inference='expert_choice' applies with model.selection=expert_choice only"),
    (["model.ffn=dense", "model.selection=expert_choice"],
     "model.selection='expert_choice' applies to sparse FFNs (ffn=\"moe\" or \"aoe\") only; set it to top_k"),
    (["train.fsdp_shard_size=2"], "train.fsdp_shard_size=2 applies with train.fsdp=true only; set it to null"),
])
def test_an_option_that_does_nothing_where_it_is_set_is_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_same_options_are_accepted_where_they_apply():
    load_config("tiny", ["model.selection=top_p", "model.top_p=0.5", "model.min_k=2", "model.max_k=3"])
    load_config("tiny", ["model.selection=expert_choice", "model.capacity_factor=2.0",
                         "model.ec_inference=expert_choice"])
    load_config("tiny", ["train.fsdp=true", "train.fsdp_shard_size=2"])


def test_a_saved_config_with_an_option_that_did_nothing_still_loads(tmp_path):
    from aoe.config.files import load_saved_config

    saved = config_to_dict(load_config("tiny", ["model.ffn=dense"]))
    saved["model"].update(selection="expert_choice", capacity_factor=4.0, top_p=0.3)
    saved["train"]["fsdp_shard_size"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    cfg = load_saved_config(path)
    assert (cfg.model.selection, cfg.model.capacity_factor, cfg.model.top_p) == ("top_k", 1.0, None)
    assert cfg.train.fsdp_shard_size is None
