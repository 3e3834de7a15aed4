"""Per-variant aggregates over seeds, including the gate weights and dead experts."""

import math

import pytest

from aoe.compare.report.summary import pick, summarize

from ..synthetic import CLEAR_WIN, make_results


def test_summaries_hold_one_value_per_completed_run(tmp_path):
    summaries = summarize(make_results(tmp_path, CLEAR_WIN, new_schema=True))
    dense, moe, aoe = summaries
    assert [s.name for s in summaries] == ["dense", "moe", "aoe"]
    assert (dense.kind, moe.kind, aoe.kind) == ("dense", "moe", "aoe")
    assert (dense.baseline, moe.baseline, aoe.baseline) == (None, "dense", "moe")
    assert aoe.val_loss == CLEAR_WIN["aoe"] and aoe.lrs == [1e-2]
    assert aoe.gate_weight[0] == pytest.approx([0.60, 0.61]) and aoe.gate_weight[1] == pytest.approx([0.25, 0.26])
    assert aoe.gate_weight_sum == pytest.approx([0.85, 0.87])
    assert moe.dead_experts == [0.5, 1.5]  # mean over layers, per seed
    assert moe.per_layer[0].dead_experts == [1.0, 2.0] and moe.per_layer[1].gate_weight[0] == pytest.approx([0.7, 0.71])
    assert not dense.sparse and moe.sparse and moe.n_experts == 4
    assert all(math.isnan(x) for x in dense.gate_weight[0] + dense.dead_experts)


def test_pick_prefers_the_name_then_the_best_of_the_kind(tmp_path):
    results = make_results(tmp_path, CLEAR_WIN)
    for v in results["variants"]:
        if v["name"] == "aoe":
            v["name"] = "aoe_x"
    for r in results["runs"]:
        if r["variant"] == "aoe":
            r["variant"] = "aoe_x"
    summaries = summarize(results)
    assert pick(summaries, "aoe", "aoe").name == "aoe_x"
    assert pick(summaries, "moe", "moe").name == "moe"
    assert pick(summaries, "zzz", "none") is None
