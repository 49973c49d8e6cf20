"""Lesion-wise metrics on whole-case arrays: lesion matching, detection, per-lesion Dice and NSD,
FROC counts (mask-level Dice and surface Dice: ``metrics/overlap.py``).

Every function takes numpy arrays or torch tensors of shape (X, Y, Z) (any device; they are moved
to the CPU) and a voxel spacing in mm **in array axis order**. Lesions are 3D connected components
(cc3d, connectivity 6, 18 or 26; default 6 as in the authors' code). Volumes are voxel count x
voxel volume, in mL.

Whole-body volumes are large and lesions are tiny, so the functions work on the sparse set of
foreground voxels (flat indices) and on per-lesion crops, never with per-lesion passes over the
whole volume.

Conventions for empty masks (the libraries disagree; these are the project's, and tested):

- ``dice`` and ``surface_dice``: both masks empty -> 1.0; exactly one empty -> 0.0. A case with
  no ground-truth lesion has no lesion rows, so it never enters lesion-level means.
- ``sensitivity`` with no ground-truth lesion -> NaN (undefined; the patient is left out of the
  sensitivity median, as the paper does for the >= 1 mL analysis).
- ``precision`` with no predicted component -> NaN.
- ``F2 = 5PR / (4P + R)``, with P per predicted component and R per ground-truth lesion (under
  split/merge the two sides count different true positives; each side uses its own). When only
  one side is undefined it counts as perfect: no predictions -> ``F2 = 5R / (4 + R)`` (0 when
  lesions exist and none is found), no lesions -> ``F2 = 5P / (4P + 1)`` (0 when every component
  is a false positive). Both sides empty (no lesion, nothing predicted) -> 1. For a lesion-free
  patient the value only flags false positives (1 or 0): every median F2 and the threshold
  tuning leave such patients out (``metrics.lesion``, ``evaluation.predictions``).
- Missed lesions get Dice 0 and NSD 0 in ``lesion_scores`` (their ``detected`` flag is False);
  "Dice of detected lesions" filters on the flag, "per-patient mean Dice" keeps the zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sap_lightning.core.lesions import (
    check_connectivity,
    component_boxes,
    connected_components,
    voxel_volume_ml,
)
from sap_lightning.core.protocol import (
    DEFAULT_CONNECTIVITY,
    F_BETA,
    LARGE_LESION_ML,
    SURFACE_TOLERANCE_MM,
)
from sap_lightning.metrics.arrays import (
    ArrayLike,
    as_mask,
    as_probability,
    as_spacing,
    check_same_shape,
)
from sap_lightning.metrics.overlap import (
    nsd_on_crop,
    padded_crop,
    union_box,
)

Connectivity = Literal[6, 18, 26]
Matching = Literal["any_overlap", "one_to_one"]


__all__ = [
    "FrocCounts",
    "LesionDetectionResult",
    "LesionMatch",
    "LesionScore",
    "detection_rates",
    "f2_score",
    "froc_counts",
    "lesion_detection",
    "lesion_scores",
    "match_lesions",
]


# --------------------------------------------------------------------------------------------
# connected components on the sparse foreground


@dataclass(frozen=True)
class _Components:
    labels: np.ndarray  # uint32 label volume, 0 = background, components 1..count
    count: int
    flat: np.ndarray  # flat (C-order) indices of the foreground voxels
    ids: np.ndarray  # component id (1..count) of each foreground voxel
    voxels: np.ndarray  # voxel count per component, index 0 = component 1

    def bounding_boxes(self) -> np.ndarray:
        """(count, 3, 2) array of [start, stop) voxel bounds per component."""
        boxes = component_boxes(self.labels, self.count)
        return np.array(
            [[(s.start, s.stop) for s in box] for box in boxes], dtype=np.int64
        ).reshape(self.count, 3, 2)


def _components(mask: np.ndarray, connectivity: int) -> _Components:
    labels, count = connected_components(mask, connectivity)
    flat = np.flatnonzero(mask)
    ids = labels.ravel()[flat]
    voxels = np.bincount(ids, minlength=count + 1)[1:]
    return _Components(labels, int(count), flat, ids, voxels)


@dataclass(frozen=True)
class _Overlaps:
    """Every (GT lesion, predicted component) pair that shares voxels, and how many."""

    gt: np.ndarray  # GT lesion id (1..n_gt)
    pred: np.ndarray  # predicted component id (1..n_pred)
    voxels: np.ndarray  # shared voxel count


def _overlaps(gt: _Components, pred: _Components) -> _Overlaps:
    pred_at_gt = pred.labels.ravel()[gt.flat]
    shared = pred_at_gt > 0
    stride = np.int64(pred.count + 1)
    codes = gt.ids[shared].astype(np.int64) * stride + pred_at_gt[shared]
    pairs, counts = np.unique(codes, return_counts=True)
    return _Overlaps(pairs // stride, pairs % stride, counts)


def _match(
    gt: _Components,
    pred: _Components,
    overlaps: _Overlaps,
    matching: Matching,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean 'matched' flags per GT lesion and per predicted component."""
    gt_hit = np.zeros(gt.count, dtype=bool)
    pred_hit = np.zeros(pred.count, dtype=bool)
    if matching == "any_overlap":
        gt_hit[overlaps.gt - 1] = True
        pred_hit[overlaps.pred - 1] = True
    elif matching == "one_to_one":
        # Greedy by decreasing IoU, each lesion and component used once: panoptica's
        # NaiveThresholdMatching (IoU >= threshold; threshold 0 means any overlap).
        union = gt.voxels[overlaps.gt - 1] + pred.voxels[overlaps.pred - 1] - overlaps.voxels
        iou = overlaps.voxels / union
        for k in np.argsort(-iou, kind="stable"):
            if iou[k] < iou_threshold:
                break
            g, p = overlaps.gt[k] - 1, overlaps.pred[k] - 1
            if not gt_hit[g] and not pred_hit[p]:
                gt_hit[g] = pred_hit[p] = True
    else:
        raise ValueError(f"matching must be 'any_overlap' or 'one_to_one', got {matching!r}")
    return gt_hit, pred_hit


