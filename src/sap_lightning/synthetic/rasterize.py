"""Rasterisation of design-space shapes into tissue and region maps on the voxel grid."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sap_lightning.synthetic.anatomy import ScanPose, SubjectAnatomy, design_to_world
from sap_lightning.synthetic.body import build_body
from sap_lightning.synthetic.geometry import Shape
from sap_lightning.synthetic.tissues import (
    DISTRACTOR_TISSUES,
    LESION_TISSUES,
    MIMIC_TISSUES,
    RIB_REGION,
    SKELETON_CLASSES,
    Tissue,
)

log = logging.getLogger(__name__)


@dataclass
class AnatomyMaps:
    """Voxel maps of one scan's anatomy, on the image grid.

    ``tissue`` holds :class:`Tissue` codes (bone split into CORTEX / MARROW; metastases and
    mimics once placed); ``region`` holds the bone region (0 not bone, 1-9 the skeleton label
    values, :data:`RIB_REGION`, :data:`OTHER_BONE_REGION`) and is never changed by metastases
    or mimics: an in-bone mimic stays bone, a metastasis's extension into soft tissue is not.
    """

    tissue: np.ndarray
    region: np.ndarray

    @property
    def bone(self) -> np.ndarray:
        return self.region > 0

    @property
    def body(self) -> np.ndarray:
        return self.tissue != Tissue.AIR

    @property
    def skeleton(self) -> np.ndarray:
        """The skeleton label map (uint8, 0-9): labelled regions only, ribs and others 0."""
        return np.where(self.region <= max(SKELETON_CLASSES.values()), self.region, 0).astype(
            np.uint8
        )

    @property
    def ribs(self) -> np.ndarray:
        return self.region == RIB_REGION

    @property
    def marrow(self) -> np.ndarray:
        return self.tissue == Tissue.MARROW

    @property
    def distractors(self) -> np.ndarray:
        return np.isin(self.tissue, DISTRACTOR_TISSUES)

    @property
    def mimics(self) -> np.ndarray:
        return np.isin(self.tissue, MIMIC_TISSUES)

    @property
    def lesions(self) -> np.ndarray:
        return np.isin(self.tissue, LESION_TISSUES)


class VoxelGrid:
    """The map between design coordinates and voxels for one scan (subject, pose, grid).

    World coordinates span the grid box from its corner: voxel ``i`` has its centre at
    ``(i + 0.5) * spacing``, so grids of equal extent hold the same body whatever the spacing.
    """

    def __init__(
        self,
        anatomy: SubjectAnatomy,
        pose: ScanPose,
        shape: Sequence[int],
        spacing: Sequence[float],
    ):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, float)
        self.to_world = design_to_world(anatomy, pose)
        self.to_design = np.linalg.inv(self.to_world)

    def voxel_of(self, point: Sequence[float]) -> np.ndarray:
        """Continuous voxel index (float, 3) of a design point."""
        world = self.to_world[:3, :3] @ np.asarray(point, float) + self.to_world[:3, 3]
        return world / self.spacing - 0.5

    def box_of(self, shape: Shape) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """The voxel box covering ``shape`` and the design coordinates of its voxel centres."""
        lo, hi = shape.bounds()
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        world = corners @ self.to_world[:3, :3].T + self.to_world[:3, 3]
        start = np.maximum(np.floor(world.min(axis=0) / self.spacing - 0.5).astype(int), 0)
        stop = np.minimum(
            np.ceil(world.max(axis=0) / self.spacing - 0.5).astype(int) + 1, self.shape
        )
        if np.any(stop <= start):
            return None
        axes = [(np.arange(a, b) + 0.5) * s for a, b, s in zip(start, stop, self.spacing)]
        grids = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        m = self.to_design
        design = tuple(
            m[i, 0] * grids[0] + m[i, 1] * grids[1] + m[i, 2] * grids[2] + m[i, 3] for i in range(3)
        )
        return tuple(slice(a, b) for a, b in zip(start, stop)), design

    def shape_mask(self, shape: Shape) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """``(box, mask)``: the voxels of ``shape`` within its box, or None off the grid."""
        found = self.box_of(shape)
        if found is None:
            return None
        box, design = found
        return box, np.asarray(shape.contains(*design), bool)


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """The box of ``mask``'s voxels widened by ``margin`` (clipped), or None when empty."""
    where = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i)))
             for i in range(mask.ndim)]  # fmt: skip
    if not where[0].size:
        return None
    return tuple(
        slice(max(int(w[0]) - margin, 0), min(int(w[-1]) + 1 + margin, n))
        for w, n in zip(where, mask.shape)
    )


def dilate(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """Binary dilation by one step of ``structure`` (default the 26-neighbourhood), computed
    on the mask's bounding box only: whole-body grids are mostly empty around a structure."""
    structure = np.ones((3,) * mask.ndim, bool) if structure is None else structure
    out = np.zeros(mask.shape, bool)
    box = bounding_box(mask)
    if box is not None:
        out[box] = ndimage.binary_dilation(mask[box], structure)
    return out


def grow_box(box: tuple[slice, ...], grid: Sequence[int], margin: int = 1) -> tuple[slice, ...]:
    """``box`` widened by ``margin`` voxels on every side, clipped to the grid."""
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, grid)
    )


def render_anatomy(
    anatomy: SubjectAnatomy, pose: ScanPose, shape: Sequence[int], spacing: Sequence[float]
) -> AnatomyMaps:
    """Rasterise one scan's anatomy: tissue and bone-region maps of ``shape`` voxels."""
    grid = VoxelGrid(anatomy, pose, shape, spacing)
    tissue = np.zeros(grid.shape, np.uint8)
    region = np.zeros(grid.shape, np.uint8)
    for step in build_body(anatomy, pose, spacing):
        found = grid.shape_mask(step.shape)
        if found is None:
            continue
        box, mask = found
        if step.over is not None:
            mask &= np.isin(tissue[box], step.over)
        tissue[box][mask] = step.tissue
        region[box][mask] = step.region
    _split_cortex_and_marrow(tissue, region)
    return AnatomyMaps(tissue=tissue, region=region)


def _split_cortex_and_marrow(tissue: np.ndarray, region: np.ndarray) -> None:
    """Bone voxels on the in-plane boundary become cortex, the rest marrow.

    The rim is taken in-plane only: the through-plane spacing is coarse (6 mm by default) and a
    slice averages the end plates into the marrow signal.
    """
    bone = region > 0
    if not bone.any():
        return
    box = tuple(
        slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2)
        for idx in (
            np.flatnonzero(bone.any(axis=(1, 2))),
            np.flatnonzero(bone.any(axis=(0, 2))),
            np.flatnonzero(bone.any(axis=(0, 1))),
        )
    )
    cross = np.zeros((3, 3, 1), bool)
    cross[1, :, 0] = cross[:, 1, 0] = True
    inner = ndimage.binary_erosion(bone[box], structure=cross)
    sub = tissue[box]
    sub[bone[box]] = Tissue.CORTEX
    sub[inner] = Tissue.MARROW
