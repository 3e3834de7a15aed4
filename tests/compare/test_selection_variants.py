"""The study's selection-rule variants: they build, and match the top-k variants' parameters and
counted compute."""

import math

import pytest

from aoe.compare.variants import describe_variants, resolve_variants
from aoe.config import load_config

PAIRS = {"moe_topp_kE": "moe", "aoe_topp_kE": "aoe", "moe_ec": "moe", "aoe_ec": "aoe"}
BASELINES = {"moe_topp_kE": "moe", "aoe_topp_kE": "moe_topp_kE", "moe_ec": "moe", "aoe_ec": "moe_ec"}


@pytest.mark.parametrize("name", list(PAIRS))
def test_rule_variants_match_their_top_k_variant(name):
    base = load_config("tiny", [])
    variant, top_k = resolve_variants([name, PAIRS[name]], base.model)
    rule = load_config("tiny", list(variant.overrides)).model
    ref = load_config("tiny", list(top_k.overrides)).model
    assert rule.selection == ("top_p" if "topp" in name else "expert_choice")
    a, b = rule.ffn_config(0), ref.ffn_config(0)
    assert a.num_params() == b.num_params()
    assert a.num_active_params() == b.num_active_params() and a.flops_per_token() == b.flops_per_token()
    layer = a.build()
    if rule.selection == "top_p":  # p = k/E: never more than k experts
        assert layer.top_p == pytest.approx(rule.top_k / rule.n_experts) and layer.max_k == rule.top_k
    else:  # capacity 1 on the recipe's sequences: exactly top-k's rows
        n = load_config("tiny", []).train.seq_len
        c = math.ceil(layer.capacity_factor * n * rule.top_k / rule.n_experts)
        assert c * rule.n_experts == n * rule.top_k and layer.ec_inference == "top_k"
    assert variant.baseline == BASELINES[name]


@pytest.mark.parametrize("name", ["moe_topp", "aoe_topp"])
def test_paper_top_p_variants_train_as_the_paper(name):
    """p = 0.6 with Ent_conf as a loss at 1e-4, any number of experts per token."""
    variant, = resolve_variants([name], load_config("tiny", []).model)
    layer = load_config("tiny", list(variant.overrides)).model.ffn_config(0).build()
    assert (layer.selection, layer.top_p, layer.max_k, layer.entropy_loss_coef) == ("top_p", 0.6, layer.n_experts, 1e-4)
    assert variant.baseline == {"moe_topp": "moe", "aoe_topp": "moe_topp"}[name]


def test_rule_variants_are_listed():
    text = describe_variants()
    for name in [*PAIRS, "moe_topp", "aoe_topp", "moe_erc"]:
        assert name in text
