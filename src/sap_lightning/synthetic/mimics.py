"""Mimics: what is dark on T1 and bright on b1000 like a metastasis, or dark on both like a
sclerotic one, but is not labelled (docs/cohort.md sections 1.2 and 1.3).

Two steps. :func:`plan_mimics` draws, once per person, which mimics there are and their size,
look and landmark (from :data:`~sap_lightning.synthetic.mimic_table.MIMIC_KINDS`, scaled by the
``mimics`` knob). :func:`place_mimics` draws that plan into one scan's tissue map after the
metastases: in-bone mimics over marrow, the others over soft tissue, each one voxel away from
every metastasis, never in the label. Each kind draws from its own generator, and counts come
before the instances, so a cohort at ``mimics=2`` holds the instances of ``mimics=1`` and more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sap_lightning.synthetic.anatomy import ScanPose, SubjectAnatomy
from sap_lightning.synthetic.frame import BodyFrame
from sap_lightning.synthetic.landmarks import (
    bone_anchors,
    bowel_target,
    endplate_band,
    foramen,
    fracture_band,
    organ_shape,
    station,
)
from sap_lightning.synthetic.lesions import blob_box, grow_blob, sample_lesion_volumes_ml
from sap_lightning.synthetic.mimic_table import (
    COHORTS,
    DRG_LEVELS,
    FRACTURE_THICKNESS_MM,
    FRACTURE_VERTEBRAE,
    MIMIC_BY_NAME,
    MIMIC_KINDS,
    MODIC_COVERAGE,
    MODIC_PAIRED,
    MODIC_THICKNESS_MM,
    NODAL_METASTASIS_ELONGATION,
    NODAL_METASTASIS_SHORT_AXIS_MM,
    NODE_ELONGATION,
    NODE_SHORT_AXIS_MM,
    MimicKind,
    drg_volume_ml,
    ellipsoid_ml,
)
from sap_lightning.synthetic.rasterize import AnatomyMaps, VoxelGrid, dilate
from sap_lightning.synthetic.tissues import Tissue

log = logging.getLogger(__name__)

_CUBE = np.ones((3, 3, 3), bool)
GANGLION_TISSUES = (Tissue.FAT, Tissue.MUSCLE)
NODE_TISSUES = (Tissue.FAT, Tissue.MUSCLE, Tissue.BOWEL)
"""Soft tissue ganglia, nodes and organs are drawn over (never bone, CSF or another organ)."""
SEARCH_MM = {"bone_blob": 30.0, "soft_blob": 25.0, "bowel": 40.0}
"""How far from its landmark a mimic's seed may be found (world mm)."""


