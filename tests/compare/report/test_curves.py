"""Curves against step from metrics entries, and their aggregates over seeds."""

import math

import pytest

from aoe.compare.report.curves import Curve, layer_mean, logged, over_seeds, paired_difference, smoothing_beta


def test_logged_keeps_the_last_value_of_a_repeated_step():
    entries = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val_loss": 2.5},
               {"step": 2, "loss": 1.5}, {"step": 3, "loss": None}, {"loss": 9.0}]
    c = logged(entries, "loss")
    assert c.steps == (1.0, 2.0, 3.0) and c.values[:2] == (3.0, 1.5) and math.isnan(c.values[2])
    assert logged(entries, "val_loss") == Curve((2.0,), (2.5,))
    assert not logged([], "loss")


def test_layer_mean_of_training_entries():
    entries = [
        {"step": 10, "loss": 2.0, "layers": [{"gate_weight_mean": [0.6, 0.2], "dead_experts": 1},
                                             {"gate_weight_mean": [0.8, 0.1], "dead_experts": 0}]},
        {"step": 10, "val_loss": 2.0, "layers": [{"dead_experts": 5}]},  # validation: not a training entry
        {"step": 20, "loss": 1.0, "layers": [{"ent_conf": 1.0}]},  # nothing recorded: left out
    ]
    assert layer_mean(entries, lambda l: l.gate_weight(0)) == Curve((10.0,), (pytest.approx(0.7),))
    assert layer_mean(entries, lambda l: l.gate_weight(1)).values == (pytest.approx(0.15),)
    assert layer_mean(entries, lambda l: l.dead) == Curve((10.0,), (0.5,))


def test_over_seeds_on_common_steps_and_fallback():
    a, b = Curve((1.0, 2.0, 3.0), (1.0, 2.0, 3.0)), Curve((2.0, 3.0), (4.0, 5.0))
    band = over_seeds([a, b])
    assert band.steps == (2.0, 3.0) and band.mean == (3.0, 4.0) and band.lo == (2.0, 3.0) and band.hi == (4.0, 5.0)
    assert band.spread and not over_seeds([a]).spread
    disjoint = over_seeds([Curve((1.0,), (1.0,)), Curve((5.0, 6.0), (2.0, 3.0))])
    assert disjoint.steps == (5.0, 6.0)  # the longest curve alone
    assert not over_seeds([])


def test_paired_difference_pairs_seeds_and_steps():
    variant = {0: Curve((10.0, 20.0), (3.0, 2.5)), 1: Curve((10.0, 20.0), (3.2, 2.7)), 2: Curve((10.0,), (9.0,))}
    baseline = {0: Curve((10.0, 20.0, 30.0), (2.8, 2.45, 2.4)), 1: Curve((10.0, 20.0), (3.1, 2.6))}
    band = paired_difference(variant, baseline)  # seed 2 has no baseline run: left out
    assert band.steps == (10.0, 20.0)
    assert band.mean == pytest.approx((0.15, 0.075)) and band.lo == pytest.approx((0.1, 0.05))
    assert band.hi == pytest.approx((0.2, 0.1))
    assert not paired_difference(variant, {5: baseline[0]})


def test_smoothing_beta_steps():
    assert [smoothing_beta(n) for n in (5, 15, 50, 200)] == [0.5, 0.8, 0.9, 0.95]
