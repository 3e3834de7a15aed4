"""The comparison report end to end: report.md content, plots, robustness, and results.json files
written before the newer keys existed (the committed docs/results/tiny-cpu)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from aoe.compare import report
from aoe.compare.report import headline_table, write_report

from ..synthetic import CLEAR_WIN, COMMAND, WITHIN_NOISE, make_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "results" / "tiny-cpu"


def test_report_module_keeps_its_names():
    assert set(report.__all__) >= {"write_report", "headline_table", "summarize", "read_metrics", "fmt", "fmt_si",
                                   "fmt_bytes", "fmt_mean_std", "VariantSummary"}
    assert all(hasattr(report, name) for name in report.__all__)


def test_report_content_two_seeds(clear_win):
    results, out, path, text = clear_win
    assert path == out / "report.md" and path.exists()
    assert f"```bash\n{COMMAND}\n```" in text
    # headline numbers: mean ± std of val loss per variant
    for name, vals in CLEAR_WIN.items():
        m = sum(vals) / len(vals)
        s = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1))
        assert f"{m:.4f} ± {s:.4f}" in text
    # Ent_load of the moe run, mean over its two layers, appears in the headline
    moe_run = next(r for r in results["runs"] if r["variant"] == "moe")
    ent = sum(l["ent_load"] for l in moe_run["layers"]) / 2
    assert f"{ent:.3f}" in text
    for section in ("## Machine", "## Corpus", "## Configuration", "## Results", "### Per layer", "## Verdict",
                    "## Definitions"):
        assert section in text
    assert "exceeds the seed spread" in text and "AoE is better than MoE" in text
    assert f"{3.805 - 4.01:+.4f}" in text  # AoE − MoE
    assert "AoE spreads tokens over its experts more evenly than MoE" in text
    assert "AoE chooses its experts more confidently than MoE" in text
    assert "|diff| > max(std_a, std_b)" in text  # the rule is stated
    for word in ("Perplexity", "Bits per byte", "Ent_load", "Ent_conf", "Params active", "FLOPs/token",
                 "Peak memory", "Unigram baseline", "Tokens/s"):
        assert f"**{word}**" in text
    assert "malformed line" in text  # the broken line in moe-s0 is noted, not fatal
    assert "(nan)" not in text.lower() and " nan " not in text.lower()


def test_plots_are_valid_pngs(clear_win):
    """Every plot decodes as an image of a readable size with something drawn on it (many colours,
    not a blank canvas), and the report links it."""
    import matplotlib.image
    import numpy as np

    _, out, _, text = clear_win
    expected = ["train_loss.png", "val_loss.png", "ent_load_layers.png", "ent_conf_layers.png",
                "load_heatmap_moe.png", "load_heatmap_aoe.png"]
    for name in expected:
        p = out / "plots" / name
        assert p.exists(), name
        assert p.read_bytes()[:8] == PNG_MAGIC
        pixels = matplotlib.image.imread(p)
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300, (name, pixels.shape)
        colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
        assert len(colours) > 50, (name, len(colours))  # lines, labels, ticks: not a blank canvas
        rgb = pixels[..., :3]
        coloured = ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2).mean()
        assert coloured > 0.001, (name, coloured)  # the data: coloured lines or cells, not grey axes alone
        assert f"(plots/{name})" in text
    assert not (out / "plots" / "load_heatmap_dense.png").exists()


def test_headline_table_lists_each_variant(clear_win):
    results = clear_win[0]
    table = headline_table(results)
    for label in ("Dense", "MoE", "AoE"):
        assert label in table
    assert f"{sum(CLEAR_WIN['aoe']) / 2:.4f}" in table
    assert table.count("\n") == 4  # header, separator, three rows


def test_report_within_noise(tmp_path):
    results = make_results(tmp_path, WITHIN_NOISE)
    text = write_report(results, tmp_path).read_text()
    assert "within the seed spread" in text and "cannot tell AoE and MoE apart" in text


def test_report_one_seed_missing_metrics_incomplete_run(tmp_path):
    failed = {"variant": "aoe", "seed": 1, "status": "failed", "error": "loss was NaN", "run_dir": "aoe-s1",
              "val_loss": None, "layers": []}
    results = make_results(tmp_path, {"dense": [4.1], "moe": [4.0], "aoe": [3.9]},
                           skip_metrics={("aoe", 0)}, extra_runs=[failed])
    results["corpus"]["unigram_entropy"] = float("nan")
    results["machine"]["device"] = None
    path = write_report(results, tmp_path)
    text = path.read_text()
    assert COMMAND in text
    assert "one seed per variant" in text and "cannot be judged" in text
    assert "metrics file missing" in text
    assert "Incomplete runs" in text and "failed" in text and "loss was NaN" in text
    assert "3.9000" in text and "4.0000" in text
    assert (tmp_path / "plots" / "train_loss.png").read_bytes()[:8] == PNG_MAGIC
    assert "AoE" in headline_table(results)


def test_report_survives_empty_and_dense_only(tmp_path):
    text = write_report({}, tmp_path / "empty").read_text()
    assert "No verdict" in text and "(command not recorded)" in text
    results = make_results(tmp_path / "d", {"dense": [4.1, 4.2], "moe": [4.0, 4.1], "aoe": [3.9, 4.0]})
    results["runs"] = [r for r in results["runs"] if r["variant"] == "dense"]
    text = write_report(results, tmp_path / "d").read_text()
    assert "No verdict" in text


def test_committed_old_schema_results_render(tmp_path, monkeypatch):
    """docs/results/tiny-cpu predates kind, baseline, lr and gate statistics: kinds come from the
    model.ffn= overrides, baselines from the rule, missing statistics are dashes. Drawn without
    matplotlib (hidden), which the report notes instead of failing."""
    for run_dir in DOCS.glob("*-s*"):
        (tmp_path / run_dir.name).mkdir()
        shutil.copy(run_dir / "metrics.jsonl", tmp_path / run_dir.name / "metrics.jsonl")
    results = json.loads((DOCS / "results.json").read_text())
    assert all("kind" not in v and "baseline" not in v for v in results["variants"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = write_report(results, tmp_path).read_text()
    assert "matplotlib is not installed" in text and not (tmp_path / "plots").exists()
    # the variants table: kind from the override, baseline by the rule, the base lr
    assert "| moe_factorized | MoE + factorized W_g | moe | moe | 0.002 |" in text
    assert "| aoe_dlow64 | AoE (d_low=64) | aoe | moe | 0.002 |" in text
    assert "| dense | Dense | dense | – | 0.002 |" in text and "| moe | MoE | moe | – | 0.002 |" in text
    # the committed report's numbers: headline verdict and every comparison against MoE
    assert "AoE − MoE = +0.2117 nats (MoE lower)" in text
    assert "| AoE | MoE | 4.4891 ± 0.0082 | 4.2774 ± 0.0257 | +0.2117 | exceeds the seed spread (MoE lower) |" in text
    assert "| MoE + large router | MoE | 4.2844 ± 0.0385 | 4.2774 ± 0.0257 | +0.0071 | within the seed spread |" in text
    assert "| Dense | MoE |" not in text  # dense variants have no baseline
    # the gap over training, from the logs: AoE − MoE at the first and the last evaluation
    assert "| AoE | MoE | 200 | +0.3399 | 1000 | +0.2117 | narrows |" in text
    # statistics the old files lack are dashes
    assert "| 0 | 1.541 ± 0.055 | 0.515 ± 0.158 | 2.59 ± 0.04 | – | – | – |" in text
    assert "| AoE | 0.835 ± 0.091 | – | – | – | – |" in text  # routing at the end of training
    assert "(nan)" not in text.lower()
