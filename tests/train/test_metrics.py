"""Routing statistics accumulated over forwards, against values computed by hand."""

import math

import pytest
import torch

from aoe import AoE
from aoe.nn.balance import RoutingInfo
from aoe.train.metrics import RoutingStats


def _info(indices, weights, n_experts):
    idx = torch.tensor(indices)
    probs = torch.full((len(indices), n_experts), 1.0 / n_experts)
    return RoutingInfo(expert_indices=idx, gate_weights=torch.tensor(weights), probs=probs,
                       tokens_per_expert=torch.bincount(idx.flatten(), minlength=n_experts))


def test_gate_weight_means_are_sorted_per_token_and_dead_experts_counted():
    layer = AoE(8, 2, 4, 2, d_wide=8)
    stats = RoutingStats(torch.nn.ModuleList([layer]))
    layer.last_routing = _info([[0, 1], [1, 0]], [[0.5, 0.25], [0.125, 0.375]], 4)
    stats.collect()
    layer.last_routing = _info([[1, 0]], [[0.25, 0.5]], 4)
    stats.collect()
    (row,) = stats.summary()
    # per token, largest first: (0.5, 0.25), (0.375, 0.125), (0.5, 0.25)
    assert row["gate_weight_mean"] == pytest.approx([(0.5 + 0.375 + 0.5) / 3, (0.25 + 0.125 + 0.25) / 3])
    assert row["tokens_per_expert"] == [3, 3, 0, 0] and row["dead_experts"] == 2
    assert row["ent_load"] == pytest.approx(math.log(2))


def test_nothing_collected_reports_no_dead_experts():
    stats = RoutingStats(torch.nn.ModuleList([AoE(8, 2, 4, 2, d_wide=8)]))
    (row,) = stats.summary()
    assert row["dead_experts"] is None and all(math.isnan(g) for g in row["gate_weight_mean"])


def test_gate_weight_means_of_a_real_forward():
    layer = AoE(16, 4, 4, 2, d_wide=16)
    stats = RoutingStats(torch.nn.ModuleList([layer]))
    layer(torch.randn(50, 16))
    stats.collect()
    (row,) = stats.summary()
    top = layer.last_routing.gate_weights.sort(-1, descending=True).values.double().mean(0)
    assert row["gate_weight_mean"] == pytest.approx(top.tolist())
    assert row["gate_weight_mean"][0] >= row["gate_weight_mean"][1]


def test_layer_indices_come_from_the_blocks():
    from aoe.config import ModelConfig
    from aoe.model import Transformer

    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, d_ffn=24, n_experts=4, top_k=2,
                                    d_low=4, dense_layers=[1]))
    stats = RoutingStats(model)
    assert [i for i, _ in stats.layers] == [0, 2]
    assert [layer for _, layer in stats.layers] == [model.layers[0].ffn, model.layers[2].ffn]


def test_dynamic_rules_report_experts_per_token_and_unchosen_tokens():
    from aoe import MoE

    layer = MoE(8, 8, 4, 2, selection="expert_choice", capacity_factor=0.5)
    stats = RoutingStats(torch.nn.ModuleList([layer]))
    layer(torch.randn(2, 6, 8))
    stats.collect()
    first = layer.last_routing.experts_per_token_counts()
    layer(torch.randn(1, 6, 8))
    stats.collect()
    counts = torch.cat([first, layer.last_routing.experts_per_token_counts()])
    (row,) = stats.summary()
    hist = torch.bincount(counts, minlength=5).tolist()
    assert row["selection"] == "expert_choice" and row["causal"] is False
    assert row["experts_per_token_hist"] == hist and row["unchosen_tokens"] == hist[0]
    assert row["experts_per_token"] == pytest.approx(counts.double().mean().item())
    assert len(row["gate_weight_mean"]) == 4  # a token can use every expert
    # capacity factor 0.5 of a 6-token sequence: ceil(0.5 * 6 * 2 / 4) = 2 tokens per expert
    assert sum(row["tokens_per_expert"]) == 3 * 4 * 2
    layer.eval()  # ec_inference="top_k": evaluation routes by top-k, causally
    stats.reset()
    layer(torch.randn(3, 6, 8))
    stats.collect()
    (row,) = stats.summary()
    assert row["causal"] is True and row["experts_per_token"] == 2.0 and row["unchosen_tokens"] == 0


def test_top_k_layers_keep_their_keys():
    layer = AoE(8, 2, 4, 2, d_wide=8)
    stats = RoutingStats(torch.nn.ModuleList([layer]))
    layer(torch.randn(5, 8))
    stats.collect()
    (row,) = stats.summary()
    assert set(row) == {"layer", "kind", "tokens_per_expert", "ent_load", "ent_conf", "imbalance",
                        "gate_weight_mean", "dead_experts"}
