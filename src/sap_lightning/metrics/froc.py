"""FROC curve (mean sensitivity vs mean false positives per exam) and its partial area.

The curve has one point per threshold plus the origin (0 FP, sensitivity 0: a threshold above
every probability). Mean sensitivity is over patients with at least one lesion of the category
(undefined otherwise), mean FP over all exams. The area is the unnormalised integral of the
piecewise-linear curve from 0 to ``max_fp`` FP per exam (the paper: 15 for all lesions, 4 for
lesions >= 1 mL), so its maximum is ``max_fp``.

- Points are ordered by mean FP (ties by sensitivity). FP per exam is not always monotone in the
  threshold (raising it can split a component in two), so the ordering is by FP, not threshold.
- Beyond the last point (the lowest threshold) the curve is extended flat at the last
  sensitivity up to ``max_fp``: a lower threshold can only add detections, never remove them,
  so this is the conservative reading of a curve that stops early.
- A curve that passes ``max_fp`` is cut there with linear interpolation.
"""

from __future__ import annotations

import math

import numpy as np


def froc_curve(
    sensitivity: np.ndarray, false_positives: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean FP per exam and mean sensitivity per threshold from (cases, thresholds) arrays.

    ``sensitivity`` is NaN for cases without a lesion of the category; they are left out of the
    mean sensitivity but count as exams for the mean FP.
    """
    sensitivity = np.asarray(sensitivity, dtype=np.float64)
    false_positives = np.asarray(false_positives, dtype=np.float64)
    if sensitivity.shape != false_positives.shape or sensitivity.ndim != 2:
        raise ValueError(
            f"expected two (cases, thresholds) arrays, got {sensitivity.shape} and "
            f"{false_positives.shape}"
        )
    n_thresholds = sensitivity.shape[1]
    if sensitivity.shape[0] == 0:
        return np.full(n_thresholds, np.nan), np.full(n_thresholds, np.nan)
    has_lesion = ~np.isnan(sensitivity)
    counted = has_lesion.sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean_sensitivity = np.where(
            counted > 0, np.nansum(sensitivity, axis=0) / np.maximum(counted, 1), np.nan
        )
    return false_positives.mean(axis=0), mean_sensitivity


def froc_auc(mean_fp: np.ndarray, sensitivity: np.ndarray, max_fp: float) -> float:
    """Area under the piecewise-linear FROC curve from 0 to ``max_fp`` FP per exam.

    NaN when no point has a defined sensitivity (no exam had a lesion of the category).
    """
    fp = np.asarray(mean_fp, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    keep = ~(np.isnan(fp) | np.isnan(sens))
    if not keep.any() or not max_fp > 0:
        return math.nan
    fp = np.concatenate([[0.0], fp[keep]])
    sens = np.concatenate([[0.0], sens[keep]])
    order = np.lexsort((sens, fp))
    fp, sens = fp[order], sens[order]
    beyond = fp > max_fp
    if beyond.any():
        j = int(np.argmax(beyond))  # first point past the limit; j >= 1 as fp[0] = 0
        at_limit = sens[j - 1] + (sens[j] - sens[j - 1]) * (max_fp - fp[j - 1]) / (
            fp[j] - fp[j - 1]
        )
        fp, sens = np.append(fp[:j], max_fp), np.append(sens[:j], at_limit)
    elif fp[-1] < max_fp:
        fp, sens = np.append(fp, max_fp), np.append(sens, sens[-1])
    return float(np.sum(np.diff(fp) * (sens[1:] + sens[:-1]) / 2.0))
