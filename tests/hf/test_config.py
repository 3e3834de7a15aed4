import pytest

import dataclasses
import json

from aoe.config import ModelConfig
from aoe.hf import AoEConfig
from aoe.hf.configuration import HF_TO_NATIVE


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=100),
    ModelConfig(vocab_size=100, ffn="moe", n_kv_heads=2, renormalize=False, z_loss_coef=1e-3, dense_layers=[0, 3],
                dense_d_ffn=512, tie_embeddings=False, aux_loss_coef=0.01, grouped_mm="loop", backward_chunks=2),
    ModelConfig(vocab_size=7, ffn="dense", d_model=64, n_heads=8, rope_theta=5e5, norm_eps=1e-6, init_std=0.01,
                qk_norm="head"),
    ModelConfig(vocab_size=100, ffn="moe", n_kv_heads=2, qk_norm="full"),
    ModelConfig(vocab_size=100, ffn="aoe", d_low=16, d_wide=320, norm="l1", recompute_scores=True,
                recompute_gate=False, bias_update_rate=1e-3, renormalize=True),
])
def test_model_config_round_trip_exact(cfg, tmp_path):
    hf = AoEConfig.from_model_config(cfg)
    assert hf.to_model_config() == cfg
    assert dataclasses.asdict(hf.to_model_config()) == dataclasses.asdict(cfg)
    hf.save_pretrained(tmp_path)
    back = AoEConfig.from_pretrained(tmp_path)
    assert back.model_type == "aoe"
    assert back.to_model_config() == cfg


def test_hf_names():
    hf = AoEConfig.from_model_config(ModelConfig(vocab_size=100, d_model=64, n_heads=8, n_layers=3, d_ffn=96,
                                                 n_experts=6, top_k=3, max_seq_len=128, renormalize=True))
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers, hf.intermediate_size) == (64, 8, 3, 96)
    assert (hf.num_experts, hf.num_experts_per_tok, hf.max_position_embeddings, hf.norm_topk_prob) == (6, 3, 128, True)
    assert hf.ffn_type == "aoe" and hf.expert_score_norm == "l2" and hf.qk_norm == "none"
    assert len(HF_TO_NATIVE) == len({n for _, n in HF_TO_NATIVE})
    # every ModelConfig field has an HF name (a new field still round-trips under its own name)
    assert {n for _, n in HF_TO_NATIVE} == {f.name for f in dataclasses.fields(ModelConfig)}


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        AoEConfig(vocab_size=10, num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="ffn"):
        AoEConfig(vocab_size=10, ffn_type="nope")
    with pytest.raises(ValueError, match="qk_norm"):
        AoEConfig(vocab_size=10, qk_norm="per_head")
    AoEConfig()  # defaults without a vocabulary are allowed (HF builds default configs)


def test_auto_config_registered(tmp_path):
    from transformers import AutoConfig

    AoEConfig(vocab_size=50).save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, AoEConfig) and cfg.vocab_size == 50


def test_defaults_are_model_configs():
    hf, native = AoEConfig(), ModelConfig()
    for hf_name, native_name in HF_TO_NATIVE:
        assert getattr(hf, hf_name) == getattr(native, native_name), hf_name


def test_selection_rules_round_trip_under_names_generation_never_reads(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ffn=48, n_experts=4, top_k=2, max_seq_len=32,
                      selection="top_p", top_p=0.4, min_k=1, max_k=3)
    hf = AoEConfig.from_model_config(cfg)
    assert (hf.expert_selection, hf.router_top_p, hf.min_experts_per_tok, hf.max_experts_per_tok) == ("top_p", 0.4, 1, 3)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "top_p" not in saved and saved["router_top_p"] == 0.4
    assert AoEConfig.from_pretrained(tmp_path).to_model_config() == cfg
    ec = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ffn=48, n_experts=4, top_k=2, max_seq_len=32,
                     selection="expert_choice", capacity_factor=1.5, ec_inference="expert_choice")
    assert AoEConfig.from_model_config(ec).to_model_config() == ec
