"""Overlap and surface metrics of two binary masks: Dice and the area-weighted normalised surface
Dice (Nikolov et al. 2021), computed on the masks' bounding box plus one voxel, so whole-body
arrays cost little. Both masks empty -> 1.0; exactly one empty -> 0.0 (the project's
convention, tested)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from sap_lightning.core.lesions import bounding_box
from sap_lightning.core.protocol import SURFACE_TOLERANCE_MM
from sap_lightning.metrics.arrays import ArrayLike, as_mask, as_spacing, check_same_shape


def dice(pred: ArrayLike, target: ArrayLike) -> float:
    """Dice of two binary masks; both empty -> 1.0."""
    pred, target = as_mask(pred, "pred"), as_mask(target, "target")
    check_same_shape(pred, target)
    total = np.count_nonzero(pred) + np.count_nonzero(target)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & target) / total


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    # MONAI's port of DeepMind's marching-cubes normals table: the area of the surface
    # element of every 2x2x2 neighbourhood code. Reused rather than re-derived.
    from monai.metrics.utils import create_table_neighbour_code_to_surface_area

    table, _kernel = create_table_neighbour_code_to_surface_area(spacing)
    return table.double().numpy()


def _surfels(
    mask: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (mm) and areas (mm^2) of the surface elements of ``mask``.

    ``mask`` must have at least one background voxel of margin on every side. Surface elements
    sit on the corners between voxels: one per 2x2x2 neighbourhood that is neither all inside
    nor all outside (Nikolov et al.; the bit order is MONAI's encoding kernel).
    """
    m = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
    code = (
        (m[:-1, :-1, :-1] << 7)
        | (m[:-1, :-1, 1:] << 6)
        | (m[:-1, 1:, :-1] << 5)
        | (m[:-1, 1:, 1:] << 4)
        | (m[1:, :-1, :-1] << 3)
        | (m[1:, :-1, 1:] << 2)
        | (m[1:, 1:, :-1] << 1)
        | m[1:, 1:, 1:]
    )
    surface = (code != 0) & (code != 255)
    points = np.argwhere(surface) * np.asarray(spacing)
    return points, _surfel_area_table(spacing)[code[surface]]


def nsd_on_crop(
    pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float
) -> float:
    """Area-weighted NSD of two masks that already carry a background margin."""
    pred_points, pred_area = _surfels(pred, spacing)
    gt_points, gt_area = _surfels(target, spacing)
    if len(pred_points) == 0 and len(gt_points) == 0:
        return 1.0
    if len(pred_points) == 0 or len(gt_points) == 0:
        return 0.0
    gt_to_pred = cKDTree(pred_points).query(gt_points, k=1)[0]
    pred_to_gt = cKDTree(gt_points).query(pred_points, k=1)[0]
    within = gt_area[gt_to_pred <= tolerance_mm].sum() + pred_area[pred_to_gt <= tolerance_mm].sum()
    return float(within / (gt_area.sum() + pred_area.sum()))


def padded_crop(array: np.ndarray, box: np.ndarray, margin: int = 1) -> np.ndarray:
    """``array[box]`` grown by ``margin`` voxels per side, zero-padded beyond the array."""
    starts = box[:, 0] - margin
    stops = box[:, 1] + margin
    inner = tuple(
        slice(max(a, 0), min(b, n)) for a, b, n in zip(starts, stops, array.shape, strict=True)
    )
    crop = array[inner]
    pad = [(max(-a, 0), max(b - n, 0)) for a, b, n in zip(starts, stops, array.shape, strict=True)]
    return np.pad(crop, pad) if any(p != (0, 0) for p in pad) else crop


def union_box(*boxes: np.ndarray) -> np.ndarray:
    stacked = np.stack(boxes)
    return np.stack([stacked[:, :, 0].min(0), stacked[:, :, 1].max(0)], axis=1)


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(3, 2) [start, stop) bounds of the mask's voxels, None when it is empty."""
    box = bounding_box(mask)
    return np.array(box).reshape(2, 3).T if any(box[3:]) else None


def surface_dice(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Sequence[float],
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> float:
    """Area-weighted normalised surface Dice (Nikolov et al. 2021), inclusive at the tolerance.

    The fraction of the two surfaces' total area that lies within ``tolerance_mm`` of the other
    surface; equal to MONAI ``compute_surface_dice(..., use_subvoxels=True)``. Computed on the
    bounding box of both masks plus one voxel, so whole-body arrays cost little. Both masks
    empty -> 1.0; exactly one empty -> 0.0.
    """
    pred, target = as_mask(pred, "pred"), as_mask(target, "target")
    check_same_shape(pred, target)
    spacing = as_spacing(spacing)
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    box = _mask_box(pred | target)
    if box is None:
        return 1.0
    return nsd_on_crop(
        padded_crop(pred, box), padded_crop(target, box), spacing, float(tolerance_mm)
    )
