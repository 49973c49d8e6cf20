"""The effects the study reports (docs/protocol.md): a paired difference between two arms per
patient, summarised by its Hodges-Lehmann estimate with a bootstrap CI and a Wilcoxon test; the
same pooled over repeats with a CI that resamples repeats and then patients; lesion-level
differences compared on the lesions both arms found, resampling patients; and the test's power
from the observed pairs.

Written here rather than with ``scipy.stats.bootstrap``: the repeat-then-patient resampling,
the patient clusters of lesions and NaN-free resamples are not what it offers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from sap_lightning.core.protocol import BOOTSTRAP_RESAMPLES, CONFIDENCE, SIGNIFICANCE_LEVEL
from sap_lightning.evaluation.statistics import percentile_interval


def hodges_lehmann(differences: Sequence[float] | np.ndarray) -> float:
    """The median of the Walsh averages (d_i + d_j) / 2, i <= j: the one-sample Hodges-Lehmann
    estimate, the location the signed-rank test tests. NaNs are dropped; none left -> NaN."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan
    i, j = np.triu_indices(d.size)
    return float(np.median((d[i] + d[j]) / 2.0))


def _hl_rows(samples: np.ndarray) -> np.ndarray:
    """Hodges-Lehmann estimate of every row of ``samples`` (resamples, n)."""
    n = samples.shape[1]
    i, j = np.triu_indices(n)
    return np.median((samples[:, i] + samples[:, j]) / 2.0, axis=1)


def wilcoxon_pratt(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value keeping zero differences (Pratt's method: ties at
    zero are common in F2 and dropping them overstates an effect). Fewer than 2 differences or
    every difference zero -> p = 1 (nothing to tell); NaNs are dropped."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size < 2 or not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="pratt").pvalue)


@dataclass(frozen=True)
class PairedEffect:
    """Arm minus baseline over paired units: estimate, CI, test and the units' count."""

    estimate: float
    ci_low: float
    ci_high: float
    p: float
    n: int

    @property
    def significant(self) -> bool:
        return self.p < SIGNIFICANCE_LEVEL

    def format(self, digits: int = 3) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        return (
            f"{self.estimate:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"
        )


def paired_effect(
    differences: Sequence[float] | np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    *,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedEffect:
    """Hodges-Lehmann estimate of paired differences (one per patient) with a percentile
    bootstrap CI over patients and the Pratt Wilcoxon p-value."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return PairedEffect(math.nan, math.nan, math.nan, math.nan, 0)
    low = high = math.nan
    if d.size >= 2:
        rng = np.random.default_rng(seed)
        samples = d[rng.integers(0, d.size, size=(n_resamples, d.size))]
        low, high = percentile_interval(_hl_rows(samples), confidence)
    return PairedEffect(hodges_lehmann(d), low, high, wilcoxon_pratt(d), int(d.size))


def pooled_effect(
    repeats: Sequence[Sequence[float] | np.ndarray],
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    *,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedEffect:
    """The Hodges-Lehmann estimate of every repeat's paired differences together, with a CI
    that resamples repeats and then patients within each drawn repeat (the two sources of
    variation: the draw of cohort and networks, and the patients). The p-value is the Pratt
    Wilcoxon test of the pooled differences, reported for reference: pairs of one repeat share
    its networks, so the decision is whether the CI excludes 0 (docs/protocol.md)."""
    groups = [np.asarray(r, dtype=np.float64) for r in repeats]
    groups = [g[~np.isnan(g)] for g in groups if np.any(~np.isnan(g))]
    if not groups:
        return PairedEffect(math.nan, math.nan, math.nan, math.nan, 0)
    pooled = np.concatenate(groups)
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_resamples)
    for k in range(n_resamples):
        drawn = rng.integers(0, len(groups), size=len(groups))
        parts = [groups[g][rng.integers(0, groups[g].size, size=groups[g].size)] for g in drawn]
        estimates[k] = hodges_lehmann(np.concatenate(parts))
    low, high = percentile_interval(estimates, confidence)
    return PairedEffect(hodges_lehmann(pooled), low, high, wilcoxon_pratt(pooled), pooled.size)


def observed_power(
    differences: Sequence[float] | np.ndarray,
    alpha: float = SIGNIFICANCE_LEVEL,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> float:
    """The fraction of bootstrap resamples of the observed paired differences (patients drawn
    with replacement, as many as observed) whose Pratt Wilcoxon p-value is below ``alpha``: the
    chance that a study of this size with differences like these finds them."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    samples = d[rng.integers(0, d.size, size=(n_resamples, d.size))]
    significant = [wilcoxon_pratt(row) < alpha for row in samples]
    return float(np.mean(significant))


def clustered_ci(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[str] | np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the median of lesion-level ``values``, resampling patients
    (``clusters``) rather than lesions."""
    v = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(v)
    v, groups = v[keep], np.asarray(clusters)[keep]
    names = np.unique(groups)
    if len(names) < 2:
        return math.nan, math.nan
    members = [v[groups == name] for name in names]
    rng = np.random.default_rng(seed)
    medians = np.empty(n_resamples)
    for k in range(n_resamples):
        drawn = rng.integers(0, len(members), size=len(members))
        medians[k] = np.median(np.concatenate([members[g] for g in drawn]))
    return percentile_interval(medians, confidence)


def clustered_difference(
    differences: Sequence[float] | np.ndarray,
    clusters: Sequence[str] | np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedEffect:
    """The median of paired lesion-level differences (one per lesion both arms found) with a CI
    and a two-sided p-value from resampling **patients** (``clusters``): lesions of one patient
    share its image and its network's behaviour, so they are not independent draws. The p-value
    is twice the smaller share of resampled medians on either side of 0."""
    d = np.asarray(differences, dtype=np.float64)
    keep = ~np.isnan(d)
    d, groups = d[keep], np.asarray(clusters)[keep]
    if d.size == 0:
        return PairedEffect(math.nan, math.nan, math.nan, math.nan, 0)
    names = np.unique(groups)
    members = [d[groups == name] for name in names]
    rng = np.random.default_rng(seed)
    medians = np.empty(n_resamples)
    for k in range(n_resamples):
        drawn = rng.integers(0, len(members), size=len(members))
        medians[k] = np.median(np.concatenate([members[g] for g in drawn]))
    low, high = percentile_interval(medians, confidence)
    below, above = np.mean(medians <= 0), np.mean(medians >= 0)
    p = min(1.0, 2 * min(below, above)) if len(members) > 1 else math.nan
    return PairedEffect(float(np.median(d)), low, high, float(p), int(d.size))
