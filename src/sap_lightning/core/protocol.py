"""The evaluation protocol's fixed facts, each defined once (docs/evaluation.md).

Metrics, evaluation, inference, the cache, the configuration schema and the command line read
these names instead of typing the values again, so changing one (a study with 26-connected
lesions, a 1 mm surface tolerance) changes it everywhere. Pure Python: configuration and the
data commands read it without importing torch.
"""

from __future__ import annotations

CONNECTIVITIES = (6, 18, 26)
"""Neighbourhoods a lesion (a 3D connected component) may be defined with."""
DEFAULT_CONNECTIVITY = 6
"""Face neighbours: the authors' code uses it; the paper does not say."""

SURFACE_TOLERANCE_MM = 2.0
"""Tolerance of the normalised surface Dice (the paper does not state one)."""

LARGE_LESION_ML = 1.0
"""Volume from which a lesion is clinically relevant (the paper's ">= 1 mL" rows)."""

DEFAULT_THRESHOLD = 0.5
"""Probability threshold wherever no tuned one exists yet (validation, an untuned ``sap
predict``); the study tunes it on the tuning fold."""

THRESHOLD_GRID: tuple[float, ...] = (*(round(0.05 * k, 2) for k in range(1, 20)), 0.97, 0.99)
"""Thresholds of the FROC curve and of threshold tuning: 0.05, 0.10, ..., 0.95, 0.97, 0.99 (a
grid that stops at 0.95 leaves an arm tuned to its top unable to go higher)."""

F_BETA = 2.0
"""The detection score is F-beta with beta = 2 (recall weighted four times precision): F2."""

FROC_MAX_FP_ALL = 15.0
"""FROC AUC limit in false positives per exam, all lesions (the paper's)."""
FROC_MAX_FP_LARGE = 4.0
"""FROC AUC limit in false positives per exam, lesions >= ``LARGE_LESION_ML`` (the paper's)."""

MAX_PLAUSIBLE_VOLUME_RATIO = 10.0
"""Median predicted / true lesion volume above which a prediction is one implausible blob:
under any-overlap counting such a blob scores well on F2 while segmenting nothing."""

BOOTSTRAP_RESAMPLES = 1000
"""Bootstrap resamples of every confidence interval (the paper's)."""
CONFIDENCE = 0.95
"""Coverage of every confidence interval."""
SIGNIFICANCE_LEVEL = 0.05
"""Family-wise level the verdict applies to the Bonferroni-corrected p-value."""
