"""Metastases: count, volumes, appearance and placement inside bone (docs/cohort.md 1.1)."""

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
from sap_lightning.synthetic.rasterize import AnatomyMaps, grow_box
from sap_lightning.synthetic.tissues import (
    EXTENSION_FRACTION,
    EXTENSION_SHARE,
    LESION_B1000_RATIO,
    LESION_COUNT_EXTRA_MEAN,
    LESION_COUNT_SHAPE,
    LESION_EDGE,
    LESION_LOG_SIGMA,
    LESION_MAX_ML,
    LESION_MEDIAN_ML,
    LESION_SITE_WEIGHTS,
    LESION_T1_RANGE,
    LESION_TEXTURE,
    MIN_LESION_VOXELS,
    RED_MARROW_B1000,
    SCLEROTIC_B1000_RATIO,
    SCLEROTIC_SHARE,
    SCLEROTIC_T1_RANGE,
    Tissue,
)

log = logging.getLogger(__name__)

EXTENSION_TISSUES = (Tissue.FAT, Tissue.MUSCLE)
"""What a metastasis may grow into when it breaks through the cortex."""
_CUBE = np.ones((3, 3, 3), bool)


def sample_lesion_count(rng: np.random.Generator) -> int:
    """Number of metastases of one patient: 1 + negative binomial (shape 0.8, mean 5).

    Every patient has at least one; the count is skewed (median about 4, one patient in ten with
    14 or more) and has no upper limit.
    """
    p = LESION_COUNT_SHAPE / (LESION_COUNT_SHAPE + LESION_COUNT_EXTRA_MEAN)
    return 1 + int(rng.negative_binomial(LESION_COUNT_SHAPE, p))


def sample_lesion_volumes_ml(rng: np.random.Generator, n: int) -> np.ndarray:
    """Intended lesion volumes (mL): log-normal with median 0.5 mL and a quarter >= 1 mL."""
    volumes = np.exp(rng.normal(math.log(LESION_MEDIAN_ML), LESION_LOG_SIGMA, n))
    return np.minimum(volumes, LESION_MAX_ML)


@dataclass(frozen=True)
class Lesion:
    """A placed metastasis: its id in the lesion-id map, region of its seed, volumes, look.

    ``volume_ml`` counts every voxel (bone and extension); ``t1`` and ``b1000`` are its signal
    (fractions of the channel scale), ``texture`` the amplitude of its heterogeneity and
    ``edge`` the share of its contrast its boundary voxels keep.
    """

    index: int
    region: int
    intended_ml: float
    volume_ml: float
    extension_ml: float = 0.0
    sclerotic: bool = False
    t1: float = 0.22
    b1000: float = 2.2 * RED_MARROW_B1000
    texture: float = 0.0
    edge: float = 1.0


def sample_lesion_look(rng: np.random.Generator) -> dict[str, float | bool]:
    """One metastasis's appearance (docs/cohort.md 1.1): viable or sclerotic, T1, b1000
    (a multiple of red marrow: log-uniform for viable, uniform for sclerotic), heterogeneity
    and edge."""
    sclerotic = bool(rng.random() < SCLEROTIC_SHARE)
    if sclerotic:
        t1 = rng.uniform(*SCLEROTIC_T1_RANGE)
        ratio = rng.uniform(*SCLEROTIC_B1000_RATIO)
    else:
        t1 = rng.uniform(*LESION_T1_RANGE)
        ratio = math.exp(rng.uniform(*np.log(LESION_B1000_RATIO)))
    return {
        "sclerotic": sclerotic,
        "t1": float(t1),
        "b1000": float(ratio * RED_MARROW_B1000),
        "texture": float(rng.uniform(*LESION_TEXTURE)),
        "edge": float(rng.uniform(*LESION_EDGE)),
    }


