"""Metastases: count, volumes and placement inside bone."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sap_lightning.core.lesions import connected_components
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.synthetic.anatomy import lognormal_volumes
from sap_lightning.synthetic.rasterize import AnatomyMaps, grow_box
from sap_lightning.synthetic.tissues import (
    LESION_MAX_ML,
    LESION_SITE_WEIGHTS,
    MAX_LESIONS,
    MIN_LESION_VOXELS,
    Tissue,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------


def sample_lesion_count(rng: np.random.Generator) -> int:
    """Number of metastases of one patient: negative binomial, mean about 4, capped at 12.

    About one patient in seven has none, a few have ten or more.
    """
    return int(min(rng.negative_binomial(1.5, 1.5 / (1.5 + 4.0)), MAX_LESIONS))


def sample_lesion_volumes_ml(rng: np.random.Generator, n: int) -> np.ndarray:
    """Intended lesion volumes (mL): log-normal with median 0.5 mL and a quarter >= 1 mL."""
    return np.minimum(lognormal_volumes(rng, n), LESION_MAX_ML)


@dataclass(frozen=True)
class Lesion:
    """A placed metastasis: its id in the lesion-id map, bone region of its seed, volumes."""

    index: int
    region: int
    intended_ml: float
    volume_ml: float


def _grow_lesion(
    rng: np.random.Generator,
    allowed: np.ndarray,
    seed: tuple[int, int, int],
    n_voxels: int,
    spacing: np.ndarray,
) -> np.ndarray:
    """Grow a 6-connected blob of up to ``n_voxels`` inside ``allowed`` from ``seed``.

    Voxels join in order of a score that falls with distance from the seed (in mm, through a
    randomly oriented ellipsoid) plus smoothed noise: the result is a thresholded noisy blob,
    irregular, connected by construction and clipped to ``allowed`` (the bone).
    """
    coords = [(np.arange(n) - c) * s for n, c, s in zip(allowed.shape, seed, spacing)]
    radius = (3.0 * n_voxels * float(np.prod(spacing)) / (4.0 * math.pi)) ** (1 / 3)
    axes = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    stretch = rng.uniform(0.7, 1.4, 3)
    grids = (coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :])
    dist2 = sum(
        ((grids[0] * axes[0, j] + grids[1] * axes[1, j] + grids[2] * axes[2, j]) / stretch[j]) ** 2
        for j in range(3)
    )
    noise = ndimage.gaussian_filter(rng.normal(size=allowed.shape), 1.0)
    noise /= max(float(noise.std()), 1e-6)
    score = np.pad(-np.sqrt(dist2) / radius + 0.35 * noise, 1)
    ok = np.pad(allowed, 1)
    shape = ok.shape
    strides = (shape[1] * shape[2], shape[2], 1)
    offsets = [s * d for s in strides for d in (1, -1)]
    flat_ok, flat_score = ok.ravel(), score.ravel()
    start = int(np.ravel_multi_index(tuple(c + 1 for c in seed), shape))
    visited = np.zeros(flat_ok.size, bool)
    visited[start] = True
    heap, taken = [(-flat_score[start], start)], []
    while heap and len(taken) < n_voxels:
        _, index = heapq.heappop(heap)
        taken.append(index)
        for off in offsets:
            nb = index + off
            if flat_ok[nb] and not visited[nb]:
                visited[nb] = True
                heapq.heappush(heap, (-flat_score[nb], nb))
    out = np.zeros(flat_ok.size, bool)
    out[taken] = True
    return out.reshape(shape)[1:-1, 1:-1, 1:-1]


def place_lesions(
    rng: np.random.Generator,
    maps: AnatomyMaps,
    spacing: Sequence[float],
    volumes_ml: Sequence[float],
    attempts: int = 8,
) -> tuple[np.ndarray, list[Lesion]]:
    """Grow one metastasis per intended volume inside bone; return the lesion-id map (int16).

    Seeds are marrow voxels of a bone region drawn with :data:`LESION_SITE_WEIGHTS`; each lesion
    keeps one voxel (26-neighbourhood) away from the others, so the 6-connected components of
    the mask are exactly the lesions. A lesion that cannot reach its volume in the bone around
    its seed (a rib is thin) is retried elsewhere and the largest attempt kept (dropped if under
    :data:`MIN_LESION_VOXELS`). The tissue map is updated in place (LESION).
    """
    spacing_arr = np.asarray(spacing, float)
    voxel_ml = float(np.prod(spacing_arr)) / 1000.0
    grid = maps.region.shape
    bone = maps.bone
    blocked = np.zeros(grid, bool)
    ids = np.zeros(grid, np.int16)
    marrow = maps.marrow
    seeds = {r: np.flatnonzero(marrow & (maps.region == r)) for r in LESION_SITE_WEIGHTS}
    sites = [r for r in LESION_SITE_WEIGHTS if seeds[r].size]
    if not sites:
        return ids, []
    weights = np.array([LESION_SITE_WEIGHTS[r] for r in sites])
    weights /= weights.sum()
    lesions: list[Lesion] = []
    for intended in volumes_ml:
        n_voxels = max(MIN_LESION_VOXELS, round(float(intended) / voxel_ml))
        reach = n_voxels * voxel_ml * 1000.0
        half = np.ceil(3.0 * (3 * reach / (4 * math.pi)) ** (1 / 3) / spacing_arr).astype(int) + 2
        best: tuple[np.ndarray, tuple[slice, ...], int] | None = None
        for _ in range(attempts):
            site = int(sites[rng.choice(len(sites), p=weights)])
            seed = np.unravel_index(int(rng.choice(seeds[site])), grid)
            if blocked[seed]:
                continue
            box = tuple(
                slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(seed, half, grid)
            )
            local_seed = tuple(int(c - b.start) for c, b in zip(seed, box))
            blob = _grow_lesion(rng, bone[box] & ~blocked[box], local_seed, n_voxels, spacing_arr)
            if best is None or blob.sum() > best[0].sum():
                best = (blob, box, site)
            if blob.sum() >= 0.8 * n_voxels:
                break
        if best is None or best[0].sum() < MIN_LESION_VOXELS:
            continue
        blob, box, site = best
        index = len(lesions) + 1
        ids[box][blob] = index
        near = grow_box(box, grid)
        blocked[near] |= ndimage.binary_dilation(ids[near] == index, np.ones((3, 3, 3), bool))
        lesions.append(Lesion(index, site, float(intended), float(blob.sum()) * voxel_ml))
    _check_lesions_separate(ids, len(lesions))
    maps.tissue[ids > 0] = Tissue.LESION
    return ids, lesions


def _check_lesions_separate(ids: np.ndarray, n: int) -> None:
    """Each lesion must be exactly one 6-connected component of the binary mask."""
    components, count = connected_components(ids, connectivity=DEFAULT_CONNECTIVITY)
    if count != n:
        raise RuntimeError(f"phantom lesions merged or split: {n} lesions, {count} components")
    for index in range(1, n + 1):
        if np.unique(components[ids == index]).size != 1:
            raise RuntimeError(f"phantom lesion {index} is not one connected component")
