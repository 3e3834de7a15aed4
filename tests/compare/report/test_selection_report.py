"""The report's selection-rule table: experts per token and unchosen tokens, per layer, from the
runs' last training window (metrics.jsonl) and their validation statistics (results.json)."""

import json

from aoe.compare.report.results import LayerStats
from aoe.compare.report.sections.tables import per_layer, selection_rules
from aoe.compare.report.study import Study


def _layer(i, hist, causal, rule="expert_choice"):
    n = sum(hist)
    return {"layer": i, "kind": "aoe", "ent_load": 1.0, "ent_conf": 1.0, "imbalance": 1.0,
            "tokens_per_expert": [1, 1], "gate_weight_mean": [0.5, 0.2], "dead_experts": 0, "selection": rule,
            "experts_per_token": sum(j * h for j, h in enumerate(hist)) / n, "experts_per_token_hist": hist,
            "unchosen_tokens": hist[0], "causal": causal}


def _results(tmp_path):
    runs = []
    for seed, hist in ((0, [2, 4, 2]), (1, [0, 8, 0])):
        run_dir = tmp_path / f"aoe_ec-{seed}"
        run_dir.mkdir()
        train = {"step": 10, "loss": 4.0, "layers": [_layer(0, hist, False), _layer(1, [1, 6, 1], False)]}
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 5.0}) + "\n" + json.dumps(train) + "\n")
        val = [_layer(0, [0, 0, 8], True), _layer(1, [0, 0, 8], True)]
        runs.append({"variant": "aoe_ec", "seed": seed, "status": "done", "run_dir": run_dir.name, "val_loss": 4.1,
                     "layers": val})
    runs.append({"variant": "aoe", "seed": 0, "status": "done", "val_loss": 4.2,
                 "layers": [{k: v for k, v in _layer(0, [0, 0, 8], True).items() if k in
                             ("layer", "kind", "ent_load", "ent_conf", "imbalance", "tokens_per_expert")}]})
    return {"variants": [{"name": "aoe_ec", "label": "AoE (expert choice)", "overrides": [], "kind": "aoe"},
                         {"name": "aoe", "label": "AoE", "overrides": [], "kind": "aoe"}],
            "seeds": [0, 1], "runs": runs}


def test_rule_table_from_training_logs_and_validation(tmp_path):
    text = "\n".join(selection_rules(Study.load(_results(tmp_path), tmp_path)))
    assert "### Selection rules" in text and "**AoE (expert choice)** (`aoe_ec`)" in text
    assert "**AoE** (`aoe`)" not in text  # a top-k variant has no such table
    # layer 0: training mean 1.0 in both seeds; pooled histogram 2/12/2 of 16; unchosen 2/8 and 0/8
    assert "| 0 | 1.00 ± 0.00 | 0.12 / 0.75 / 0.12 | 0.125 ± 0.177 | 2.00 ± 0.00 | causal (top-k) |" in text


def test_old_layer_records_read_without_the_rule_fields():
    stats = LayerStats.from_dict({"layer": 0, "ent_load": 1.0})
    assert stats.selection is None and stats.causal is None and stats.experts_per_token_hist == ()
    assert stats.unchosen_share != stats.unchosen_share  # NaN


def test_the_per_layer_section_carries_the_rule_table(tmp_path):
    study = Study.load(_results(tmp_path), tmp_path)
    lines = per_layer(study, _NoFigures())
    assert "### Selection rules" in lines


class _NoFigures:
    def markdown(self, *names):
        return []
