"""The protocol's effects (evaluation/endpoints.py) against worked examples, brute force and
scipy: Hodges-Lehmann estimate, paired bootstrap CI, Pratt Wilcoxon, power from observed pairs,
repeats-then-patients pooling and the patient-clustered lesion comparison."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from sap_lightning.evaluation.endpoints import (
    clustered_ci,
    clustered_difference,
    hodges_lehmann,
    observed_power,
    paired_effect,
    pooled_effect,
    wilcoxon_pratt,
)


def test_hodges_lehmann_worked_example() -> None:
    """[1, 2, 9]: Walsh averages 1, 1.5, 5, 2, 5.5, 9, median (2 + 5) / 2 = 3.5 (the mean, 4,
    and the median, 2, differ from it)."""
    assert hodges_lehmann([1.0, 2.0, 9.0]) == 3.5
    assert hodges_lehmann([1.0, 2.0, 9.0, math.nan]) == 3.5
    assert math.isnan(hodges_lehmann([]))


def test_hodges_lehmann_matches_brute_force_walsh_averages() -> None:
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(0.05, 0.2, 17), 2)
    walsh = [(a + b) / 2 for a, b in itertools.combinations_with_replacement(d.tolist(), 2)]
    assert hodges_lehmann(d) == pytest.approx(float(np.median(walsh)))
    assert hodges_lehmann(-d) == pytest.approx(-hodges_lehmann(d))


def test_pratt_wilcoxon_is_scipys_pratt_test() -> None:
    d = np.array([0.0, 0.0, 0.1, 0.2, -0.05, 0.3, 0.0, 0.15, 0.25])
    assert wilcoxon_pratt(d) == pytest.approx(stats.wilcoxon(d, zero_method="pratt").pvalue)
    many = np.concatenate([np.zeros(30), np.linspace(0.01, 0.3, 40), -np.linspace(0.01, 0.1, 10)])
    assert wilcoxon_pratt(many) == pytest.approx(stats.wilcoxon(many, zero_method="pratt").pvalue)
    assert wilcoxon_pratt(many) != pytest.approx(stats.wilcoxon(many).pvalue)  # zeros matter
    assert wilcoxon_pratt(np.zeros(5)) == 1.0
    assert wilcoxon_pratt([0.3]) == 1.0


def test_paired_effect_of_a_constant_shift_is_that_shift_with_a_degenerate_ci() -> None:
    effect = paired_effect(np.full(12, 0.25))
    assert (effect.estimate, effect.ci_low, effect.ci_high, effect.n) == (0.25, 0.25, 0.25, 12)
    assert effect.p == pytest.approx(stats.wilcoxon(np.full(12, 0.25), zero_method="pratt").pvalue)
    assert effect.significant


def test_paired_effect_ci_covers_and_narrows_with_more_patients() -> None:
    rng = np.random.default_rng(0)
    small = paired_effect(rng.normal(0.1, 0.3, 15), seed=1)
    large = paired_effect(rng.normal(0.1, 0.3, 240), seed=1)
    for effect in (small, large):
        assert effect.ci_low <= effect.estimate <= effect.ci_high
    assert large.ci_high - large.ci_low < (small.ci_high - small.ci_low) / 2
    assert large.ci_low < 0.1 < large.ci_high


def test_observed_power_is_about_the_level_without_an_effect_and_one_with_a_large_one() -> None:
    rng = np.random.default_rng(5)
    assert observed_power(rng.normal(0.5, 0.1, 20), seed=0) == 1.0
    null = observed_power(np.array([-0.2, -0.1, 0.0, 0.1, 0.2] * 4), seed=0)
    assert null < 0.3  # symmetric about zero: resamples rarely look one-sided
    assert math.isnan(observed_power([0.1]))


def test_pooled_effect_resamples_repeats_then_patients() -> None:
    """Two repeats disagreeing in sign: the pooled CI must span both (the draw of the study is a
    source of variation), while a single repeat's own CI does not."""
    rng = np.random.default_rng(2)
    up, down = rng.normal(0.3, 0.05, 20), rng.normal(-0.3, 0.05, 20)
    pooled = pooled_effect([up, down], seed=0)
    assert pooled.n == 40
    assert pooled.ci_low < -0.2 and pooled.ci_high > 0.2
    alone = paired_effect(up, seed=0)
    assert alone.ci_low > 0.2
    agreeing = pooled_effect([up, rng.normal(0.3, 0.05, 20)], seed=0)
    assert agreeing.ci_low > 0.2


def test_clustered_lesion_comparison_resamples_patients_not_lesions() -> None:
    """One patient with many lesions, all differences +1, and eight with one lesion each near 0:
    resampling lesions would call the difference certain; resampling patients does not."""
    differences = np.array([1.0] * 30 + [0.02, -0.01, 0.03, -0.02, 0.01, 0.0, -0.03, 0.02])
    clusters = np.array(["p0"] * 30 + [f"p{i}" for i in range(1, 9)])
    effect = clustered_difference(differences, clusters, seed=0)
    assert effect.estimate == 1.0  # the median lesion
    assert effect.ci_low < 0.05  # drawing few copies of p0 puts the median near zero
    assert effect.p > 0.05
    low, high = clustered_ci(differences, clusters, seed=0)
    assert (low, high) == pytest.approx((effect.ci_low, effect.ci_high))
