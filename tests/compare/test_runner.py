"""`aoe compare` end to end on a tiny model: matched variants, results.json, report, resuming."""

import json

import pytest

from aoe.compare.runner import run_comparison
from aoe.compare.variants import DEFAULT_VARIANTS, resolve_variants
from aoe.config import ConfigError, ModelConfig

from helpers.tiny_runs import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster and steadier


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


def test_runs_finished_by_other_invocations_are_reused_not_retrained(tmp_path, cache_dir, monkeypatch):
    """One invocation per seed (e.g. two processes), then one for both: the second seed's
    invocation rewrote results.json without the first's runs, and the combined one rebuilds their
    entries from the run directories (peak memory measured again) instead of training them."""
    import aoe.compare.runner as runner

    overrides = tiny_overrides(cache_dir, **{"train.max_steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3})
    out = tmp_path / "cmp"
    first = run_comparison(out, "tiny", overrides, ["moe"], [0], progress=False, report=False)
    run_comparison(out, "tiny", overrides, ["moe"], [1], progress=False, report=False)
    assert [(r["variant"], r["seed"]) for r in json.loads((out / "results.json").read_text())["runs"]] == [("moe", 1)]
    trained = []
    real = runner._train_one
    monkeypatch.setattr(runner, "_train_one", lambda cfg, run_dir, data, progress: trained.append(run_dir.name)
                        or real(cfg, run_dir, data, progress))
    both = run_comparison(out, "tiny", overrides, ["moe"], [0, 1], progress=False, report=False)
    assert trained == []
    entry = both["runs"][0]
    assert (entry["variant"], entry["seed"], entry["val_loss"]) == ("moe", 0, first["runs"][0]["val_loss"])
    assert entry["peak_memory_bytes"] == first["runs"][0]["peak_memory_bytes"]


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


def test_factorized_gate_variants_are_parameter_matched_to_their_baselines():
    from aoe.config import load_config
    from aoe.model import Transformer

    variants = {v.name: v for v in resolve_variants(
        ["moe", "aoe", "moe_factorized", "moe_factorized_balanced", "moe_factorized_nowd", "aoe_balanced", "aoe_factor_nowd",
         "aoe_factorlr2", "dense_active", "dense_factorized"], ModelConfig())}

    def count(name):
        cfg = load_config("tiny", ["model.vocab_size=4096", *variants[name].overrides])
        return Transformer(cfg.model).num_params(include_embedding=False)

    for name, v in variants.items():
        if v.baseline is not None:
            assert abs(count(name) - count(v.baseline)) / count(v.baseline) < 0.01, name
    assert variants["dense_factorized"].baseline == "dense_active" and variants["dense_factorized"].kind == "dense"
    assert "train.factor_lr_scale=2" in variants["aoe_factorlr2"].overrides
    for bad in ("aoe_factorlr0", "aoe_factorlr-1", "aoe_factorlrnan", "aoe_factorlr"):
        with pytest.raises(ConfigError, match="unknown variant"):
            resolve_variants([bad], ModelConfig())


def test_lr_sweep_chooses_each_variants_lr_and_resumes(tmp_path, cache_dir, monkeypatch):
    import aoe.compare.runner as runner

    overrides = tiny_overrides(cache_dir, **{"train.max_steps": 3, "train.eval_every": 0, "train.checkpoint_every": 0})
    out = tmp_path / "cmp"
    results = run_comparison(out, "tiny", overrides, ["moe", "aoe"], [5], progress=False, lr_sweep=[1e-4, 3e-3],
                             sweep_steps=2)
    sweep = results["sweep"]
    assert sweep["lrs"] == [1e-4, 3e-3] and sweep["steps"] == 2 and sweep["seed"] == 5
    assert [(r["variant"], r["lr"]) for r in sweep["runs"]] == [("moe", 1e-4), ("moe", 3e-3), ("aoe", 1e-4), ("aoe", 3e-3)]
    for name in ("moe", "aoe"):
        losses = {r["lr"]: r["val_loss"] for r in sweep["runs"] if r["variant"] == name}
        assert sweep["chosen"][name] == min(losses, key=losses.get)
        summary = json.loads((out / "sweep" / f"{name}-lr{sweep['chosen'][name]:g}" / "summary.json").read_text())
        assert summary["step"] == 2 and summary["val_loss"] == losses[sweep["chosen"][name]]
    for run in results["runs"]:
        assert run["lr"] == sweep["chosen"][run["variant"]] and run["steps"] == 3
    assert {v["name"]: v["lr"] for v in results["variants"]} == sweep["chosen"]

    trained = []
    monkeypatch.setattr(runner, "_fit", lambda *a, **k: trained.append(a[1]) or pytest.fail("retrained"))
    again = run_comparison(out, "tiny", overrides, ["moe", "aoe"], [5], progress=False, lr_sweep=[1e-4, 3e-3],
                           sweep_steps=2)
    assert trained == [] and again["sweep"]["chosen"] == sweep["chosen"]
    with pytest.raises(ConfigError, match="learning-rate sweep|--lr-sweep"):
        run_comparison(out, "tiny", overrides, ["moe"], [5], progress=False, lr_sweep=[1e-4], sweep_steps=2)
    with pytest.raises(ConfigError, match="--lr-sweep"):
        run_comparison(out, "tiny", overrides, ["moe"], [5], progress=False)


def test_sweep_records_a_diverged_run_and_does_not_retry_it(tmp_path):
    from aoe.compare.sweep import SweepPlan, choose_lr, run_sweep
    from aoe.train.trainer import TrainingError

    variants = resolve_variants(["moe"], ModelConfig())
    calls = []

    def train(cfg, run_dir):
        calls.append(cfg.train.lr)
        if cfg.train.lr > 1:
            raise TrainingError("non-finite loss at step 1")
        return {"step": cfg.train.max_steps, "val_loss": 5.0 - cfg.train.lr}

    plan = SweepPlan((0.5, 2.0), 3, 0)
    first = run_sweep(plan, variants, "tiny", ["model.vocab_size=4096"], tmp_path, train, progress=False)
    assert [r["status"] for r in first["runs"]] == ["done", "diverged"] and first["chosen"] == {"moe": 0.5}
    calls.clear()
    again = run_sweep(plan, variants, "tiny", ["model.vocab_size=4096"], tmp_path, train, previous=first, progress=False)
    assert calls == [0.5] and again["runs"][1]["status"] == "diverged"  # 0.5 has no summary.json here: trained again
    runs = [{"variant": "a", "lr": lr, "status": "done", "val_loss": v} for lr, v in ((1.0, 2.0), (0.1, 2.0), (3.0, None))]
    assert choose_lr(runs, "a") == 0.1  # a tie goes to the smaller lr; None is no result
    for bad in ((), (0.0,), (1.0, 1.0), (float("nan"),)):
        with pytest.raises(ConfigError):
            SweepPlan(bad, 3, 0)
