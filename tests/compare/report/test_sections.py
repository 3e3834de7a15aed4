"""The report's newer sections, on synthetic results with every newer key: the learning-rate sweep,
per-comparison verdicts, the loss and routing over training, and the per-layer gate statistics."""

import math

import pytest

from aoe.compare.report import write_report
from aoe.compare.report.sections.training import trend
from aoe.compare.report.sections.verdict import judgement
from aoe.compare.report.stats import VERDICT_RULE, compare_means

from ..synthetic import CLEAR_WIN, GATE, VAL_AMPLITUDE, make_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mean_std(values, digits):
    m = sum(values) / len(values)
    s = math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1))
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def test_learning_rate_sweep_table_and_plot(new_schema):
    _, out, _, text = new_schema
    assert "## Learning-rate sweep" in text
    assert "trained 20 steps at each peak learning rate (0.001, 0.003, 0.01, 0.03), seed 0" in text
    assert "| variant | lr 0.001 | lr 0.003 | lr 0.01 | lr 0.03 | chosen lr |" in text
    assert "| Dense | 4.9000 | **4.6000** ✓ | 4.8000 | (failed) | 0.003 |" in text
    assert "| AoE | 4.5000 | 4.4000 | **4.3000** ✓ | – | 0.01 |" in text
    assert (out / "plots" / "lr_sweep.png").read_bytes()[:8] == PNG_MAGIC and "(plots/lr_sweep.png)" in text
    # the chosen lr is the one each variant's runs trained at
    assert "| aoe | AoE | aoe | moe | 0.01 (sweep) |" in text
    assert "| AoE | 0 | done | 40 | 0.01 |" in text


def test_no_sweep_section_without_a_sweep(clear_win):
    text = clear_win[3]
    assert "Learning-rate sweep" not in text and "lr_sweep.png" not in text
    assert "| aoe | AoE | aoe | moe | 0.001 |" in text  # old schema: the base lr, the derived baseline


def test_per_comparison_verdicts(new_schema):
    text = new_schema[3]
    moe, dense, aoe = (_mean_std(CLEAR_WIN[n], 4) for n in ("moe", "dense", "aoe"))
    # explicit baselines: MoE against Dense, AoE against MoE; the dense variant has none
    assert f"| MoE | Dense | {moe} | {dense} | -0.1000 | exceeds the seed spread (MoE lower) |" in text
    assert f"| AoE | MoE | {aoe} | {moe} | -0.2050 | exceeds the seed spread (AoE lower) |" in text
    assert "\n| Dense |" not in text.split("### Per comparison")[1].split("## Over training")[0]
    assert text.count(f"Rule: {VERDICT_RULE}.") == 1
    assert text.index("Rule: ") < text.index("### Per comparison")
    assert "AoE is better than MoE" in text  # the headline verdict stays


def test_verdict_words():
    assert judgement(compare_means([1.0, 1.1], [2.0, 2.1], "A", "B")) == "exceeds the seed spread (A lower)"
    assert judgement(compare_means([1.0, 2.0], [1.1, 2.1], "A", "B")) == "within the seed spread"
    assert judgement(compare_means([1.0], [2.0, 2.1], "A", "B")) == "not judged (fewer than 2 seeds)"
    assert judgement(compare_means([], [2.0], "A", "B")) == "no verdict (no completed run)"


def test_over_training_plots_and_gap_table(new_schema):
    _, out, _, text = new_schema
    assert "## Over training: where the loss comes from" in text
    for name in ("train_loss", "val_loss", "val_loss_gap", "ent_load_train", "ent_conf_train", "gate_weight_train",
                 "dead_experts_train"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name}.png)" in text
    # AoE − MoE per seed, with the synthetic val curves vl + amplitude * exp(-step / 10)
    base = sum(CLEAR_WIN["aoe"]) / 2 - sum(CLEAR_WIN["moe"]) / 2
    extra = VAL_AMPLITUDE["aoe"] - VAL_AMPLITUDE["moe"]
    first, last = base + extra * math.exp(-1), base + extra * math.exp(-4)
    assert f"| AoE | MoE | 10 | {first:+.4f} | 40 | {last:+.4f} | widens |" in text
    assert "| MoE | Dense | 10 | -0.1000 | 40 | -0.1000 | unchanged |" in text


def test_gap_trend_words():
    assert trend(0.3, 0.2) == "narrows" and trend(-0.1, -0.3) == "widens" and trend(0.1, -0.1) == "changes sign"
    assert trend(-0.1, -0.10000001) == "unchanged" and trend(float("nan"), 0.1) == "–"


def test_gate_weights_and_dead_experts_in_the_tables(new_schema):
    text = new_schema[3]
    top1, top2 = (_mean_std([g, g + 0.01], 3) for g in GATE["moe"])
    assert f"| 0 | 1.213 ± 0.000 | 1.200 ± 0.000 | 2.00 ± 0.00 | {top1} | {top2} | 1.5 ± 0.7 |" in text
    assert "| layer | Ent_load | Ent_conf | max/mean load | gate top-1 | gate top-2 | dead experts |" in text
    total = _mean_std([sum(GATE["aoe"]), sum(GATE["aoe"]) + 0.02], 3)
    assert f"| AoE | 0.550 ± 0.000 | {_mean_std([0.60, 0.61], 3)} | {_mean_std([0.25, 0.26], 3)} | {total} | 0.50 ± 0.71 |" in text
    assert "**Gate weight (top-1, top-2)**" in text and "residual stream" in text
    assert "**Dead experts**" in text and "received no token in the logged window" in text


def test_a_baseline_outside_the_study_is_noted(tmp_path):
    results = make_results(tmp_path, {"dense": [4.1], "moe": [4.0], "aoe": [3.9]}, new_schema=True)
    results["variants"][2]["baseline"] = "moe_aux"
    text = write_report(results, tmp_path).read_text()
    assert "aoe: its baseline 'moe_aux' is not a variant of this study; not compared." in text
    assert "| MoE | Dense | 4.0000 | 4.1000 | -0.1000 | not judged (fewer than 2 seeds) |" in text


@pytest.mark.parametrize("drop", ["gate_weight_mean", "dead_experts"])
def test_logs_without_the_newer_statistics_are_noted(tmp_path, drop):
    results = make_results(tmp_path, {"dense": [4.1], "moe": [4.0], "aoe": [3.9]}, new_schema=True)
    for path in tmp_path.glob("*/metrics.jsonl"):
        lines = path.read_text().replace(f'"{drop}"', '"renamed"')
        path.write_text(lines)
    text = write_report(results, tmp_path).read_text()
    assert f"the training logs hold no {drop}" in text
