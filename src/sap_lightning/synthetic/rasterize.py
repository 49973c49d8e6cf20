"""Rasterisation of the body's shapes into tissue and region maps on the voxel grid."""

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
from sap_lightning.synthetic.tissues import DISTRACTOR_TISSUES, RIB_REGION, SKELETON_CLASSES, Tissue

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------------


@dataclass
class AnatomyMaps:
    """Voxel maps of one scan's anatomy, on the image grid.

    ``tissue`` holds :class:`Tissue` codes (bone split into CORTEX / MARROW, lesions LESION once
    placed); ``region`` holds the bone region (0 not bone, 1-9 the skeleton label values,
    :data:`RIB_REGION`, :data:`OTHER_BONE_REGION`) and is never changed by lesions.
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


def _voxel_box(
    shape: Shape,
    to_world: np.ndarray,
    to_design: np.ndarray,
    grid: Sequence[int],
    spacing: np.ndarray,
) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
    """The voxel box covering ``shape`` and the design coordinates of its voxel centres.

    World coordinates here span the grid box from its corner: voxel ``i`` has its centre at
    ``(i + 0.5) * spacing``, so grids of equal extent hold the same body whatever the spacing.
    """
    lo, hi = shape.bounds()
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    world = corners @ to_world[:3, :3].T + to_world[:3, 3]
    start = np.maximum(np.floor(world.min(axis=0) / spacing - 0.5).astype(int), 0)
    stop = np.minimum(np.ceil(world.max(axis=0) / spacing - 0.5).astype(int) + 1, grid)
    if np.any(stop <= start):
        return None
    axes = [(np.arange(a, b) + 0.5) * s for a, b, s in zip(start, stop, spacing)]
    grids = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    m = to_design
    design = tuple(
        m[i, 0] * grids[0] + m[i, 1] * grids[1] + m[i, 2] * grids[2] + m[i, 3] for i in range(3)
    )
    return tuple(slice(a, b) for a, b in zip(start, stop)), design


def grow_box(box: tuple[slice, ...], grid: Sequence[int], margin: int = 1) -> tuple[slice, ...]:
    """``box`` widened by ``margin`` voxels on every side, clipped to the grid."""
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, grid)
    )


def render_anatomy(
    anatomy: SubjectAnatomy, pose: ScanPose, shape: Sequence[int], spacing: Sequence[float]
) -> AnatomyMaps:
    """Rasterise one scan's anatomy: tissue and bone-region maps of ``shape`` voxels."""
    grid = tuple(int(n) for n in shape)
    spacing_arr = np.asarray(spacing, float)
    to_world = design_to_world(anatomy, pose)
    to_design = np.linalg.inv(to_world)
    tissue = np.zeros(grid, np.uint8)
    region = np.zeros(grid, np.uint8)
    for step in build_body(anatomy, pose, spacing):
        found = _voxel_box(step.shape, to_world, to_design, grid, spacing_arr)
        if found is None:
            continue
        box, design = found
        mask = step.shape.contains(*design)
        if step.over is not None:
            mask &= np.isin(tissue[box], step.over)
        if step.clear_of_bone:
            wide = grow_box(box, grid)
            near = ndimage.binary_dilation(region[wide] > 0, np.ones((3, 3, 3), bool))
            inner = tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, wide))
            mask &= ~near[inner]
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
