"""Agreement of per-patient quantities between prediction and reference (total tumour volume)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def icc_2_1(ratings: Sequence[Sequence[float]] | np.ndarray) -> float:
    """ICC(2,1) of Shrout & Fleiss (1979): two-way random effects, absolute agreement, single
    measures, from the ANOVA mean squares.

    ``ratings`` is (n subjects, k raters), e.g. per patient (predicted volume, true volume).
    Rows with a NaN are dropped; fewer than 2 subjects, or no variance at all, give NaN.
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be (subjects, raters >= 2), got shape {x.shape}")
    x = x[~np.isnan(x).any(axis=1)]
    n, k = x.shape
    if n < 2:
        return math.nan
    grand = x.mean()
    ss_rows = k * np.sum((x.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((x.mean(axis=0) - grand) ** 2)
    ss_error = np.sum((x - grand) ** 2) - ss_rows - ss_cols
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    if denominator == 0:
        return math.nan
    return float((ms_rows - ms_error) / denominator)
