"""Statistics of Table 1: bootstrap CIs of medians, IQR, Bonferroni (the paired effects and tests of
the protocol: ``evaluation/endpoints.py``).

Bootstrap intervals are percentile intervals from seeded resamples, so a report is
reproducible; NaN values (undefined per-patient metrics, e.g. sensitivity without lesions) are
dropped before any statistic, and the number of values used is reported with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sap_lightning.core.protocol import BOOTSTRAP_RESAMPLES, CONFIDENCE


@dataclass(frozen=True)
class Summary:
    """A point estimate with its bootstrap CI, the quartiles and the number of values."""

    estimate: float
    ci_low: float
    ci_high: float
    q1: float
    q3: float
    n: int

    def format(self, digits: int = 3) -> str:
        """``estimate [ci_low, ci_high]`` (the paper's table cells); ``n/a`` when undefined,
        the estimate alone when it has no interval."""

        def number(value: float) -> str:
            text = f"{value:.{digits}f}"
            return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"

        if math.isnan(self.estimate):
            return "n/a"
        if math.isnan(self.ci_low):
            return number(self.estimate)
        return f"{number(self.estimate)} [{number(self.ci_low)}, {number(self.ci_high)}]"

    @classmethod
    def undefined(cls) -> Summary:
        """No value to summarise (no unit had the metric defined)."""
        return cls(math.nan, math.nan, math.nan, math.nan, math.nan, 0)


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def bootstrap_ci(
    data: np.ndarray,
    statistic: Callable[..., float],
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    vectorized: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the rows (first axis) of ``data``.

    Rows are resampled together, so paired columns stay paired (e.g. predicted and true volume
    of a patient). With ``vectorized`` the statistic is called once as
    ``statistic(resamples, axis=1)``. Resamples on which the statistic is undefined (NaN, e.g.
    no patient with a lesion was drawn) are dropped. Fewer than 2 rows -> (NaN, NaN).

    Written here rather than with scipy.stats.bootstrap because that one lets a single NaN
    resample turn the whole interval into NaN and applies non-vectorised statistics per column.
    """
    data = np.asarray(data)
    n = len(data)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    if vectorized:
        values = np.asarray(statistic(data[indices], axis=1), dtype=np.float64)
    else:
        values = np.array([statistic(data[index]) for index in indices], dtype=np.float64)
    return percentile_interval(values, confidence)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``values``, NaN resamples dropped;
    (NaN, NaN) when none is left."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summarize(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Summary:
    """Median, its bootstrap CI and the IQR of the non-NaN ``values``."""
    values = _finite(values)
    if values.size == 0:
        return Summary.undefined()
    low, high = bootstrap_ci(values, np.median, n_resamples, confidence, seed, vectorized=True)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Summary(float(median), low, high, float(q1), float(q3), int(values.size))


def bonferroni(pvalues: Sequence[float], n_comparisons: int | None = None) -> np.ndarray:
    """Bonferroni-adjusted p-values: p x number of comparisons, capped at 1 (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p) if n_comparisons is None else n_comparisons
    return np.minimum(p * m, 1.0)
