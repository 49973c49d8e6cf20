"""The ranking guard: a whole-body blob tops any-overlap F2 but not ``f2_guarded``."""

from __future__ import annotations

import math

import numpy as np

from sap_lightning.metrics import make_lesion_metrics
from sap_lightning.metrics.lesion import MAX_PLAUSIBLE_VOLUME_RATIO, guarded_f2

SPACING = (2.0, 2.0, 4.0)


def _scores(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    metrics = make_lesion_metrics(threshold=0.5)
    metrics.update(pred.astype(np.float32), label, spacing=SPACING, case_id="p0")
    return {name: float(value) for name, value in metrics.compute().items()}


def _label() -> np.ndarray:
    label = np.zeros((40, 40, 20), np.uint8)
    label[5:8, 5:8, 5:7] = 1  # 18 voxels
    label[30:33, 30:33, 12:14] = 1  # 18 voxels
    return label


def test_a_whole_body_blob_scores_f2_one_but_guarded_zero() -> None:
    label = _label()
    blob = np.ones(label.shape, np.float32)  # one component touching both lesions
    scores = _scores(blob, label)
    assert scores["f2"] == 1.0  # any overlap: both detected, the one component matched
    assert math.isclose(scores["volume_ratio"], label.size / 36, rel_tol=1e-6)  # by hand
    assert scores["volume_ratio"] > MAX_PLAUSIBLE_VOLUME_RATIO
    assert guarded_f2(scores["f2"], scores["volume_ratio"]) == 0.0


def test_a_right_sized_prediction_keeps_its_f2() -> None:
    label = _label()
    pred = np.zeros(label.shape, np.float32)
    pred[5:8, 5:9, 5:7] = 1  # one lesion found, 24 voxels; the other missed
    scores = _scores(pred, label)
    assert math.isclose(scores["volume_ratio"], 24 / 36, rel_tol=1e-6)
    # sensitivity 1/2, precision 1: F2 = 5PR / (4P + R) = 2.5 / 4.5
    assert math.isclose(scores["f2"], 2.5 / 4.5, rel_tol=1e-6)
    assert guarded_f2(scores["f2"], scores["volume_ratio"]) == scores["f2"]


def test_without_lesions_the_ratio_is_undefined_and_f2_is_kept() -> None:
    assert guarded_f2(0.7, math.nan) == 0.7
