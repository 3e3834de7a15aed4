"""The comparison report: statistics helpers, verdict rule, report.md content, plots, robustness."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aoe.compare.report import fmt, fmt_bytes, fmt_mean_std, fmt_si, headline_table, read_metrics, write_report
from aoe.compare.stats import compare_entropies, compare_means, ema, mean, std, stderr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMAND = "aoe compare --out runs/cmp model.d_model=64 train.max_steps=40 --seeds 0 1"
E = 4


def _layer(i: int, counts: list[int], ent_conf: float) -> dict:
    tot = sum(counts)
    q = [c / tot for c in counts]
    return {
        "layer": i,
        "kind": None,
        "ent_load": -sum(x * math.log(x) for x in q if x > 0),
        "ent_conf": ent_conf,
        "imbalance": max(counts) / (tot / len(counts)),
        "tokens_per_expert": counts,
    }


def make_results(tmp_path: Path, val_losses: dict[str, list[float]], skip_metrics=(), extra_runs=()) -> dict:
    """A consistent fake results dict plus metrics.jsonl files for dense, moe and aoe."""
    variants = [
        {"name": "dense", "label": "Dense", "description": "dense SwiGLU", "overrides": ["model.ffn=dense"]},
        {"name": "moe", "label": "MoE", "description": "router MoE, top-2 of 4", "overrides": ["model.ffn=moe"]},
        {"name": "aoe", "label": "AoE", "description": "AoE, d_low 16", "overrides": ["model.ffn=aoe"]},
    ]
    seeds = list(range(len(next(iter(val_losses.values())))))
    bytes_per_token = 3.5
    runs = []
    for v in variants:
        name = v["name"]
        for seed, vl in zip(seeds, val_losses[name]):
            if name == "dense":
                layers = []
            elif name == "moe":
                layers = [_layer(0, [400, 100, 200, 100], 1.2), _layer(1, [300, 300, 100, 100], 1.1)]
            else:
                layers = [_layer(0, [210, 190, 200, 200], 0.6), _layer(1, [220, 180, 200, 200], 0.5)]
            for l in layers:
                l["kind"] = None if name == "dense" else name
            run_dir = f"{name}-s{seed}"
            runs.append({
                "variant": name, "seed": seed, "status": "done", "run_dir": run_dir,
                "val_loss": vl, "perplexity": math.exp(vl), "bits_per_byte": vl / math.log(2) / bytes_per_token,
                "params_total": 1_234_567 if name != "dense" else 600_000,
                "params_active": 700_000 if name != "dense" else 600_000,
                "flops_per_token": 4_200_000, "tokens_per_s": 12345.6 + seed,
                "peak_memory_bytes": None, "train_time_s": 12.5, "steps": 40, "tokens": 40 * 8 * 32,
                "layers": layers,
            })
            if (name, seed) in skip_metrics:
                continue
            d = tmp_path / run_dir
            d.mkdir(parents=True, exist_ok=True)
            lines = []
            for step in range(1, 41):
                lines.append({
                    "step": step, "loss": vl + 3.0 * math.exp(-step / 10) + 0.01 * seed, "aux_loss": 0.0,
                    "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 12000.0, "mfu": float("nan"),
                    "layers": [dict(l, ent_load=l["ent_load"] * (1 - 0.2 * math.exp(-step / 10))) for l in layers],
                })
                if step % 10 == 0:
                    vv = vl + 2.0 * math.exp(-step / 10)
                    lines.append({"step": step, "val_loss": vv, "val_ppl": math.exp(vv), "val_bpb": 1.0})
            text = "\n".join(json.dumps(x) for x in lines) + "\n"
            if (name, seed) == ("moe", 0):
                text += "{not json\n"  # a truncated last line must be skipped
            (d / "metrics.jsonl").write_text(text)
    runs.extend(extra_runs)
    return {
        "command": COMMAND,
        "created": "2026-11-23T12:00:00Z",
        "machine": {"platform": "Linux-x86_64", "python": "3.11.9", "torch": "2.6.0", "device": "cpu", "threads": 2},
        "config": {
            "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn": "aoe", "d_ffn": 128, "n_experts": E,
                      "top_k": 2, "d_low": 16, "vocab_size": 512},
            "data": {"source": "stdlib", "vocab_size": 512},
            "train": {"max_steps": 40, "batch_size": 8, "seq_len": 32, "lr": 1e-3},
        },
        "corpus": {"source": "stdlib", "train_tokens": 100000, "val_tokens": 5000, "vocab_size": 512,
                   "unigram_entropy": 5.1, "unigram_cross_entropy": 5.3, "bytes_per_token": bytes_per_token},
        "variants": [v for v in variants],
        "seeds": seeds,
        "runs": runs,
    }


CLEAR_WIN = {"dense": [4.10, 4.12], "moe": [4.00, 4.02], "aoe": [3.80, 3.81]}
WITHIN_NOISE = {"dense": [4.10, 4.12], "moe": [4.00, 4.10], "aoe": [3.98, 4.08]}


@pytest.fixture(scope="module")
def clear_win(tmp_path_factory):
    out = tmp_path_factory.mktemp("clear")
    results = make_results(out, CLEAR_WIN)
    path = write_report(results, out)
    return results, out, path, path.read_text()


# --- helpers ---------------------------------------------------------------------------------------------


def test_stats_helpers_skip_missing_values():
    assert mean([1.0, None, float("nan"), 3.0]) == 2.0
    assert math.isnan(mean([None, float("nan")]))
    assert std([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert stderr([1.0, 2.0, 3.0]) == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(std([1.0])) and math.isnan(stderr([1.0, None]))
    sm = ema([1.0, 1.0, 1.0], 0.9)
    assert sm == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull toward 0 at the start


def test_formatting_is_robust():
    assert fmt(float("nan")) == "–" and fmt(None) == "–" and fmt("x") == "–"
    assert fmt(1.23456, 2) == "1.23"
    assert fmt_si(1_234_567) == "1.23 M" and fmt_si(None) == "–"
    assert fmt_bytes(None) == "–" and fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert fmt_mean_std([2.0]) == "2.0000"
    assert fmt_mean_std([1.0, 3.0], 2) == "2.00 ± 1.41"
    assert fmt_mean_std([None]) == "–"


def test_verdict_clear_win_within_noise_and_one_seed():
    win = compare_means([3.80, 3.81], [4.00, 4.02])
    assert win.exceeds is True
    assert win.diff == pytest.approx(-0.205)
    assert "exceeds the seed spread" in win.sentence and "AoE is better than MoE" in win.sentence

    noise = compare_means([3.98, 4.08], [4.00, 4.10])
    assert noise.exceeds is False
    assert "within the seed spread" in noise.sentence

    # |diff| beats the standard error but not the standard deviation: still within noise
    a, b = [1.0, 1.3, 1.0, 1.3], [1.15, 1.45, 1.15, 1.45]
    v = compare_means(a, b)
    assert abs(v.diff) > v.se_combined and abs(v.diff) <= max(v.std_a, v.std_b) and v.exceeds is False

    one = compare_means([3.8], [4.0])
    assert one.exceeds is None and "cannot be judged" in one.sentence and "no seed spread" in one.sentence

    none = compare_means([], [4.0])
    assert none.exceeds is None and "No verdict" in none.sentence


def test_entropy_sentence_words():
    s = compare_entropies(1.38, 1.30, 0.5, 1.1, max_entropy=math.log(4))
    assert "AoE spreads tokens over its experts more evenly than MoE" in s
    assert "AoE chooses its experts more confidently than MoE" in s
    assert "not available" in compare_entropies(float("nan"), 1.0, 0.5, 0.6)


def test_read_metrics_tolerates_bad_input(tmp_path):
    entries, problem = read_metrics(tmp_path / "nope" / "metrics.jsonl")
    assert entries == [] and "missing" in problem
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{broken\n\n')
    entries, problem = read_metrics(p)
    assert len(entries) == 1 and "2 malformed" in problem


# --- the report ------------------------------------------------------------------------------------------


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
    _, out, _, text = clear_win
    expected = ["train_loss.png", "val_loss.png", "ent_load_layers.png", "ent_conf_layers.png",
                "load_heatmap_moe.png", "load_heatmap_aoe.png"]
    for name in expected:
        p = out / "plots" / name
        assert p.exists(), name
        assert p.read_bytes()[:8] == PNG_MAGIC
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
