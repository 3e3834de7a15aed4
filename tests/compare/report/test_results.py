"""Typed results: every key read tolerantly, and the kind and baseline of files that predate them."""

import json
import math
from pathlib import Path

import pytest

from aoe.compare.report.results import Results, Sweep

DOCS = Path(__file__).resolve().parents[3] / "docs" / "results" / "tiny-cpu" / "results.json"


def _results(variants, runs=(), ffn="aoe", lr=2e-3, **extra):
    return Results.from_dict({"config": {"model": {"ffn": ffn}, "train": {"lr": lr}}, "variants": variants,
                              "runs": list(runs), **extra})


def test_committed_old_schema_kinds_from_overrides_and_baselines_by_rule():
    res = Results.from_dict(json.loads(DOCS.read_text()))
    kinds = {v.name: v.kind for v in res.variants}
    assert kinds == {"dense": "dense", "moe": "moe", "moe_aux": "moe", "aoe": "aoe", "aoe_aux": "aoe",
                     "aoe_renorm": "aoe", "aoe_dlow64": "aoe", "moe_factorized": "moe", "moe_large_router": "moe"}
    baselines = {v.name: v.baseline for v in res.variants}
    assert baselines["dense"] is None and baselines["moe"] is None
    assert all(baselines[n] == "moe" for n in kinds if n not in ("dense", "moe"))
    assert all(v.lr is None for v in res.variants)
    assert {r.lr for r in res.runs} == {0.002}  # no "lr" in the runs: the base config's train.lr
    assert res.sweep is None and len(res.runs) == 18
    assert res.runs[2].layers[0].gate_weight_mean == () and res.runs[2].layers[0].dead_experts is None
    assert math.isnan(res.runs[2].layers[0].gate_weight(0)) and math.isnan(res.runs[2].layers[0].dead)


def test_kind_comes_from_the_override_or_the_base_config_never_the_name():
    res = _results([{"name": "aoe_like", "overrides": ["model.ffn=moe", "model.d_ffn=10"]},
                    {"name": "moe_named", "overrides": ["model.d_low=8"]},
                    {"name": "dense_ish", "overrides": ["model.ffn=aoe", "model.ffn=dense"]}])  # the last one wins
    assert [(v.name, v.kind) for v in res.variants] == [("aoe_like", "moe"), ("moe_named", "aoe"), ("dense_ish", "dense")]
    assert [v.baseline for v in res.variants] == [None, None, None]  # no variant "moe" in this study
    res = _results([{"name": "x"}], ffn="moe")
    assert res.variants[0].kind == "moe"
    assert _results([{"name": "x"}], ffn="sparse?").variants[0].kind == "unknown"


def test_new_keys_are_taken_as_written():
    res = _results([
        {"name": "moe", "overrides": ["model.ffn=moe"], "kind": "moe", "baseline": "dense", "lr": 3e-3},
        {"name": "dense", "overrides": ["model.ffn=dense"], "kind": "dense", "baseline": None, "lr": None},
        {"name": "aoe", "overrides": [], "kind": "aoe", "baseline": None},  # explicitly none: not derived
        {"name": "odd", "kind": "bogus", "overrides": ["model.ffn=aoe"]},  # an unknown kind: derived
    ], runs=[{"variant": "moe", "seed": 0, "status": "done", "lr": 3e-3}, {"variant": "ghost", "seed": 0}])
    v = {x.name: x for x in res.variants}
    assert (v["moe"].kind, v["moe"].baseline, v["moe"].lr) == ("moe", "dense", 3e-3)
    assert v["dense"].baseline is None and v["dense"].lr is None
    assert v["aoe"].baseline is None
    assert v["odd"].kind == "aoe" and v["odd"].baseline == "moe"
    assert v["ghost"].kind == "aoe" and v["ghost"].baseline == "moe"  # only in the runs: base config
    assert res.runs[0].lr == 3e-3 and res.runs[1].lr == 2e-3 and res.runs[1].status == "unknown"


def test_odd_entries_are_tolerated():
    res = Results.from_dict({"variants": ["x", {"label": "no name"}, {"name": "a", "overrides": None}],
                             "runs": [7, {"variant": "a", "seed": "zero", "val_loss": "low",
                                          "layers": [None, {"layer": 1.0, "gate_weight_mean": [0.5, None, "x"],
                                                            "dead_experts": 1.5}]}],
                             "seeds": [0, "1", 2.0], "sweep": "none", "config": [1]})
    assert [v.name for v in res.variants] == ["a"] and res.sweep is None and res.seeds == (0, 2)
    run = res.runs[0]
    assert run.seed is None and math.isnan(run.val_loss) and math.isnan(run.lr) and len(run.layers) == 1
    layer = run.layers[0]
    assert layer.layer == 1 and layer.gate_weight(0) == 0.5 and math.isnan(layer.gate_weight(1))
    assert layer.dead_experts is None
    assert Results.from_dict(None).runs == () and Results.from_dict(res) is res


def test_sweep_lookup_chosen_and_lowest():
    sweep = Sweep.from_dict({
        "lrs": [3e-3, 1e-3], "steps": 20, "seed": 1, "chosen": {"moe": 1e-3},
        "runs": [{"variant": "moe", "lr": 1e-3, "status": "done", "val_loss": 4.2},
                 {"variant": "moe", "lr": 3e-3, "status": "done", "val_loss": 4.1},
                 {"variant": "aoe", "lr": 3e-3, "status": "done", "val_loss": 4.3},
                 {"variant": "aoe", "lr": 1e-2, "status": "failed", "val_loss": None}],
    })
    assert sweep.lrs == (1e-3, 3e-3, 1e-2)  # sorted; an lr only a run mentions gets a column
    assert (sweep.steps, sweep.seed) == (20, 1)
    assert sweep.run("moe", 3e-3).val_loss == 4.1 and sweep.run("aoe", 1e-3) is None
    assert sweep.chosen_lr("moe") == 1e-3  # as recorded, even though 3e-3 has the lower loss
    assert sweep.lowest("moe") == 3e-3
    assert sweep.chosen_lr("aoe") == 3e-3  # not recorded: the lowest completed run
    assert sweep.chosen_lr("dense") is None


@pytest.mark.parametrize("baseline", ["moe", "dense"])
def test_a_variant_is_never_its_own_baseline(baseline):
    res = _results([{"name": "moe", "overrides": ["model.ffn=moe"], "baseline": "moe"},
                    {"name": "dense", "overrides": ["model.ffn=dense"], "baseline": baseline}])
    assert res.variants[0].baseline is None
    assert res.variants[1].baseline == (None if baseline == "dense" else "moe")