def grow_blob(
    rng: np.random.Generator,
    allowed: np.ndarray,
    seed: tuple[int, int, int],
    n_voxels: int,
    spacing: Sequence[float],
    roughness: float = 0.35,
) -> np.ndarray:
    """Grow a 6-connected blob of up to ``n_voxels`` inside ``allowed`` from ``seed``.

    Voxels join in order of a score that falls with distance from the seed (in mm, through a
    randomly oriented ellipsoid) plus smoothed noise (``roughness``): the result is a
    thresholded noisy blob, irregular, connected by construction and clipped to ``allowed``.
    Metastases and the blob-shaped mimics are grown alike, so shape does not tell them apart.
    """
    spacing = np.asarray(spacing, float)
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
    score = np.pad(-np.sqrt(dist2) / radius + roughness * noise, 1)
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


def blob_box(
    seed: Sequence[int], n_voxels: int, spacing: np.ndarray, grid: Sequence[int]
) -> tuple[slice, ...]:
    """A box around ``seed`` roomy enough for a blob of ``n_voxels`` (three radii each way)."""
    reach = n_voxels * float(np.prod(spacing))
    half = np.ceil(3.0 * (3 * reach / (4 * math.pi)) ** (1 / 3) / spacing).astype(int) + 2
    return tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(seed, half, grid))


