"""`aoe compare` end to end on a tiny model: matched variants, results.json, report, resuming."""

import json

import pytest

from aoe.compare.runner import run_comparison
from aoe.compare.variants import DEFAULT_VARIANTS, resolve_variants
from aoe.config import ConfigError, ModelConfig

from .conftest import tiny_overrides


def test_default_suite_is_parameter_matched(make_cfg):
    from aoe.config import load_config
    from aoe.model import Transformer

    counts = {}
    names = [*DEFAULT_VARIANTS, "moe_factorized", "moe_large_router"]
    for v in resolve_variants(names, ModelConfig()):
        cfg = load_config("tiny", ["model.vocab_size=4096", *v.overrides])
        counts[v.name] = Transformer(cfg.model).num_params(include_embedding=False)
    assert list(counts) == names
    for name, n in counts.items():
        assert abs(n - counts["moe"]) / counts["moe"] < 0.01, (name, n, counts["moe"])
    with pytest.raises(ConfigError, match="unknown variant 'moo'"):
        resolve_variants(["moo"], ModelConfig())


def test_compare_writes_results_and_report_and_resumes(tmp_path, cache_dir, monkeypatch):
    overrides = tiny_overrides(cache_dir, **{"train.max_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2})
    out = tmp_path / "cmp"
    results = run_comparison(out, "tiny", overrides, ["moe", "aoe"], [0, 1], progress=False, command="aoe compare test")
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"] == "aoe compare test"
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [("moe", 0), ("aoe", 0), ("moe", 1), ("aoe", 1)]
    for run in saved["runs"]:
        assert run["status"] == "done" and run["steps"] == 4 and run["val_loss"] > 0
        assert run["peak_memory_bytes"] > 0 and len(run["layers"]) == 2
        assert (out / run["run_dir"] / "metrics.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert "aoe compare test" in report and "Ent_conf" in report
    assert (out / "plots" / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # identical data and schedule across variants: the same first batch, hence the same token count
    assert len({r["tokens"] for r in saved["runs"]}) == 1

    # an interrupted comparison: one run lost its summary; only that run is trained again
    (out / "aoe-s1" / "summary.json").unlink()
    trained = []
    import aoe.compare.runner as runner

    real = runner._train_one
    monkeypatch.setattr(runner, "_train_one", lambda cfg, run_dir, data, progress: trained.append(run_dir.name)
                        or real(cfg, run_dir, data, progress))
    again = run_comparison(out, "tiny", overrides, ["moe", "aoe"], [0, 1], progress=False)
    assert trained == ["aoe-s1"]
    assert [r["val_loss"] for r in again["runs"]] == pytest.approx([r["val_loss"] for r in results["runs"]])

    with pytest.raises(ConfigError, match="another base config"):
        run_comparison(out, "tiny", [*overrides, "train.lr=1e-3"], ["moe"], [0], progress=False)


def test_same_config_tolerates_keys_added_since_at_their_defaults():
    from aoe.compare.runner import same_config
    from aoe.config import config_to_dict, load_config

    new = config_to_dict(load_config("tiny", ["train.max_steps=7"]))
    old = {s: dict(v) for s, v in new.items()}
    del old["model"]["qk_norm"]  # a results.json written before the key existed
    assert same_config(old, new)
    assert not same_config(old, config_to_dict(load_config("tiny", ["train.max_steps=7", "model.qk_norm=head"])))
    assert not same_config(old, config_to_dict(load_config("tiny", ["train.max_steps=8"])))
    old["model"]["removed_key"] = 1
    assert not same_config(old, new)
