"""Statistics helpers and the verdict rule."""

import math

import pytest

from aoe.compare.report.stats import compare_entropies, compare_means, ema, mean, std, stderr


def test_stats_helpers_skip_missing_values():
    assert mean([1.0, None, float("nan"), 3.0]) == 2.0
    assert math.isnan(mean([None, float("nan")]))
    assert std([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert stderr([1.0, 2.0, 3.0]) == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(std([1.0])) and math.isnan(stderr([1.0, None]))
    sm = ema([1.0, 1.0, 1.0], 0.9)
    assert sm == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull toward 0 at the start


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


def test_entropy_sentence_names_each_number_whichever_side_wins():
    """Each value is quoted beside its variant's label, so the sentence cannot pair the winner with
    the other's number (a report once read "MoE ... more evenly than AoE (Ent_load 1.619 vs 1.639)"
    with 1.619 being AoE's)."""
    s = compare_entropies(1.619, 1.639, 1.344, 0.690)
    assert "MoE spreads tokens over its experts more evenly than AoE" in s
    assert "Ent_load AoE 1.619, MoE 1.639 nats" in s
    assert "MoE chooses its experts more confidently than AoE" in s
    assert "Ent_conf AoE 1.344, MoE 0.690 nats" in s