# --------------------------------------------------------------------------------------------
# detection


def f2_score(sensitivity: np.ndarray | float, precision: np.ndarray | float) -> np.ndarray | float:
    """F-beta at ``protocol.F_BETA`` (F2 = 5PR / (4P + R)), with the module's convention for
    undefined (NaN) sides.

    An undefined side counts as perfect (1.0): a patient without lesions scores 1 when nothing
    is predicted and 0 with any false positive, like the Dice convention (both empty -> 1).
    For such a patient the value is a false-positive flag, not a detection score: the medians
    and the threshold tuning take patients with lesions only. P = R = 0 -> 0. Element-wise.
    """
    r = np.asarray(sensitivity, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    r = np.where(np.isnan(r), 1.0, r)
    p = np.where(np.isnan(p), 1.0, p)
    beta2 = F_BETA**2
    denominator = beta2 * p + r
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (1.0 + beta2) * p * r / np.where(denominator > 0, denominator, 1)
        f2 = np.where(denominator > 0, score, 0.0)
    return float(f2) if f2.ndim == 0 else f2


def detection_rates(
    n_gt: np.ndarray | int,
    n_detected: np.ndarray | int,
    n_pred: np.ndarray | int,
    n_pred_matched: np.ndarray | int,
) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """(sensitivity, precision, F2) from counts, element-wise; 0/0 -> NaN as documented."""
    n_gt, n_detected = np.asarray(n_gt, np.float64), np.asarray(n_detected, np.float64)
    n_pred, n_pred_matched = np.asarray(n_pred, np.float64), np.asarray(n_pred_matched, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_gt > 0, n_detected / np.where(n_gt > 0, n_gt, 1), np.nan)
        precision = np.where(n_pred > 0, n_pred_matched / np.where(n_pred > 0, n_pred, 1), np.nan)
    f2 = f2_score(sensitivity, precision)
    if sensitivity.ndim == 0:
        return float(sensitivity), float(precision), float(f2)
    return sensitivity, precision, f2


@dataclass(frozen=True)
class LesionDetectionResult:
    """Lesion-wise detection counts of one case and the rates derived from them.

    ``n_detected`` counts GT lesions found, ``n_pred_matched`` predicted components that count
    as true positives; they differ under split/merge with ``any_overlap`` matching.
    """

    n_gt: int
    n_pred: int
    n_detected: int
    n_pred_matched: int
    matching: str
    min_volume_ml: float

    @property
    def n_false_positive(self) -> int:
        return self.n_pred - self.n_pred_matched

    @property
    def n_missed(self) -> int:
        return self.n_gt - self.n_detected

    @property
    def sensitivity(self) -> float:
        return detection_rates(self.n_gt, self.n_detected, self.n_pred, self.n_pred_matched)[0]

    @property
    def precision(self) -> float:
        return detection_rates(self.n_gt, self.n_detected, self.n_pred, self.n_pred_matched)[1]

    @property
    def f2(self) -> float:
        return detection_rates(self.n_gt, self.n_detected, self.n_pred, self.n_pred_matched)[2]


@dataclass(frozen=True)
class LesionMatch:
    """Which lesions and components of one case matched: the per-component view behind
    :func:`lesion_detection`, for pictures and tables that must show the same counts."""

    gt_labels: np.ndarray
    """GT lesion ids 1..n (0 = background), (X, Y, Z)."""
    pred_labels: np.ndarray
    """Predicted component ids 1..m (0 = background), (X, Y, Z)."""
    gt_detected: np.ndarray
    """Per GT lesion (index = id - 1): found by a predicted component."""
    pred_matched: np.ndarray
    """Per predicted component (index = id - 1): a true positive."""
    gt_voxels: np.ndarray
    pred_voxels: np.ndarray


def match_lesions(
    pred: ArrayLike,
    target: ArrayLike,
    connectivity: Connectivity = DEFAULT_CONNECTIVITY,
    matching: Matching = "any_overlap",
    iou_threshold: float = 0.5,
) -> LesionMatch:
    """Label both masks' lesions and flag the matched ones (rules of :func:`lesion_detection`)."""
    pred, target = as_mask(pred, "pred"), as_mask(target, "target")
    check_same_shape(pred, target)
    connectivity = check_connectivity(connectivity)
    gt = _components(target, connectivity)
    pr = _components(pred, connectivity)
    gt_hit, pred_hit = _match(gt, pr, _overlaps(gt, pr), matching, iou_threshold)
    return LesionMatch(gt.labels, pr.labels, gt_hit, pred_hit, gt.voxels, pr.voxels)


def lesion_detection(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Sequence[float],
    connectivity: Connectivity = DEFAULT_CONNECTIVITY,
    min_volume_ml: float = 0.0,
    matching: Matching = "any_overlap",
    iou_threshold: float = 0.5,
) -> LesionDetectionResult:
    """Count detected lesions and false-positive components of one case.

    ``matching="any_overlap"`` (the paper): a GT lesion is detected when any predicted voxel
    overlaps it; a predicted component is a true positive when it touches any GT lesion; each
    side is counted on its own (a split lesion is one detection and no FP; a merged blob
    detects every lesion it covers). ``matching="one_to_one"``: greedy pairing by decreasing IoU
    among overlapping pairs with IoU >= ``iou_threshold`` (panoptica's naive threshold
    matching; 0 means any overlap), each lesion and component used at most once.

    With ``min_volume_ml`` > 0 the matching is done on all components, then sensitivity is
    over GT lesions of at least that volume (found by a component of any size) and precision
    and false positives over predicted components of at least that volume.
    """
    ml_per_voxel = voxel_volume_ml(as_spacing(spacing))
    matched = match_lesions(pred, target, connectivity, matching, iou_threshold)
    gt_hit, pred_hit = matched.gt_detected, matched.pred_matched
    gt_kept = matched.gt_voxels * ml_per_voxel >= min_volume_ml
    pred_kept = matched.pred_voxels * ml_per_voxel >= min_volume_ml
    return LesionDetectionResult(
        n_gt=int(gt_kept.sum()),
        n_pred=int(pred_kept.sum()),
        n_detected=int((gt_hit & gt_kept).sum()),
        n_pred_matched=int((pred_hit & pred_kept).sum()),
        matching=matching,
        min_volume_ml=float(min_volume_ml),
    )


# --------------------------------------------------------------------------------------------
# per-lesion segmentation quality


@dataclass(frozen=True)
class LesionScore:
    """Segmentation quality of one GT lesion against the predicted components that touch it."""

    lesion_id: int
    volume_ml: float
    detected: bool
    dice: float
    nsd: float
    pred_volume_ml: float
    n_pred_components: int


def lesion_scores(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Sequence[float],
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
    connectivity: Connectivity = DEFAULT_CONNECTIVITY,
) -> list[LesionScore]:
    """One row per GT lesion (ids in cc3d's raster order): Dice and NSD against the union of
    the predicted components that overlap it (whole components, also where they reach into
    other lesions). Missed lesions get Dice 0 and NSD 0. NSD is computed on a per-lesion crop.
    """
    pred, target = as_mask(pred, "pred"), as_mask(target, "target")
    check_same_shape(pred, target)
    spacing = as_spacing(spacing)
    ml_per_voxel = voxel_volume_ml(as_spacing(spacing))
    connectivity = check_connectivity(connectivity)
    gt = _components(target, connectivity)
    pr = _components(pred, connectivity)
    overlaps = _overlaps(gt, pr)
    gt_boxes = gt.bounding_boxes()
    pred_boxes = pr.bounding_boxes()
    # overlaps are sorted by GT id: split them into one group per lesion
    group_starts = np.searchsorted(overlaps.gt, np.arange(1, gt.count + 2))
    rows: list[LesionScore] = []
    for index in range(gt.count):
        lesion_id = index + 1
        lo, hi = group_starts[index], group_starts[index + 1]
        touching = overlaps.pred[lo:hi]
        volume_ml = float(gt.voxels[index] * ml_per_voxel)
        if len(touching) == 0:
            rows.append(LesionScore(lesion_id, volume_ml, False, 0.0, 0.0, 0.0, 0))
            continue
        pred_voxels = int(pr.voxels[touching - 1].sum())
        shared = int(overlaps.voxels[lo:hi].sum())
        lesion_dice = 2.0 * shared / (gt.voxels[index] + pred_voxels)
        box = union_box(gt_boxes[index], *pred_boxes[touching - 1])
        gt_crop = padded_crop(gt.labels, box) == lesion_id
        pred_crop = np.isin(padded_crop(pr.labels, box), touching)
        nsd = nsd_on_crop(pred_crop, gt_crop, spacing, float(tolerance_mm))
        rows.append(
            LesionScore(
                lesion_id=lesion_id,
                volume_ml=volume_ml,
                detected=True,
                dice=float(lesion_dice),
                nsd=nsd,
                pred_volume_ml=float(pred_voxels * ml_per_voxel),
                n_pred_components=len(touching),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# FROC: detection counts at many thresholds in one pass


@dataclass(frozen=True)
class FrocCounts:
    """Any-overlap detection counts of one case at each threshold (ascending).

    ``*_large`` counts use only GT lesions / predicted components of at least
    ``min_volume_ml`` (the GT lesions may be found by components of any size).
    Entry ``k`` equals ``lesion_detection(binarize(prob, thresholds[k]), ...)``.
    """

    thresholds: np.ndarray
    min_volume_ml: float
    n_gt: int
    n_gt_large: int
    n_detected: np.ndarray
    n_pred: np.ndarray
    n_pred_matched: np.ndarray
    n_detected_large: np.ndarray
    n_pred_large: np.ndarray
    n_pred_matched_large: np.ndarray

    def at(self, index: int, large: bool = False) -> LesionDetectionResult:
        """The counts at ``thresholds[index]`` as a :class:`LesionDetectionResult`."""
        if large:
            counts = (self.n_gt_large, self.n_pred_large, self.n_detected_large)
            matched = self.n_pred_matched_large
        else:
            counts = (self.n_gt, self.n_pred, self.n_detected)
            matched = self.n_pred_matched
        return LesionDetectionResult(
            n_gt=int(counts[0]),
            n_pred=int(counts[1][index]),
            n_detected=int(counts[2][index]),
            n_pred_matched=int(matched[index]),
            matching="any_overlap",
            min_volume_ml=self.min_volume_ml if large else 0.0,
        )


def check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    """Sorted unique probability thresholds, each in (0, 1]."""
    values = np.unique(np.asarray(list(thresholds), dtype=np.float64))
    if values.size == 0 or not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"thresholds must be non-empty and in (0, 1], got {list(thresholds)}")
    return values


def froc_counts(
    prob: ArrayLike,
    target: ArrayLike,
    spacing: Sequence[float],
    thresholds: Sequence[float],
    connectivity: Connectivity = DEFAULT_CONNECTIVITY,
    min_volume_ml: float = LARGE_LESION_ML,
) -> FrocCounts:
    """Any-overlap detection counts at every threshold, for a FROC curve or threshold tuning.

    One pass: the GT is labelled once; a GT lesion is detected at ``t`` exactly when its
    maximum probability is >= ``t``. Components at a higher threshold are nested inside the
    components at the lowest one, so each of those is cropped once and only its crop is
    relabelled per threshold, and only at thresholds between its minimum and maximum
    probability (below, it is unchanged; above, it is gone).
    """
    prob = as_probability(prob)
    target = as_mask(target, "target")
    check_same_shape(prob, target)
    thresholds = check_thresholds(thresholds)
    connectivity = check_connectivity(connectivity)
    ml_per_voxel = voxel_volume_ml(as_spacing(spacing))
    dtype_thresholds = thresholds.astype(prob.dtype)  # compare as binarize() does

    gt = _components(target, connectivity)
    gt_large = gt.voxels * ml_per_voxel >= min_volume_ml
    gt_max = np.full(gt.count, -np.inf, dtype=prob.dtype)
    np.maximum.at(gt_max, gt.ids.astype(np.int64) - 1, prob.ravel()[gt.flat])
    found = gt_max[None, :] >= dtype_thresholds[:, None]  # (thresholds, lesions)

    base = _components(prob >= dtype_thresholds[0], connectivity)
    base_index = base.ids.astype(np.int64) - 1
    base_values = prob.ravel()[base.flat]
    base_max = np.full(base.count, -np.inf, dtype=prob.dtype)
    base_min = np.full(base.count, np.inf, dtype=prob.dtype)
    np.maximum.at(base_max, base_index, base_values)
    np.minimum.at(base_min, base_index, base_values)
    base_touches = np.zeros(base.count, dtype=bool)
    touched_ids = base.labels.ravel()[gt.flat]
    base_touches[touched_ids[touched_ids > 0].astype(np.int64) - 1] = True
    base_large = base.voxels * ml_per_voxel >= min_volume_ml

    # a component whose every voxel passes a threshold is unchanged there: count it as it is
    intact = dtype_thresholds[:, None] <= base_min[None, :]  # (thresholds, components)
    n_pred = intact.sum(axis=1)
    n_matched = (intact & base_touches).sum(axis=1)
    n_pred_large = (intact & base_large).sum(axis=1)
    n_matched_large = (intact & base_touches & base_large).sum(axis=1)

    # otherwise relabel its crop, up to its maximum probability
    for index, box in enumerate(base.bounding_boxes()):
        levels = np.flatnonzero(
            (dtype_thresholds > base_min[index]) & (dtype_thresholds <= base_max[index])
        )
        if len(levels) == 0:
            continue
        region = tuple(slice(a, b) for a, b in box)
        own = base.labels[region] == index + 1
        local_prob = np.where(own, prob[region], prob.dtype.type(-np.inf))
        local_gt = target[region] & own
        for level in levels:
            labels, count = connected_components(
                local_prob >= dtype_thresholds[level], connectivity
            )
            voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            touches = np.bincount(labels[local_gt], minlength=count + 1)[1:] > 0
            large = voxels * ml_per_voxel >= min_volume_ml
            n_pred[level] += count
            n_matched[level] += touches.sum()
            n_pred_large[level] += large.sum()
            n_matched_large[level] += (touches & large).sum()

    return FrocCounts(
        thresholds=thresholds,
        min_volume_ml=float(min_volume_ml),
        n_gt=gt.count,
        n_gt_large=int(gt_large.sum()),
        n_detected=found.sum(axis=1),
        n_pred=n_pred,
        n_pred_matched=n_matched,
        n_detected_large=found[:, gt_large].sum(axis=1),
        n_pred_large=n_pred_large,
        n_pred_matched_large=n_matched_large,
    )
