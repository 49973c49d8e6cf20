"""Lesion-wise metrics: a functional core on whole-case arrays and torchmetrics wrappers.

See :mod:`sap_lightning.metrics.functional` for the definitions and the empty-mask conventions;
``arrays`` (inputs, binarisation), ``overlap`` (Dice, surface Dice), ``froc``, ``agreement``
(ICC) and ``case_scores`` hold the rest.
"""

from sap_lightning.metrics.arrays import binarize
from sap_lightning.metrics.functional import (
    FrocCounts,
    LesionDetectionResult,
    LesionMatch,
    LesionScore,
    froc_counts,
    lesion_detection,
    lesion_scores,
    match_lesions,
)
from sap_lightning.metrics.lesion import (
    THRESHOLD_GRID,
    LesionDetection,
    LesionSegmentationQuality,
    make_lesion_metrics,
)
from sap_lightning.metrics.overlap import dice, surface_dice

__all__ = [
    "THRESHOLD_GRID",
    "FrocCounts",
    "LesionDetection",
    "LesionDetectionResult",
    "LesionMatch",
    "LesionScore",
    "LesionSegmentationQuality",
    "binarize",
    "dice",
    "froc_counts",
    "lesion_detection",
    "lesion_scores",
    "make_lesion_metrics",
    "match_lesions",
    "surface_dice",
]
