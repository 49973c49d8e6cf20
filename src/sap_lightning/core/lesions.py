"""Lesion geometry shared by every stage: connected components, bounding boxes, volumes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cc3d
import numpy as np

log = logging.getLogger(__name__)


def bounding_box(mask: np.ndarray) -> tuple[int, ...]:
    """``(x0, y0, z0, x1, y1, z1)``, half-open, of the non-zero voxels (all zeros if none)."""
    if not mask.any():
        return (0,) * (2 * mask.ndim)
    starts, stops = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        starts.append(int(present[0]))
        stops.append(int(present[-1]) + 1)
    return (*starts, *stops)


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
    label: np.ndarray, spacing: Sequence[float], connectivity: int = 6
) -> list[LesionInfo]:
    """Connected components of ``label > 0`` (cc3d) with voxel count, volume (mL) and bbox."""
    components, count = cc3d.connected_components(
        label > 0, connectivity=connectivity, return_N=True
    )
    if count == 0:
        return []
    stats = cc3d.statistics(components)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions = []
    for component_id in range(1, count + 1):
        voxels = int(stats["voxel_counts"][component_id])
        box = stats["bounding_boxes"][component_id]
        bbox = (*(int(s.start) for s in box), *(int(s.stop) for s in box))
        lesions.append(LesionInfo(component_id, voxels, voxels * voxel_ml, bbox))  # type: ignore[arg-type]
    return lesions
