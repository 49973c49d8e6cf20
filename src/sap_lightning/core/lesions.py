"""Lesion geometry, the one owner for every stage: connected components, bounding boxes, volumes.

A lesion is a 3D connected component of the foreground of a label or binarised prediction.
The cache (lesion tables for patch sampling), the splits (lesion counts for stratification), the
metrics (matching), the burden report and the synthetic cohort all use these functions, so they
agree on what a lesion is. Connectivity is 6 by default (the face neighbours, as the authors'
code uses), configurable to 18 or 26. Components come from ``cc3d`` (connected-components-3d).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage

from sap_lightning.core.protocol import CONNECTIVITIES, DEFAULT_CONNECTIVITY

log = logging.getLogger(__name__)


def check_connectivity(connectivity: int) -> int:
    """``connectivity`` if it is 6, 18 or 26; otherwise ``ValueError`` naming the choices."""
    if isinstance(connectivity, bool) or connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    return int(connectivity)


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL (spacing in mm)."""
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def connected_components(
    mask: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY
) -> tuple[np.ndarray, int]:
    """``(labels, count)``: component ids 1..count of the non-zero voxels of ``mask`` (cc3d)."""
    labels, count = cc3d.connected_components(
        np.asarray(mask) > 0, connectivity=check_connectivity(connectivity), return_N=True
    )
    return labels, int(count)


def count_lesions(label: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY) -> int:
    """Number of lesions (connected components of ``label > 0``)."""
    return connected_components(label, connectivity)[1]


def component_boxes(labels: np.ndarray, count: int) -> list[tuple[slice, ...]]:
    """Half-open bounding box (one slice per axis) of every component ``1..count`` of a label
    volume: the one way every stage boxes its lesions (scipy's ``find_objects``). A component
    id absent from ``labels`` gets empty slices."""
    boxes = ndimage.find_objects(np.asarray(labels), max_label=count) if count else []
    return [box if box is not None else (slice(0, 0),) * labels.ndim for box in boxes]


def bounding_box(mask: np.ndarray) -> tuple[int, ...]:
    """``(x0, y0, z0, x1, y1, z1)``, half-open, of the non-zero voxels (all zeros if none)."""
    foreground = np.asarray(mask) != 0
    if not foreground.any():
        return (0,) * (2 * foreground.ndim)
    (box,) = component_boxes(foreground.view(np.uint8), 1)
    return (*(int(s.start) for s in box), *(int(s.stop) for s in box))


@dataclass(frozen=True)
class LesionInfo:
    """One lesion: a connected component of the lesion label."""

    component_id: int
    voxels: int
    volume_ml: float
    bbox: tuple[int, int, int, int, int, int]
    """``(x0, y0, z0, x1, y1, z1)``: start inclusive, stop exclusive, in voxels."""

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        x0, y0, z0, x1, y1, z1 = self.bbox
        return slice(x0, x1), slice(y0, y1), slice(z0, z1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LesionInfo:
        return cls(
            int(raw["component_id"]),
            int(raw["voxels"]),
            float(raw["volume_ml"]),
            tuple(int(v) for v in raw["bbox"]),  # type: ignore[arg-type]
        )


def lesion_components(
    label: np.ndarray, spacing: Sequence[float], connectivity: int = DEFAULT_CONNECTIVITY
) -> list[LesionInfo]:
    """Connected components of ``label > 0`` (cc3d) with voxel count, volume (mL) and bbox."""
    components, count = connected_components(label, connectivity)
    if count == 0:
        return []
    voxel_counts = np.bincount(components.ravel(), minlength=count + 1)
    voxel_ml = voxel_volume_ml(spacing)
    lesions = []
    for component_id, box in enumerate(component_boxes(components, count), start=1):
        voxels = int(voxel_counts[component_id])
        bbox = (*(int(s.start) for s in box), *(int(s.stop) for s in box))
        lesions.append(LesionInfo(component_id, voxels, voxels * voxel_ml, bbox))  # type: ignore[arg-type]
    return lesions
