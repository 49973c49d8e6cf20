"""The protocol's effects (evaluation/endpoints.py) against worked examples, brute force and
scipy: Hodges-Lehmann estimate, paired bootstrap CI, Pratt Wilcoxon, power from observed pairs,
repeats-then-patients pooling and the patient-clustered lesion comparison."""

from __future__ import annotations

import itertools
import math
import statistics
from fractions import Fraction

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


def test_hodges_lehmann_of_four_differences_is_the_median_of_ten_walsh_averages() -> None:
    """[-2, 0, 1, 5]: the 10 Walsh averages (d_i + d_j) / 2, i <= j, written out by hand and
    sorted are -2, -1, -0.5, 0, 0.5, 1, 1.5, 2.5, 3, 5; an even count, so the median is
    (0.5 + 1) / 2 = 0.75 (the mean is 1, the median 0.5)."""
    walsh = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.5, 3.0, 5.0]
    assert sorted(walsh) == walsh and len(walsh) == 4 * 5 // 2
    assert hodges_lehmann([5.0, -2.0, 1.0, 0.0]) == 0.75 == (walsh[4] + walsh[5]) / 2


def _exact_bootstrap_hl(d: list[int]) -> list[tuple[Fraction, Fraction]]:
    """The exact distribution of the Hodges-Lehmann estimate of a bootstrap resample of ``d``:
    all n^n equally likely ordered resamples, each estimate from itertools' Walsh pairs and
    ``statistics.median`` in exact fractions. Returns (value, probability) sorted by value."""
    n = len(d)
    mass: dict[Fraction, Fraction] = {}
    for draw in itertools.product(d, repeat=n):
        pairs = itertools.combinations_with_replacement(draw, 2)
        value = statistics.median(Fraction(a + b, 2) for a, b in pairs)
        mass[value] = mass.get(value, Fraction(0)) + Fraction(1, n**n)
    return sorted(mass.items())


def _exact_quantile(distribution: list[tuple[Fraction, Fraction]], q: float) -> float:
    """The smallest support point whose CDF reaches ``q``; the example must keep every CDF
    step at least 0.5% away from ``q`` (over 6 standard errors of a 20000-resample estimate),
    so that a percentile of the resamples can only land on that point."""
    cdf = Fraction(0)
    for value, p in distribution:
        assert abs(float(cdf + p) - q) > 0.005, "ambiguous example"
        cdf += p
        if cdf >= q:
            return float(value)
    raise AssertionError("unreachable")


def test_bootstrap_ci_of_three_differences_matches_exact_enumeration() -> None:
    """n = 3, d = [0, 1, 4]: 27 equally likely resamples. By hand: {0,0,0} -> 0 and {4,4,4} -> 4
    with probability 1/27 each (> 2.5%), so the exact 95% interval is [0, 4]; the next CDF
    steps are 4/27 (at 0.25, from {0,0,1}) and 23/27 (below 3.25), so the exact 80% interval
    (10% and 90% quantiles) is [0.25, 3.25]."""
    d = [0, 1, 4]
    exact = _exact_bootstrap_hl(d)
    assert sum(p for _, p in exact) == 1
    assert exact[0] == (0, Fraction(1, 27)) and exact[1] == (Fraction(1, 4), Fraction(3, 27))
    assert exact[-1] == (4, Fraction(1, 27))
    for confidence, expected in ((0.95, (0.0, 4.0)), (0.80, (0.25, 3.25))):
        tail = (1 - confidence) / 2
        assert (_exact_quantile(exact, tail), _exact_quantile(exact, 1 - tail)) == expected
        effect = paired_effect(d, n_resamples=20_000, confidence=confidence, seed=11)
        assert (effect.ci_low, effect.ci_high) == expected, confidence
        assert effect.estimate == 1.5  # Walsh averages 0, 0.5, 1, 2, 2.5, 4: (1 + 2) / 2


def test_bootstrap_ci_of_five_differences_lies_inside_the_range_as_enumeration_says() -> None:
    """n = 5, d = [0, 1, 3, 9, 20]: of the 3125 resamples only those with at least four copies
    of the smallest value (21/3125 = 0.67%) give 0, so the exact 2.5% quantile is the next
    support point, 0.5 (CDF 0.032), and symmetrically the 97.5% one is 14.5, not 20: a
    percentile interval, not the data's range."""
    d = [0, 1, 3, 9, 20]
    exact = _exact_bootstrap_hl(d)
    assert exact[0] == (0, Fraction(21, 3125)) and exact[-1] == (20, Fraction(21, 3125))
    expected = (_exact_quantile(exact, 0.025), _exact_quantile(exact, 0.975))
    assert expected == (0.5, 14.5)
    effect = paired_effect(d, n_resamples=20_000, seed=5)
    assert (effect.ci_low, effect.ci_high) == expected


def test_pooled_ci_of_two_constant_repeats_is_the_exact_mixture_quantile() -> None:
    """Repeat A: differences [-1, -1], repeat B: [3, 3]. Patients resampled within a constant
    repeat change nothing, so a resample is decided by the repeats drawn: (A, A) -> -1 and
    (B, B) -> 3 with probability 1/4 each; (A, B) or (B, A), probability 1/2, pools
    [-1, -1, 3, 3], whose 10 Walsh averages are -1 x3, 1 x4, 3 x3, median 1. The exact
    mixture puts 1/4, 1/2, 1/4 on -1, 1, 3: its 2.5% / 97.5% quantiles are -1 and 3 (the
    range), its 30% / 70% quantiles (a 40% interval) both 1. The estimate is the pooled HL, 1."""
    mixture = [(Fraction(-1), Fraction(1, 4)), (Fraction(1), Fraction(1, 2)), (Fraction(3), Fraction(1, 4))]  # fmt: skip
    for confidence, expected in ((0.95, (-1.0, 3.0)), (0.40, (1.0, 1.0))):
        tail = (1 - confidence) / 2
        assert (_exact_quantile(mixture, tail), _exact_quantile(mixture, 1 - tail)) == expected
        effect = pooled_effect([[-1.0, -1.0], [3.0, 3.0]], 10_000, confidence=confidence, seed=3)
        assert (effect.ci_low, effect.ci_high) == expected, confidence
        assert (effect.estimate, effect.n) == (1.0, 4)