def grow_in_box(
    rng: np.random.Generator,
    allowed: np.ndarray,
    seed: Sequence[int],
    n_voxels: int,
    spacing: np.ndarray,
    roughness: float = 0.35,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """:func:`grow_blob` on the box around ``seed`` of a whole-grid ``allowed`` mask."""
    box = blob_box(seed, n_voxels, spacing, allowed.shape)
    local = tuple(int(c - b.start) for c, b in zip(seed, box))
    return box, grow_blob(rng, allowed[box], local, n_voxels, spacing, roughness)


def _near_soft_tissue(maps: AnatomyMaps) -> np.ndarray:
    """Marrow within two in-plane voxels of soft tissue: where an extending lesion starts."""
    cross = np.zeros((3, 3, 1), bool)
    cross[1, :, 0] = cross[:, 1, 0] = True
    soft = np.isin(maps.tissue, EXTENSION_TISSUES) & ~maps.bone
    return maps.marrow & ndimage.binary_dilation(soft, cross, iterations=2)


def _extend(
    rng: np.random.Generator,
    maps: AnatomyMaps,
    ids: np.ndarray,
    blocked: np.ndarray,
    index: int,
    box: tuple[slice, ...],
    spacing: np.ndarray,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Grow lesion ``index`` through its cortex into adjacent fat or muscle: the extension as
    ``(box, mask)``, or None when no soft tissue touches the lesion."""
    near = grow_box(box, ids.shape)
    lesion = ids[near] == index
    touching = np.argwhere(ndimage.binary_dilation(lesion) & _soft(maps, ids, blocked, near))
    if not len(touching):
        return None
    n_voxels = max(1, round(rng.uniform(*EXTENSION_FRACTION) * int(lesion.sum())))
    start = tuple(int(c) for c in touching[rng.integers(len(touching))] + [s.start for s in near])
    ext_box = blob_box(start, n_voxels, spacing, ids.shape)
    local = tuple(int(c - b.start) for c, b in zip(start, ext_box))
    allowed = _soft(maps, ids, blocked, ext_box)
    return ext_box, grow_blob(rng, allowed, local, n_voxels, spacing)


def _soft(
    maps: AnatomyMaps, ids: np.ndarray, blocked: np.ndarray, box: tuple[slice, ...]
) -> np.ndarray:
    """Within ``box``: fat or muscle outside bone, free of lesions and their surroundings."""
    return (
        np.isin(maps.tissue[box], EXTENSION_TISSUES)
        & (maps.region[box] == 0)
        & ~blocked[box]
        & (ids[box] == 0)
    )


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def place_lesions(
    rng: np.random.Generator,
    maps: AnatomyMaps,
    spacing: Sequence[float],
    volumes_ml: Sequence[float],
    attempts: int = 8,
    extension_share: float = EXTENSION_SHARE,
) -> tuple[np.ndarray, list[Lesion]]:
    """Grow one metastasis per intended volume inside bone; return the lesion-id map (int16).

    Seeds are marrow voxels of a bone region drawn with :data:`LESION_SITE_WEIGHTS`; each lesion
    keeps one voxel (26-neighbourhood) away from the others, so the 6-connected components of
    the mask are exactly the lesions. A lesion that cannot reach its volume in the bone around
    its seed (a rib is thin) is retried elsewhere and the largest attempt kept (dropped if under
    :data:`MIN_LESION_VOXELS`). A share ``extension_share`` of the lesions of >= 1 mL starts
    next to the cortex and grows through it into the fat or muscle beside the bone. Each lesion
    gets its look (:func:`sample_lesion_look`). The tissue map is updated in place (LESION in
    bone, LESION_EXTENSION outside).
    """
    spacing_arr = np.asarray(spacing, float)
    voxel_ml = float(np.prod(spacing_arr)) / 1000.0
    grid = maps.region.shape
    bone = maps.bone
    blocked = np.zeros(grid, bool)
    ids = np.zeros(grid, np.int16)
    extension = np.zeros(grid, bool)
    marrow = maps.marrow
    near_soft = _near_soft_tissue(maps)
    seeds = {r: np.flatnonzero(marrow & (maps.region == r)) for r in LESION_SITE_WEIGHTS}
    edge_seeds = {r: np.flatnonzero(near_soft & (maps.region == r)) for r in LESION_SITE_WEIGHTS}
    sites = [r for r in LESION_SITE_WEIGHTS if seeds[r].size]
    if not sites:
        return ids, []
    weights = np.array([LESION_SITE_WEIGHTS[r] for r in sites])
    weights /= weights.sum()
    lesions: list[Lesion] = []
    for intended in volumes_ml:
        extends = float(intended) >= 1.0 and bool(rng.random() < extension_share)
        n_voxels = max(MIN_LESION_VOXELS, round(float(intended) / voxel_ml))
        best: tuple[np.ndarray, tuple[slice, ...], int] | None = None
        for _ in range(attempts):
            site = int(sites[rng.choice(len(sites), p=weights)])
            pool = edge_seeds[site] if extends and edge_seeds[site].size else seeds[site]
            seed = np.unravel_index(int(rng.choice(pool)), grid)
            if blocked[seed]:
                continue
            box, blob = grow_in_box(
                rng, bone & ~blocked, tuple(int(c) for c in seed), n_voxels, spacing_arr
            )
            if best is None or blob.sum() > best[0].sum():
                best = (blob, box, site)
            if blob.sum() >= 0.8 * n_voxels:
                break
        if best is None or best[0].sum() < MIN_LESION_VOXELS:
            continue
        blob, box, site = best
        index = len(lesions) + 1
        ids[box][blob] = index
        extension_ml = 0.0
        if extends:
            grown = _extend(rng, maps, ids, blocked, index, box, spacing_arr)
            if grown is not None:
                ext_box, ext = grown
                ids[ext_box][ext] = index
                extension[ext_box] |= ext
                extension_ml = float(ext.sum()) * voxel_ml
                box = _union(box, ext_box)
        near = grow_box(box, grid)
        mine = ids[near] == index
        blocked[near] |= ndimage.binary_dilation(mine, _CUBE)
        volume_ml = float(mine.sum()) * voxel_ml
        look = sample_lesion_look(rng)
        lesions.append(
            Lesion(index, site, float(intended), volume_ml, extension_ml, **look)  # type: ignore[arg-type]
        )
    _check_lesions_separate(ids, len(lesions))
    maps.tissue[(ids > 0) & ~extension] = Tissue.LESION
    maps.tissue[extension] = Tissue.LESION_EXTENSION
    return ids, lesions


def _check_lesions_separate(ids: np.ndarray, n: int) -> None:
    """Each lesion must be exactly one 6-connected component of the binary mask."""
    components, count = connected_components(ids, connectivity=DEFAULT_CONNECTIVITY)
    if count != n:
        raise RuntimeError(f"phantom lesions merged or split: {n} lesions, {count} components")
    for index in range(1, n + 1):
        if np.unique(components[ids == index]).size != 1:
            raise RuntimeError(f"phantom lesion {index} is not one connected component")
