"""``aoe compare --suite paper-table2``: the paper's 12 configurations scaled to a base recipe, and
the report's table in Table 2's layout."""

import pytest

from aoe.compare.report import write_report
from aoe.compare.suites import TABLE2, paper_table2, resolve_suite, table2_ranks
from aoe.config import ConfigError, ModelConfig, load_config
from aoe.model import Transformer


def test_ranks_keep_the_papers_ratios_and_are_exact_at_its_width():
    assert table2_ranks(768) == (64, 128, 256, 512)
    assert table2_ranks(128) == (8, 24, 40, 88)  # 10.7, 21.3, 42.7, 85.3 to multiples of 8
    assert table2_ranks(48) == (4, 8, 16, 32)  # multiples of 8 would make 4 and 8 both 8
    with pytest.raises(ConfigError, match="d_model=6"):
        table2_ranks(6)


def test_suite_numbers_its_variants_as_the_paper_and_compares_like_with_like():
    suite = paper_table2(ModelConfig(d_model=128, n_heads=4, d_ffn=256))
    assert [suite.numbers[v.name] for v in suite.variants] == list(range(1, 13))
    assert [v.label.split(" d_low")[0] for v in suite.variants] == [
        TABLE2[n][0].split(" d_low")[0] for n in range(1, 13)]
    aux = {v.name: "model.aux_loss_coef=0.01" in v.overrides for v in suite.variants}
    assert [aux[v.name] for v in suite.variants] == [False, True, True, True] + [False, True] * 4
    for v in suite.variants[2:]:  # with L_aux against MoE + L_aux, without against MoE
        assert v.baseline == ("moe_aux" if aux[v.name] else "moe"), v.name
    with pytest.raises(ConfigError, match="--suite 'table9'"):
        resolve_suite("table9", ModelConfig())


def _params(overrides):
    """Parameters of one FFN layer (the embeddings would hide a 1% difference)."""
    cfg = load_config("tiny", ["model.n_layers=1", "model.vocab_size=4096", *overrides])
    return sum(p.numel() for p in Transformer(cfg.model).layers[0].ffn.parameters())


def test_every_sparse_configuration_has_the_moes_parameters_within_one_percent():
    suite = paper_table2(load_config("tiny").model)
    moe = _params(suite.variants[0].overrides)
    for v in suite.variants[1:]:
        assert abs(_params(v.overrides) - moe) <= 0.01 * moe, v.name


def _results(suite, losses, downstream=None):
    runs = [{"variant": v.name, "seed": s, "status": "done", "val_loss": losses[v.name] + 0.01 * s,
             "layers": [], **({"downstream": downstream[v.name]} if downstream and v.name in downstream else {})}
            for v in suite.variants for s in (0, 1)]
    return {"config": {"model": {"d_model": 128}, "train": {"lr": 1e-3}}, "suite": suite.as_dict(),
            "variants": [v.as_dict() for v in suite.variants], "seeds": [0, 1], "runs": runs}


def test_report_sets_our_losses_beside_the_papers_averages(tmp_path):
    suite = paper_table2(load_config("tiny").model)
    losses = {v.name: 4.0 - 0.01 * i for i, v in enumerate(suite.variants)}
    text = write_report(_results(suite, losses, {"aoe_dlow40_aux": {"piqa": 0.55, "arc_easy": 0.3}}),
                        tmp_path).read_text()
    assert "## The paper's Table 2 beside this study" in text
    row10 = next(line for line in text.splitlines() if line.startswith("| 10 | AoE d_low 256 + L_aux"))
    assert "AoE d_low 40 + L_aux" in row10 and "3.9150 ± 0.0071" in row10 and "44.46" in row10
    assert "-0.0900" in row10 or "−0.0900" in row10  # 9 rows below MoE's 4.0
    assert "+1.18" in row10  # 44.46 - 43.28
    scored = next(line for line in text.splitlines() if line.startswith("| 10 | AoE d_low 40 + L_aux |"))
    assert "55.00" in scored and "30.00" in scored


def test_a_study_without_the_suite_has_no_paper_table(tmp_path):
    suite = paper_table2(load_config("tiny").model)
    results = _results(suite, {v.name: 4.0 for v in suite.variants})
    del results["suite"]
    assert "Table 2 beside" not in write_report(results, tmp_path).read_text()


def test_compare_refuses_a_suite_with_variants_before_training(tmp_path):
    from aoe.compare.runner import run_comparison

    with pytest.raises(ConfigError, match="--suite or --variants"):
        run_comparison(tmp_path / "cmp", suite="paper-table2", variants=["moe"], progress=False)
    assert not (tmp_path / "cmp").exists()


def test_compare_scores_each_finished_run_once_on_multiple_choice_files(tmp_path, cache_dir, one_thread, monkeypatch):
    """--mc: every run's final model scored, the accuracy stored per run and shown in the paper's
    column named by the file's stem; a second invocation reuses the runs and their scores."""
    import json

    from aoe.compare.downstream import plan_downstream
    from aoe.compare.runner import run_comparison
    from helpers.tiny_runs import tiny_overrides

    examples = [{"context": "def f(x):\n    return", "choices": ["x", "(((("], "label": 0},
                {"context": "import", "choices": ["os", ")))"], "label": 0},
                {"context": "for i in", "choices": ["range(3):", "]]"], "label": 1}]
    mc = tmp_path / "piqa.jsonl"
    mc.write_text("".join(json.dumps(e) + "\n" for e in examples))
    plan = plan_downstream([str(mc)])
    overrides = tiny_overrides(cache_dir, **{"train.max_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2})
    out = tmp_path / "cmp"
    results = run_comparison(out, "tiny", overrides, ["moe"], [0], progress=False, downstream=plan)
    acc = results["runs"][0]["downstream"]["piqa"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
    import aoe.compare.runner as runner

    calls = []
    monkeypatch.setattr(runner, "score_run", lambda *a, **k: calls.append(a))
    again = run_comparison(out, "tiny", overrides, ["moe"], [0], progress=False, downstream=plan)
    assert calls == [] and again["runs"][0]["downstream"] == {"piqa": acc}
    with pytest.raises(ConfigError, match="no such file"):
        plan_downstream([str(tmp_path / "nope.jsonl")])