@dataclass(frozen=True)
class PlannedMimic:
    """One mimic of one person: kind, landmark and offset there, size and look.

    ``site`` names the landmark group (``pelvis``, ``L4/L5``, ``inguinal``, ...), ``side`` is
    +1 right, -1 left or 0, ``anchor`` picks one landmark of the group, ``where`` is the offset
    in it (units of its half-extent, or of a station's spread), ``extra`` holds band numbers
    (thickness mm, coverage, both endplates), ``seed`` the growth generator's seed.
    """

    kind: str
    site: str
    side: int
    anchor: int
    where: tuple[float, float, float]
    volume_ml: float
    t1: float
    b1000: float
    touching: bool = False
    extra: tuple[float, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Mimic:
    """A placed mimic: its id in the mimic-id map, kind, tissue code, site, size and look."""

    index: int
    kind: str
    tissue: int
    site: str
    voxels: int
    volume_ml: float
    t1: float
    b1000: float
    touches_bone: bool


def sample_count(rng: np.random.Generator, kind: MimicKind, cohort: str, mimics: float) -> int:
    """How many instances of ``kind`` one person has at knob ``mimics`` (docs/cohort.md 3):
    Poisson(``mimics`` x expected), at most ``cap``; an organ is present (one instance per
    side) with probability min(1, ``mimics`` x expected)."""
    if mimics < 0 or not math.isfinite(mimics):
        raise ValueError(f"mimics must be a finite number >= 0, got {mimics}")
    expected = kind.expected[COHORTS.index(cohort)] * mimics
    if kind.organ:
        return len(kind.sides) if rng.random() < min(1.0, expected) else 0
    count = int(rng.poisson(expected))
    return count if kind.cap is None else min(count, kind.cap)


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _plan_kind(rng: np.random.Generator, kind: MimicKind, count: int) -> list[PlannedMimic]:
    """``count`` instances of ``kind``, each drawn in turn from ``rng``."""
    out: list[PlannedMimic] = []
    free = [(level, side) for level in range(len(DRG_LEVELS)) for side in (1, -1)]
    for i in range(count):
        side, anchor, where, touching, extra = 0, 0, (0.0, 0.0, 0.0), False, ()
        if kind.organ:
            site, side = kind.name, kind.sides[i % len(kind.sides)]
            volume = float(rng.uniform(*kind.volume_ml))  # type: ignore[misc]
        elif kind.name == "dorsal_root_ganglion":
            weights = np.array([drg_volume_ml(level) for level, _ in free])
            level, side = free.pop(int(rng.choice(len(free), p=weights / weights.sum())))
            site, volume, touching = DRG_LEVELS[level], drg_volume_ml(level), True
        elif kind.placement == "soft_blob":
            site = _choice(rng, kind.sites)
            side = int(rng.choice([1, -1]))
            where = tuple(rng.normal(0.0, 1.0, 3).tolist())
            node = kind.name == "lymph_node"
            short = rng.uniform(*(NODE_SHORT_AXIS_MM if node else NODAL_METASTASIS_SHORT_AXIS_MM))
            stretch = rng.uniform(*(NODE_ELONGATION if node else NODAL_METASTASIS_ELONGATION))
            volume = ellipsoid_ml(short, short * stretch)
            touching = bool(rng.random() < kind.touching)
        elif kind.placement == "band":
            site = _choice(rng, kind.sites)
            if kind.name == "modic_type1":
                site = site.split(":")[1]
                extra = (
                    float(rng.uniform(*MODIC_THICKNESS_MM)),
                    float(rng.uniform(*MODIC_COVERAGE)),
                    float(rng.random() < MODIC_PAIRED),
                )
            else:
                site = (
                    str(rng.choice(FRACTURE_VERTEBRAE))
                    if site == "vertebral"
                    else f"sacral:{int(rng.choice([1, -1]))}"
                )
                extra = (float(rng.uniform(*FRACTURE_THICKNESS_MM)),)
            volume = 0.0
        elif kind.placement == "bowel":
            site = "bowel"
            where = tuple(rng.random(3).tolist())
            volume = _log_uniform(rng, kind.volume_ml)  # type: ignore[arg-type]
        else:  # bone_blob
            site = _choice(rng, kind.sites)
            anchor = int(rng.integers(1 << 16))
            direction = rng.normal(size=3)
            direction /= max(float(np.linalg.norm(direction)), 1e-9)
            where = tuple((0.6 * rng.random() ** (1 / 3) * direction).tolist())
            if kind.volume_ml is None:  # treated metastases: the metastases' volume law
                volume = float(sample_lesion_volumes_ml(rng, 1)[0])
            else:
                volume = _log_uniform(rng, kind.volume_ml)
        t1, b1000 = float(rng.uniform(*kind.t1)), float(rng.uniform(*kind.b1000))
        seed = int(rng.integers(2**31))
        out.append(
            PlannedMimic(
                kind.name, site, side, anchor, where, volume, t1, b1000, touching, extra, seed
            )
        )
    return out


def plan_mimics(seed_key: Sequence[int], cohort: str, mimics: float = 1.0) -> list[PlannedMimic]:
    """Every mimic of one person (``cohort`` ``healthy`` or ``patients``) at knob ``mimics``.

    Kind ``k`` draws its count from ``numpy.random.default_rng([*seed_key, k, 0])`` and its
    instances, one by one, from ``default_rng([*seed_key, k, 1])``, so a larger knob keeps the
    smaller knob's instances (and adds more).
    """
    if cohort not in COHORTS:
        raise ValueError(f"cohort must be one of {COHORTS}, got {cohort!r}")
    plan: list[PlannedMimic] = []
    for k, kind in enumerate(MIMIC_KINDS):
        count = sample_count(np.random.default_rng([*seed_key, k, 0]), kind, cohort, mimics)
        plan += _plan_kind(np.random.default_rng([*seed_key, k, 1]), kind, count)
    return plan


class _Placer:
    """Draws planned mimics into one scan's maps (see :func:`place_mimics`)."""

    def __init__(
        self,
        maps: AnatomyMaps,
        lesion_ids: np.ndarray,
        anatomy: SubjectAnatomy,
        pose: ScanPose,
        spacing: Sequence[float],
    ):
        self.maps = maps
        self.frame = BodyFrame(anatomy, pose, spacing)
        self.grid = VoxelGrid(anatomy, pose, maps.tissue.shape, spacing)
        self.scale = np.asarray(anatomy.scale, float)
        self.spacing = np.asarray(spacing, float)
        self.voxel_ml = float(np.prod(self.spacing)) / 1000.0
        self.forbidden = dilate(lesion_ids > 0)
        self.next_to_bone = dilate(maps.region > 0) & (maps.region == 0)
        self.ids = np.zeros(maps.tissue.shape, np.int16)

    # -- masks on a box ------------------------------------------------------------------------

    def marrow(self, region: int) -> Callable[[tuple[slice, ...]], np.ndarray]:
        def allowed(box: tuple[slice, ...]) -> np.ndarray:
            return (
                (self.maps.tissue[box] == Tissue.MARROW)
                & (self.maps.region[box] == region)
                & ~self.forbidden[box]
            )

        return allowed

    def soft(self, tissues: tuple[Tissue, ...]) -> Callable[[tuple[slice, ...]], np.ndarray]:
        def allowed(box: tuple[slice, ...]) -> np.ndarray:
            return (
                np.isin(self.maps.tissue[box], tissues)
                & (self.maps.region[box] == 0)
                & ~self.forbidden[box]
            )

        return allowed

    def touching_bone(self, box: tuple[slice, ...]) -> np.ndarray:
        """Within ``box``: voxels outside bone that touch it (26-neighbourhood)."""
        return self.next_to_bone[box]

    # -- seeds and growth ----------------------------------------------------------------------

    def nearest(
        self, target: np.ndarray, allowed: Callable, radius_mm: float, touching: bool = False
    ) -> tuple[int, int, int] | None:
        """The allowed voxel nearest to design point ``target`` within ``radius_mm``."""
        centre = self.grid.voxel_of(target)
        half = np.ceil(radius_mm / self.spacing).astype(int)
        lo = np.clip(np.round(centre).astype(int) - half, 0, self.grid.shape)
        hi = np.clip(np.round(centre).astype(int) + half + 1, 0, self.grid.shape)
        if np.any(hi <= lo):
            return None
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask = allowed(box)
        if touching:
            mask &= self.touching_bone(box)
        found = np.argwhere(mask)
        if not len(found):
            return None
        dist = np.linalg.norm((found + lo - centre) * self.spacing, axis=1)
        best = int(np.argmin(dist))
        if dist[best] > radius_mm:
            return None
        return tuple(int(c) for c in found[best] + lo)  # type: ignore[return-value]

    def grow(
        self, p: PlannedMimic, seed: tuple[int, int, int], allowed: Callable
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        n_voxels = max(1, round(p.volume_ml / self.voxel_ml))
        box = blob_box(seed, n_voxels, self.spacing, self.grid.shape)
        local = tuple(int(c - b.start) for c, b in zip(seed, box))
        rng = np.random.default_rng(p.seed)
        return box, grow_blob(rng, allowed(box), local, n_voxels, self.spacing)

    # -- one instance --------------------------------------------------------------------------

    def place(self, p: PlannedMimic) -> tuple[tuple[slice, ...], np.ndarray] | None:
        kind = MIMIC_BY_NAME[p.kind]
        f = self.frame
        if kind.organ:
            found = self.grid.shape_mask(organ_shape(f, p.kind, p.side, p.volume_ml, self.scale))
            if found is None:
                return None
            box, mask = found
            return box, mask & self.soft(NODE_TISSUES)(box)
        if kind.placement == "band":
            return self.band(p)
        if kind.placement == "bone_blob":
            anchors = bone_anchors(f, p.site)
            centre, half, region = anchors[p.anchor % len(anchors)]
            allowed = self.marrow(region)
            target = centre + np.asarray(p.where) * half
        elif kind.placement == "bowel":
            allowed = self.soft((Tissue.BOWEL,))
            target = bowel_target(f, np.asarray(p.where))
        elif p.kind == "dorsal_root_ganglion":
            allowed = self.soft(GANGLION_TISSUES)
            target = foramen(f, DRG_LEVELS.index(p.site), p.side)
        else:  # lymph nodes and nodal metastases
            allowed = self.soft(NODE_TISSUES)
            target = station(f, p.site, p.side, np.asarray(p.where))
        seed = self.nearest(target, allowed, SEARCH_MM[kind.placement], p.touching)
        if seed is None and p.touching:  # no soft tissue against bone nearby: nearest at all
            seed = self.nearest(target, allowed, SEARCH_MM[kind.placement])
        return None if seed is None else self.grow(p, seed, allowed)

    def band(self, p: PlannedMimic) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """A Modic change (one or both endplates of a disc) or a fracture band, over marrow."""
        floor = 0.6 * self.spacing[2] / self.scale[2]  # at least 0.6 slice, in design mm
        thickness = max(p.extra[0] / self.scale[2], floor)
        if p.kind == "modic_type1":
            sides = (True, False) if p.extra[2] else (bool(p.seed % 2),)
            shapes = [endplate_band(self.frame, p.site, up, thickness, p.extra[1]) for up in sides]
        else:
            shapes = [fracture_band(self.frame, p.site, thickness)]
        parts = [found for s in shapes if (found := self.grid.shape_mask(s)) is not None]
        if not parts:
            return None
        box = tuple(
            slice(min(b[i].start for b, _ in parts), max(b[i].stop for b, _ in parts))
            for i in range(3)
        )
        mask = np.zeros(tuple(s.stop - s.start for s in box), bool)
        for b, m in parts:
            mask[tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(b, box))] |= m
        inside = (self.maps.tissue[box] == Tissue.MARROW) & ~self.forbidden[box]
        return box, mask & inside


def place_mimics(
    plan: Sequence[PlannedMimic],
    maps: AnatomyMaps,
    lesion_ids: np.ndarray,
    anatomy: SubjectAnatomy,
    pose: ScanPose,
    spacing: Sequence[float],
) -> tuple[np.ndarray, list[Mimic]]:
    """Draw ``plan`` into one scan; return the mimic-id map (int16) and the placed mimics.

    Mimics never overlap a metastasis or its 26-neighbourhood, nor each other. A planned mimic
    whose landmark holds no free voxel on this grid is left out (and not returned). The tissue
    map is updated in place; the region map is not (an in-bone mimic stays bone).
    """
    placer = _Placer(maps, lesion_ids, anatomy, pose, spacing)
    placed: list[Mimic] = []
    for p in plan:
        found = placer.place(p)
        if found is None or not found[1].any():
            log.debug("mimic %s at %s left out: no room on this grid", p.kind, p.site)
            continue
        box, mask = found
        kind = MIMIC_BY_NAME[p.kind]
        index = len(placed) + 1
        maps.tissue[box][mask] = kind.tissue
        placer.ids[box][mask] = index
        placer.forbidden[box] |= mask
        touches = bool((placer.touching_bone(box) & mask).any()) and not kind.in_bone
        voxels = int(mask.sum())
        placed.append(
            Mimic(
                index,
                p.kind,
                int(kind.tissue),
                p.site if not p.side else f"{p.site} {'right' if p.side > 0 else 'left'}",
                voxels,
                voxels * placer.voxel_ml,
                p.t1,
                p.b1000,
                touches,
            )
        )
    return placer.ids, placed
