"""Evaluation protocol: FROC area, threshold tuning, bootstrap CIs, tests, ICC(2,1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sap_lightning.core.errors import SapError
from sap_lightning.evaluation import (
    bonferroni,
    bootstrap_ci,
    froc_auc,
    froc_curve,
    icc_2_1,
    load_threshold,
    save_threshold,
    summarize,
    tune_threshold,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; they report ICC(2,1) = 0.29.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
    dtype=float,
)


def test_icc_2_1_reproduces_shrout_and_fleiss():
    assert icc_2_1(SHROUT_FLEISS) == pytest.approx(0.29, abs=0.005)
    # from their ANOVA table: BMS 11.24, JMS 32.49, EMS 1.02, ICC(2,1) formula by hand
    bms, jms, ems, n, k = 11.24, 32.49, 1.02, 6, 4
    by_hand = (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n)
    assert icc_2_1(SHROUT_FLEISS) == pytest.approx(by_hand, abs=2e-3)


def test_icc_is_absolute_agreement():
    truth = np.array([1.0, 4.0, 2.5, 8.0, 0.5, 3.0])
    assert icc_2_1(np.column_stack([truth, truth])) == pytest.approx(1.0)
    biased = icc_2_1(np.column_stack([truth + 2.0, truth]))  # perfectly correlated, offset
    assert 0 < biased < 0.95
    assert math.isnan(icc_2_1(np.array([[1.0, 1.0]])))


def test_froc_auc_hand_worked():
    # points (1, 0.5) and (2, 0.8) after the origin: 0.25 + 0.65, then flat at 0.8 up to 4
    assert froc_auc([1.0, 2.0], [0.5, 0.8], max_fp=4.0) == pytest.approx(0.25 + 0.65 + 1.6)
    # cut at 1.5 FP: sensitivity interpolated to 0.65 there
    assert froc_auc([2.0, 1.0], [0.8, 0.5], max_fp=1.5) == pytest.approx(0.25 + 0.2875)
    # a perfect detector without false positives has the whole area
    assert froc_auc([0.0, 0.0], [1.0, 0.6], max_fp=15.0) == pytest.approx(15.0)
    assert math.isnan(froc_auc([1.0], [math.nan], max_fp=4.0))


def test_froc_curve_means_over_patients_with_lesions():
    sensitivity = np.array([[1.0, 0.5], [math.nan, math.nan], [0.5, 0.0]])
    fp = np.array([[3, 1], [2, 0], [1, 1]])
    mean_fp, mean_sensitivity = froc_curve(sensitivity, fp)
    assert mean_fp == pytest.approx([2.0, 2 / 3])
    assert mean_sensitivity == pytest.approx([0.75, 0.25])


def test_tune_threshold_maximises_median_f2_and_breaks_ties_low():
    grid = [0.7, 0.3, 0.5]  # unsorted on purpose
    f2 = np.array(
        [
            [0.2, 0.6, 0.6],
            [0.4, 0.8, 0.8],
            [math.nan, 0.1, 0.9],  # NaN: undefined for this patient at 0.7
        ]
    )
    choice = tune_threshold(grid, f2, cases=["a", "b", "c"])
    # medians by threshold 0.3: 0.6, 0.5: 0.8, 0.7: 0.3
    assert choice.grid == [0.3, 0.5, 0.7]
    assert choice.median_f2_per_threshold == pytest.approx([0.6, 0.8, 0.3])
    assert choice.threshold == 0.5
    tie = tune_threshold([0.2, 0.4], np.array([[0.5, 0.5], [0.7, 0.7]]))
    assert tie.threshold == 0.2
    with pytest.raises(SapError, match="no case"):
        tune_threshold([0.5], np.array([[math.nan]]))


def test_threshold_file_round_trip_and_errors(tmp_path):
    choice = tune_threshold([0.3, 0.6], np.array([[0.1, 0.9]]), cases=["x"])
    path = save_threshold(tmp_path / "run" / "threshold.json", choice)
    assert load_threshold(path) == 0.6
    assert json.loads(path.read_text())["cases"] == ["x"]
    assert not list(path.parent.glob(".*tmp*"))  # atomic write left nothing behind
    with pytest.raises(SapError, match=r"missing\.json"):
        load_threshold(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"threshold": 1.5}')
    with pytest.raises(SapError, match=r"bad\.json.*\(0, 1\]"):
        load_threshold(bad)


def test_summary_median_iqr_and_seeded_ci():
    values = np.array([0.1, 0.4, 0.35, 0.8, math.nan, 0.6, 0.2, 0.5])
    summary = summarize(values, seed=3)
    finite = values[~np.isnan(values)]
    assert summary.n == 7
    assert summary.estimate == pytest.approx(np.median(finite))
    assert (summary.q1, summary.q3) == pytest.approx(tuple(np.percentile(finite, [25, 75])))
    assert summary.ci_low <= summary.estimate <= summary.ci_high
    assert summarize(values, seed=3) == summary
    assert summary.format() == (
        f"{summary.estimate:.3f} [{summary.ci_low:.3f}, {summary.ci_high:.3f}]"
    )


def test_bootstrap_ci_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    sample = rng.normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(sample, np.mean, n_resamples=2000, seed=1, vectorized=True)
    half_width = 1.96 * sample.std(ddof=1) / math.sqrt(len(sample))
    assert low == pytest.approx(sample.mean() - half_width, abs=0.03)
    assert high == pytest.approx(sample.mean() + half_width, abs=0.03)
    assert bootstrap_ci(np.full(5, 2.0), np.median) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([1.0]), np.median))


def test_bootstrap_pairs_rows():
    # resampling rows keeps (pred, truth) pairs together: perfect agreement stays perfect
    volumes = np.column_stack([np.arange(1.0, 9.0)] * 2)
    assert bootstrap_ci(volumes, icc_2_1, n_resamples=200) == pytest.approx((1.0, 1.0))


def test_bonferroni_multiplies_and_caps():
    assert bonferroni([0.01, 0.2, 0.5], n_comparisons=3) == pytest.approx([0.03, 0.6, 1.0])
