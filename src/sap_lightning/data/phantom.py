"""Synthetic whole-body MRI cohort: healthy volunteers for skeleton pretraining, patients with
bone metastases for lesion fine-tuning.

No public WB-MRI metastasis dataset exists, so every command and test of the library runs on this
generator. What it draws is chosen so that the study keeps its meaning:

* two channels with plausible contrast: T1 (fat bright, marrow moderately bright, muscle
  intermediate, fluid and cortical bone dark) and DWI b1000 (fat suppressed, marrow dark,
  metastases, lymph nodes, kidneys, spleen, spinal cord and bladder bright);
* a skeleton whose bones have a cortical rim and marrow, labelled in the paper's 9 regions, with
  ribs (and skull, forearm and lower-leg bones) present in the image but unlabelled;
* metastases only inside bone (ribs included), with the paper's volume spread (log-normal,
  median 0.5 mL, a quarter >= 1 mL), never touching one another, so that 6-connected components
  are exactly the drawn lesions;
* b1000-bright *distractors* outside bone, so a model that ignores anatomy makes false positives;
* per-subject anatomy (height, build, proportions, spine curvature), per-scan pose, Rician noise
  and a smooth multiplicative bias field with WB-MRI station steps in the b1000 channel.

Geometry is written in an adult "design" space (mm of a 1750 mm tall man: ``x`` to the subject's
right, ``y`` anterior, ``zv`` downward from the vertex) and mapped by one affine into the field of
view, which it fills; the arrays follow the NIfTI RAS+ convention of
:func:`~sap_lightning.data.layout.affine_from_spacing` (axis 0 towards the subject's right,
axis 1 anterior, axis 2 towards the head). Rendering works on each structure's bounding box.

Everything is deterministic for a seed: each case draws from its own ``numpy`` generator derived
from ``(seed, stream, index)``, so case ``k`` is identical whatever the cohort size.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import cc3d
import numpy as np
from scipy import ndimage

from sap_lightning.data import layout
from sap_lightning.errors import ConfigError, DatasetError
from sap_lightning.io import atomic_dir, write_json

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------------------------

SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "tiny": ((64, 64, 128), (4.5, 4.5, 9.0)),
    "small": ((96, 96, 192), (3.0, 3.0, 6.0)),
    "medium": ((128, 128, 256), (2.25, 2.25, 4.5)),
    "large": ((192, 192, 384), (1.5, 1.5, 3.0)),
}
"""Grid presets (shape, spacing in mm), all covering the same 288 x 288 x 1152 mm field of view,
so a seed gives the same bodies at every resolution. Shapes are multiples of 32 (Swin UNETR)."""

DEFAULT_SIZE = "small"
DEFAULT_HEALTHY = 10
DEFAULT_PATIENTS = 14

RIB_REGION = 10
"""Bone-region code of the ribs: bone in the image, label 0 in the skeleton map (as in the paper)."""
OTHER_BONE_REGION = 11
"""Bone-region code of skull, forearm, lower-leg and foot bones: bone, unlabelled."""

SKELETON_CLASSES: dict[str, int] = {k: v for k, v in layout.SKELETON_LABELS.items() if v > 0}

MIN_LESION_VOXELS = 3
"""Smaller lesions are drawn at this size: a 1-2 voxel blob is not a resolvable lesion."""
LESION_MEDIAN_ML = 0.5
LESION_LOG_SIGMA = math.log(2.0) / 0.6745
"""Log-normal spread giving P(volume >= 1 mL) = 0.25 around a 0.5 mL median (method.md)."""
LESION_MAX_ML = 10.0
MAX_LESIONS = 12

_STREAM_VOLUNTEER, _STREAM_HEALTHY_SCAN, _STREAM_PATIENT, _STREAM_PATIENT_SCAN = 0, 1, 2, 3
_STREAM_VOLUNTEER_SCANS = 4


class Tissue(IntEnum):
    """Tissue classes of the anatomy map; each has a (T1, b1000) signal in :data:`SIGNAL`."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    HEART = 4
    VESSEL = 5
    LIVER = 6
    SPLEEN = 7
    KIDNEY = 8
    BLADDER = 9
    BOWEL = 10
    BRAIN = 11
    CSF = 12
    CORD = 13
    DISC = 14
    LYMPH_NODE = 15
    BONE = 16  # while drawing; split into CORTEX and MARROW once the skeleton is complete
    CORTEX = 17
    MARROW = 18
    LESION = 19


SIGNAL: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (0.0, 0.0),
    Tissue.FAT: (0.95, 0.03),
    Tissue.MUSCLE: (0.32, 0.10),
    Tissue.LUNG: (0.04, 0.02),
    Tissue.HEART: (0.30, 0.05),
    Tissue.VESSEL: (0.22, 0.03),
    Tissue.LIVER: (0.45, 0.14),
    Tissue.SPLEEN: (0.38, 0.42),
    Tissue.KIDNEY: (0.33, 0.55),
    Tissue.BLADDER: (0.08, 0.60),
    Tissue.BOWEL: (0.45, 0.16),
    Tissue.BRAIN: (0.50, 0.32),
    Tissue.CSF: (0.10, 0.08),
    Tissue.CORD: (0.40, 0.55),
    Tissue.DISC: (0.34, 0.18),
    Tissue.LYMPH_NODE: (0.33, 0.75),
    Tissue.BONE: (0.65, 0.10),
    Tissue.CORTEX: (0.25, 0.05),  # rim voxel: thin cortical bone partial-volumed with marrow
    Tissue.MARROW: (0.65, 0.10),
    Tissue.LESION: (0.22, 0.70),
}
"""Noise-free signal per tissue (fractions of the channel's scanner scale). Marrow is red
(haematopoietic) in the axial skeleton; :data:`YELLOW_MARROW_SIGNAL` replaces it in long bones."""

YELLOW_MARROW_SIGNAL = (0.85, 0.05)
_YELLOW_MARROW_REGIONS = (SKELETON_CLASSES["femurs"], SKELETON_CLASSES["humeri"], OTHER_BONE_REGION)
LESION_T1_RANGE = (0.12, 0.32)
LESION_B1000_RANGE = (0.45, 0.95)
CHANNEL_SCALE = (1000.0, 400.0)
"""Scanner units of T1 and b1000: intensities are not in [0, 1], as on real scans."""

BONE_TISSUES = (Tissue.BONE, Tissue.CORTEX, Tissue.MARROW, Tissue.LESION)
DISTRACTOR_TISSUES = (Tissue.BLADDER, Tissue.KIDNEY, Tissue.CORD, Tissue.LYMPH_NODE, Tissue.SPLEEN)
"""Soft tissues that are bright on b1000 like a metastasis but lie outside bone."""
_SOFT_TISSUES = (Tissue.FAT, Tissue.MUSCLE, Tissue.BOWEL)

LESION_SITE_WEIGHTS: dict[int, float] = {
    SKELETON_CLASSES["cervical_spine"]: 0.05,
    SKELETON_CLASSES["thoracic_spine"]: 0.20,
    SKELETON_CLASSES["lumbar_spine"]: 0.16,
    SKELETON_CLASSES["pelvis"]: 0.24,
    SKELETON_CLASSES["femurs"]: 0.09,
    SKELETON_CLASSES["humeri"]: 0.04,
    SKELETON_CLASSES["scapulae"]: 0.04,
    SKELETON_CLASSES["clavicles"]: 0.02,
    SKELETON_CLASSES["sternum"]: 0.04,
    RIB_REGION: 0.12,
}
"""Where metastases are seeded (bone region -> probability): the red-marrow skeleton, where
prostate-cancer metastases occur; skull and distal limb bones get none."""


# --------------------------------------------------------------------------------------------
# Shapes in design space
# --------------------------------------------------------------------------------------------


class Shape(Protocol):
    """A solid in design space: a bounding box and a point-membership test."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray: ...


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Rotation matrix about a coordinate axis ("x", "y" or "z")."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _frame(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Orthonormal frame (columns) whose first axis is ``a`` and second lies in span(a, b)."""
    e0 = np.asarray(a, float) / np.linalg.norm(a)
    e1 = np.asarray(b, float) - np.dot(b, e0) * e0
    e1 /= np.linalg.norm(e1)
    return np.stack([e0, e1, np.cross(e0, e1)], axis=1)


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    axes: np.ndarray | None = None  # columns: the local axes in design coordinates

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.asarray(self.radii, float)
        half = r if self.axes is None else np.sqrt(((self.axes * r) ** 2).sum(axis=1))
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def contains(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        if self.axes is not None:
            a = self.axes
            d = tuple(d[0] * a[0, j] + d[1] * a[1, j] + d[2] * a[2, j] for j in range(3))
        return sum((d[j] / self.radii[j]) ** 2 for j in range(3)) <= 1.0


@dataclass(frozen=True)
class Cylinder:
    """Elliptic cylinder: radii in local axes 0 and 1, half height along local axis 2."""

    center: tuple[float, float, float]
    radii: tuple[float, float]
    half_height: float
    axes: np.ndarray | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.array([*self.radii, self.half_height], float)
        half = r if self.axes is None else np.abs(self.axes * r).sum(axis=1)
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def contains(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        if self.axes is not None:
            a = self.axes
            d = tuple(d[0] * a[0, j] + d[1] * a[1, j] + d[2] * a[2, j] for j in range(3))
        inside = (d[0] / self.radii[0]) ** 2 + (d[1] / self.radii[1]) ** 2 <= 1.0
        return inside & (np.abs(d[2]) <= self.half_height)


@dataclass(frozen=True)
class Capsule:
    """Segment ``p0``-``p1`` swept by a sphere whose radius tapers from ``r0`` to ``r1``."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        p = np.array([self.p0, self.p1], float)
        r = max(self.r0, self.r1)
        return p.min(axis=0) - r, p.max(axis=0) + r

    def contains(self, x, y, z):
        d = np.subtract(self.p1, self.p0)
        rel = (x - self.p0[0], y - self.p0[1], z - self.p0[2])
        t = (rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        dist2 = sum((rel[j] - t * d[j]) ** 2 for j in range(3))
        return dist2 <= (self.r0 + t * (self.r1 - self.r0)) ** 2


@dataclass(frozen=True)
class Swept:
    """Superelliptic cross-sections along ``zv``, interpolated linearly between knots.

    Used for the trunk, neck, lungs, spinal canal and cord: outlines whose centre and size change
    with height. ``power`` 2 is an ellipse; larger values give the flatter back of a trunk.
    """

    z: tuple[float, ...]
    cx: tuple[float, ...]
    cy: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    power: float = 2.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        cx, cy, a, b = (np.asarray(v, float) for v in (self.cx, self.cy, self.a, self.b))
        lo = np.array([(cx - a).min(), (cy - b).min(), min(self.z)])
        hi = np.array([(cx + a).max(), (cy + b).max(), max(self.z)])
        return lo, hi

    def contains(self, x, y, z):
        zz = np.broadcast_to(z, np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)))
        cx, cy, a, b = (np.interp(zz, self.z, v) for v in (self.cx, self.cy, self.a, self.b))
        p = self.power
        inside = np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p <= 1.0
        return inside & (zz >= self.z[0]) & (zz <= self.z[-1])


def _plus(point: Sequence[float], dx: float, dy: float, dz: float) -> np.ndarray:
    """``point`` moved by (dx, dy, dz) design mm."""
    return np.asarray(point, float) + np.array([dx, dy, dz])


def _grown(shape: Shape, d: float) -> Shape:
    """``shape`` made ``d`` mm thicker all round (fat around a muscle boundary)."""
    if isinstance(shape, Ellipsoid):
        return Ellipsoid(shape.center, tuple(r + d for r in shape.radii), shape.axes)
    if isinstance(shape, Capsule):
        return Capsule(shape.p0, shape.p1, shape.r0 + d, shape.r1 + d)
    if isinstance(shape, Swept):
        return Swept(
            shape.z,
            shape.cx,
            shape.cy,
            tuple(v + d for v in shape.a),
            tuple(v + d for v in shape.b),
            shape.power,
        )
    raise TypeError(f"cannot grow a {type(shape).__name__}")


# --------------------------------------------------------------------------------------------
# Subjects and scans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectAnatomy:
    """One person's body, fitted into a field of view; fixed across that person's scans.

    ``scale`` maps design mm to world mm per axis; ``origin`` is the world position of the
    design origin (the vertex on the midline).
    """

    fov_mm: tuple[float, float, float]
    scale: tuple[float, float, float]
    origin: tuple[float, float, float]
    proportions: tuple[float, float]  # trunk and leg length factors
    width: float
    depth: float
    fat: float  # subcutaneous fat thickness of the trunk, design mm
    spine_curvature: float
    scoliosis: float  # lateral deviation of the spine's mid point, design mm (signed)
    spine_tilt: float  # lateral drift of the lower spine, design mm (signed)
    shoulder_width: float
    abduction: float  # mean arm abduction, degrees
    organ_scale: float
    bladder_fill: float
    kidney_drop: float
    lymph_nodes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]
    intensity_jitter: tuple[tuple[float, float], ...]  # per Tissue: (T1, b1000) factors


@dataclass(frozen=True)
class ScanPose:
    """What changes between two scans of one person: arm position and body placement."""

    abduction: tuple[float, float]  # right and left arm, degrees
    angles: tuple[float, float, float]  # rotations about x, y, z, degrees
    shift: tuple[float, float, float]  # world mm


_MAX_ABDUCTION = 8.0
_ARM_LENGTHS = (300.0, 250.0)  # upper arm, forearm (design mm)
_LYMPH_NODE_SITES: tuple[tuple[float, float, float], ...] = (
    (28.0, -5.0, 660.0),  # para-aortic (y relative to the trunk centre)
    (-28.0, -5.0, 700.0),
    (48.0, 5.0, 775.0),  # common iliac
    (-48.0, 5.0, 775.0),
    (72.0, 18.0, 830.0),  # pelvic side wall
    (-72.0, 18.0, 830.0),
    (82.0, 62.0, 918.0),  # inguinal
    (-82.0, 62.0, 918.0),
    (140.0, -15.0, 400.0),  # axillary
    (-140.0, -15.0, 400.0),
    (55.0, 20.0, 300.0),  # supraclavicular
    (-55.0, 20.0, 300.0),
)


def _lognormal_volumes(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.exp(rng.normal(math.log(LESION_MEDIAN_ML), LESION_LOG_SIGMA, n))


def make_subject_anatomy(rng: np.random.Generator, fov_mm: Sequence[float]) -> SubjectAnatomy:
    """Draw one person's body and fit it into ``fov_mm`` (world extent of the grid, mm).

    The body fills the field of view from a small margin above the head down to about the feet;
    it is compressed laterally (and in depth) only as far as needed to keep the arms inside.
    """
    fov = tuple(float(v) for v in fov_mm)
    proportions = (rng.uniform(0.95, 1.06), rng.uniform(0.94, 1.06))
    width, depth = rng.uniform(0.97, 1.08), rng.uniform(0.97, 1.12)
    shoulder = rng.uniform(0.95, 1.05)
    abduction = rng.uniform(1.0, 5.0)
    fat = rng.uniform(10.0, 28.0)
    # Head and neck 300 mm, trunk 600 mm, legs 850 mm: a 1750 mm adult, with these proportions.
    body_bottom = 300.0 + 600.0 * proportions[0] + 850.0 * proportions[1]
    top_margin = rng.uniform(0.02, 0.04) * fov[2]
    u = rng.uniform(0.88, 1.0) * (fov[2] - top_margin) / body_bottom
    # Widest point: the hands with the largest abduction a pose can add; deepest: chest to toes.
    reach = sum(_ARM_LENGTHS) * (proportions[0] + proportions[1]) / 2
    half_width = (
        175.0 * shoulder + reach * math.sin(math.radians(_MAX_ABDUCTION)) + 32.0 + 0.6 * fat
    )
    y_lo, y_hi = -112.0 * depth - fat, 175.0
    kx = min(1.0, 0.92 * fov[0] / (2 * half_width * u))
    ky = min(1.0, 0.92 * fov[1] / ((y_hi - y_lo) * u))
    scale = (u * kx, u * ky, u)
    origin = (fov[0] / 2, fov[1] / 2 - (y_lo + y_hi) / 2 * scale[1], fov[2] - top_margin)

    n_nodes = int(rng.integers(2, 7))
    nodes = []
    for site in rng.choice(len(_LYMPH_NODE_SITES), size=n_nodes, replace=False):
        center = np.asarray(_LYMPH_NODE_SITES[site]) + rng.normal(0, 6.0, 3)
        volume = float(np.clip(_lognormal_volumes(rng, 1)[0], 0.25, 3.0))  # world mL
        radius_world = (3 * volume * 1000.0 / (4 * math.pi)) ** (1 / 3)
        elongation = rng.uniform(1.0, 1.6)
        radii = (radius_world / elongation**0.5, radius_world / elongation**0.5)
        radii_world = (*radii, radius_world * elongation)
        nodes.append((tuple(center), tuple(r / s for r, s in zip(radii_world, scale))))

    jitter = 1.0 + rng.normal(0.0, 0.04, (len(Tissue), 2))
    return SubjectAnatomy(
        fov_mm=fov,
        scale=scale,
        origin=origin,
        proportions=proportions,
        width=width,
        depth=depth,
        fat=fat,
        spine_curvature=rng.uniform(0.7, 1.3),
        scoliosis=rng.uniform(-8.0, 8.0),
        spine_tilt=rng.uniform(-5.0, 5.0),
        shoulder_width=shoulder,
        abduction=abduction,
        organ_scale=rng.uniform(0.9, 1.1),
        bladder_fill=rng.uniform(0.6, 1.3),
        kidney_drop=rng.uniform(-10.0, 15.0),
        lymph_nodes=tuple(nodes),
        intensity_jitter=tuple(map(tuple, jitter.tolist())),
    )


def sample_scan_pose(rng: np.random.Generator, anatomy: SubjectAnatomy) -> ScanPose:
    """Draw one scan's pose: arm abduction around the person's habit, small rotation and shift."""
    abduction = np.clip(anatomy.abduction + rng.normal(0, 1.5, 2), 0.0, _MAX_ABDUCTION)
    return ScanPose(
        abduction=(float(abduction[0]), float(abduction[1])),
        angles=(rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(-3.0, 3.0)),
        shift=(rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-8, 8)),
    )


def design_to_world(anatomy: SubjectAnatomy, pose: ScanPose) -> np.ndarray:
    """4x4 affine from design coordinates (x right, y anterior, zv down) to world mm."""
    place = np.eye(4)
    place[:3, :3] = np.diag([anatomy.scale[0], anatomy.scale[1], -anatomy.scale[2]])
    place[:3, 3] = anatomy.origin
    pivot = np.asarray(anatomy.fov_mm) / 2
    rot = (
        rotation("z", pose.angles[2])
        @ rotation("y", pose.angles[1])
        @ rotation("x", pose.angles[0])
    )
    move = np.eye(4)
    move[:3, :3] = rot
    move[:3, 3] = pivot - rot @ pivot + np.asarray(pose.shift)
    return move @ place


# --------------------------------------------------------------------------------------------
# The body
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paint:
    """One drawing step: fill ``shape`` with ``tissue`` and bone ``region`` (0 = not bone).

    ``over`` restricts the fill to voxels currently holding one of those tissues;
    ``clear_of_bone`` additionally keeps it one voxel away from any bone.
    """

    shape: Shape
    tissue: Tissue
    region: int = 0
    over: tuple[Tissue, ...] | None = None
    clear_of_bone: bool = False


@dataclass(frozen=True)
class _Vertebra:
    region: int
    z: float  # centre, design zv
    half_height: float
    radii: tuple[float, float]
    canal: tuple[float, float]
    cord: tuple[float, float] | None  # radii of the spinal cord, None below the conus (L1)
    spinous: tuple[float, float]  # length, downward angle (degrees)
    transverse: float
    disc_below: float


# (region, count, body height first/last, disc, body radii x first/last, y first/last,
#  canal radii, spinous length and angle, transverse process length)
_SPINE_SEGMENTS = (
    ("cervical_spine", 7, (12.0, 13.0), 4.0, (10.0, 13.0), (8.0, 10.0), (12.0, 8.0), (12, 30), 10),
    ("thoracic_spine", 12, (16.0, 22.0), 5.5, (14.0, 21.0), (12.0, 17.0), (8.0, 8.0), (26, 55), 26),
    ("lumbar_spine", 5, (25.0, 25.0), 8.0, (23.0, 25.0), (17.0, 18.0), (11.0, 9.0), (18, 10), 22),
)
_SPINE_TOP = 195.0
_CONUS = 19  # index of L1, the lowest vertebra the spinal cord reaches
# Sagittal spine profile: body-centre y (design mm) at heights zv, giving cervical lordosis,
# thoracic kyphosis, lumbar lordosis and the sacral curve.
_SPINE_Y = (
    (195, -15),
    (300, -25),
    (330, -42),
    (430, -58),
    (520, -55),
    (600, -40),
    (680, -28),
    (767, -40),
    (800, -58),
    (840, -78),
    (875, -78),
)
# Rib cage per rib 1..12: half-width, half-depth, anterior drop, angle where the bone ends (rad).
_RIBS = (
    (55, 45, 30, 2.3),
    (78, 62, 50, 2.4),
    (97, 75, 70, 2.4),
    (110, 84, 85, 2.4),
    (119, 89, 95, 2.4),
    (124, 92, 100, 2.4),
    (127, 93, 100, 2.35),
    (128, 93, 95, 2.2),
    (127, 91, 85, 2.05),
    (123, 88, 75, 1.9),
    (116, 83, 50, 1.6),
    (106, 76, 35, 1.25),
)
# Trunk muscle boundary: zv, half-width, half-depth, centre y.
_TRUNK = (
    (290, 62, 56, -12),
    (310, 140, 66, -14),
    (330, 160, 80, -12),
    (380, 152, 98, -4),
    (450, 147, 110, 2),
    (520, 145, 112, 2),
    (600, 137, 108, 3),
    (680, 136, 102, 3),
    (760, 152, 100, 0),
    (840, 160, 103, -5),
    (900, 156, 98, -5),
    (935, 118, 70, 0),
)


class _BodyBuilder:
    """Turns a :class:`SubjectAnatomy` and a :class:`ScanPose` into an ordered paint list.

    Later steps overwrite earlier ones: outline (fat), muscle, organs, bones, spinal canal and
    cord, lymph nodes. All numbers are design mm (see the module docstring).
    """

    def __init__(self, anatomy: SubjectAnatomy, pose: ScanPose, spacing: Sequence[float]):
        self.a = anatomy
        self.pose = pose
        self.steps: list[Paint] = []
        scale = np.asarray(anatomy.scale)
        # Thin bones (ribs, clavicles, scapula plates) are kept at least about half a voxel in
        # radius, otherwise point sampling makes them vanish on coarse grids.
        self.min_radius = 0.55 * np.asarray(spacing, float) / scale
        self.vertebrae = self._vertebrae(spacing)

    # -- coordinate helpers -------------------------------------------------------------------

    def z(self, zv: float) -> float:
        """Apply the subject's trunk and leg proportions to a design height."""
        t, leg = self.a.proportions
        if zv <= 300:
            return zv
        if zv <= 900:
            return 300 + (zv - 300) * t
        return 300 + 600 * t + (zv - 900) * leg

    def p(self, x: float, y: float, zv: float) -> tuple[float, float, float]:
        return (float(x), float(y), float(self.z(zv)))

    def thin(self, radius: float, axis: int | None = None) -> float:
        floor = self.min_radius.max() if axis is None else self.min_radius[axis]
        return max(radius, float(floor))

    def add(self, shape: Shape, tissue: Tissue, region: int = 0, **kw) -> None:
        self.steps.append(Paint(shape, tissue, region, **kw))

    def tube(self, points: Sequence[Sequence[float]], radius: float, tissue: Tissue, region: int):
        for p0, p1 in itertools.pairwise(points):
            self.add(Capsule(tuple(p0), tuple(p1), radius, radius), tissue, region)

    # -- spine geometry -----------------------------------------------------------------------

    def spine_x(self, zv: float) -> float:
        t = np.clip((zv - _SPINE_TOP) / (767.0 - _SPINE_TOP), 0.0, 1.0)
        return float(self.a.scoliosis * math.sin(math.pi * t) + self.a.spine_tilt * t)

    def spine_y(self, zv: float) -> float:
        zs, ys = np.array(_SPINE_Y, float).T
        straight = np.interp(zv, [zs[0], 767.0], [ys[0], -40.0])
        curve = np.interp(zv, zs, ys)
        return float(straight + self.a.spine_curvature * (curve - straight))

    def _vertebrae(self, spacing: Sequence[float]) -> list[_Vertebra]:
        """Stack the 24 vertebral bodies from C1 down, discs between them.

        A disc is kept at least 0.75 slice thick (or 40% of the segment) so the stack of
        bodies and discs stays visible at coarse slice spacing; the segment length is unchanged.
        The canal keeps at least one voxel of CSF around the cord, so the cord never touches bone.
        """
        min_disc = 0.75 * spacing[2] / self.a.scale[2]
        voxel = np.asarray(spacing, float) / np.asarray(self.a.scale)
        out, zv = [], _SPINE_TOP
        for name, count, heights, disc, rx, ry, canal, spinous, transverse in _SPINE_SEGMENTS:
            for i in range(count):
                f = i / max(count - 1, 1)
                pitch = heights[0] + f * (heights[1] - heights[0]) + disc
                disc_i = max(disc, min(min_disc, 0.4 * pitch))
                height = pitch - disc_i
                cord, canal_i = None, canal
                if len(out) <= _CONUS:
                    cord = (max(0.55 * canal[0], 3.5), max(0.55 * canal[1], 3.5))
                    canal_i = (max(canal[0], cord[0] + voxel[0]), max(canal[1], cord[1] + voxel[1]))
                out.append(
                    _Vertebra(
                        region=SKELETON_CLASSES[name],
                        z=zv + height / 2,
                        half_height=height / 2,
                        radii=(rx[0] + f * (rx[1] - rx[0]), ry[0] + f * (ry[1] - ry[0])),
                        canal=canal_i,
                        cord=cord,
                        spinous=spinous,
                        transverse=transverse,
                        disc_below=disc_i,
                    )
                )
                zv += pitch
        return out

    def canal_y(self, v: _Vertebra) -> float:
        return self.spine_y(v.z) - v.radii[1] - 1.0 - v.canal[1]

    # -- body parts ---------------------------------------------------------------------------

    def build(self) -> list[Paint]:
        self.outline()
        self.viscera()
        self.head()
        self.ribs()
        self.shoulder_girdle()
        self.sternum()
        self.pelvis()
        self.legs_bones()
        self.arm_bones()
        self.spine()
        self.lymph_nodes()
        return self.steps

    def trunk(self, grow: float = 0.0, power: float = 2.4) -> Swept:
        """The trunk's muscle boundary (``grow`` mm larger or, negative, smaller)."""
        zs, a, b, cy = np.array(_TRUNK, float).T
        return Swept(
            z=tuple(self.z(v) for v in zs),
            cx=tuple(0.0 for _ in zs),
            cy=tuple(cy),
            a=tuple(np.maximum(a * self.a.width + grow, 10.0)),
            b=tuple(np.maximum(b * self.a.depth + grow, 10.0)),
            power=power,
        )

    def arm_points(self, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shoulder joint, elbow and wrist of one arm (side +1 right, -1 left)."""
        abduction = self.pose.abduction[0 if side > 0 else 1]
        length = (self.a.proportions[0] + self.a.proportions[1]) / 2
        shoulder = np.array(self.p(side * 175.0 * self.a.shoulder_width, -8.0, 350.0))
        alpha = math.radians(abduction)
        elbow = shoulder + _ARM_LENGTHS[0] * length * np.array(
            [side * math.sin(alpha), 0.0, math.cos(alpha)]
        )
        beta = alpha + math.radians(1.0)
        wrist = elbow + _ARM_LENGTHS[1] * length * np.array(
            [side * math.sin(beta), 0.12, math.cos(beta)]
        )
        return shoulder, elbow, wrist

    def leg_points(self, side: int) -> dict[str, np.ndarray]:
        return {
            "hip": np.array(self.p(side * 88.0, 0.0, 850.0)),
            "thigh": np.array(self.p(side * 95.0, -5.0, 880.0)),
            "knee": np.array(self.p(side * 85.0, 5.0, 1270.0)),
            "calf": np.array(self.p(side * 86.0, -8.0, 1390.0)),
            "ankle": np.array(self.p(side * 80.0, 0.0, 1665.0)),
        }

    def outline(self) -> None:
        """Muscle-bounded body parts wrapped in subcutaneous fat (the skin outline).

        The part sizes are the muscle boundary, which contains the skeleton whatever the build;
        fat is added outside it, so a heavier subject is wider, never a thinner-boned one.
        """
        fat, limb_fat = self.a.fat, 0.6 * self.a.fat
        neck_z = tuple(self.z(v) for v in (200, 320))
        parts: list[tuple[Shape, float]] = [
            (Ellipsoid(self.p(0, 0, 118), (72, 92, 114)), 8.0),
            (Swept(neck_z, (0, 0), (-10, -12), (48, 56), (62, 62)), 0.5 * fat),
            (self.trunk(), fat),
        ]
        for side in (1, -1):
            shoulder, elbow, wrist = self.arm_points(side)
            hand = wrist + 0.3 * (wrist - elbow)
            leg = self.leg_points(side)
            parts += [
                # Trapezius and deltoid: neck base to shoulder, over clavicle and acromion.
                (
                    Capsule(
                        self.p(side * 40, -14, 300), _plus(shoulder, -side * 5, -2, -15), 40, 44
                    ),
                    0.5 * fat,
                ),
                (Capsule(tuple(shoulder), tuple(elbow), 40, 32), limb_fat),
                (Capsule(tuple(elbow), tuple(wrist), 32, 22), limb_fat),
                (Ellipsoid(tuple(hand), (14, 40, 74)), 4.0),
                (Capsule(tuple(leg["thigh"]), tuple(leg["knee"]), 80, 50), limb_fat),
                (Capsule(tuple(leg["knee"]), tuple(leg["calf"]), 50, 52), limb_fat),
                (Capsule(tuple(leg["calf"]), tuple(leg["ankle"]), 52, 28), limb_fat),
                (Ellipsoid(self.p(side * 80, 55, 1715), (36, 108, 29)), 6.0),
            ]
        for muscle, thickness in parts:
            self.add(_grown(muscle, thickness), Tissue.FAT)
        for muscle, _ in parts:
            self.add(muscle, Tissue.MUSCLE)

    def rib_cage(self, k: int) -> tuple[float, float, float, float]:
        """Rib ``k`` (1-12): thoracic vertebra centre zv, half-width, half-depth, centre y."""
        v = self.vertebrae[7 + k - 1]
        ax, by, _, _ = _RIBS[k - 1]
        tip_y = self.canal_y(v) - 3.0
        return v.z, ax * self.a.width**0.5, by * self.a.depth**0.5, tip_y - 8.0 + by

    def viscera(self) -> None:
        """Abdominal contents, paraspinal muscles, lungs, heart, great vessels and organs."""
        cavity = self.trunk(grow=-20.0, power=2.0)
        keep = [i for i, v in enumerate(cavity.z) if self.z(560) <= v <= self.z(905)]
        self.add(
            Swept(
                *(tuple(np.asarray(getattr(cavity, f))[keep]) for f in ("z", "cx", "cy", "a", "b"))
            ),
            Tissue.BOWEL,
        )
        # Paraspinal and psoas muscles keep the bowel in front of the spine.
        zs = [v.z for v in self.vertebrae[7:]] + [790.0]
        self.add(
            Swept(
                tuple(self.z(v) for v in zs),
                tuple(self.spine_x(v) for v in zs),
                tuple(self.spine_y(v) - 25 for v in zs),
                (60,) * len(zs),
                (48,) * len(zs),
            ),
            Tissue.MUSCLE,
        )
        for side in (1, -1):
            l1 = self.vertebrae[19]
            self.add(
                Capsule(
                    self.p(self.spine_x(l1.z) + side * 28, self.spine_y(l1.z), l1.z),
                    self.p(side * 95, 10, 895),
                    14,
                    24,
                ),
                Tissue.MUSCLE,
                over=(Tissue.BOWEL,),
            )

        # Lungs: inside the rib cage, from above rib 1 down to the diaphragm (right side higher).
        levels = [self.rib_cage(k) for k in range(1, 11)]
        for side, base_extra in ((1, 0.0), (-1, 14.0)):
            zs = [levels[0][0] - 18] + [
                zv + 0.35 * _RIBS[k][2] for k, (zv, *_) in enumerate(levels)
            ]
            zs[-1] += base_extra
            widths = [12.0] + [0.44 * ax - 6 for _, ax, _, _ in levels]
            depths = [18.0] + [0.82 * by for _, _, by, _ in levels]
            cys = [levels[0][3] - 10] + [cy + 0.02 * by for _, _, by, cy in levels]
            widths[-1], depths[-1] = 0.5 * widths[-2], 0.6 * depths[-2]
            cxs = [side * (0.48 * ax + 2) for ax in [levels[0][1]] + [lv[1] for lv in levels]]
            self.add(
                Swept(
                    tuple(self.z(v) for v in zs),
                    tuple(cxs),
                    tuple(cys),
                    tuple(widths),
                    tuple(depths),
                ),
                Tissue.LUNG,
            )
        right_base = self.z(levels[-1][0] + 0.35 * _RIBS[9][2])
        s = self.a.organ_scale
        t7 = self.vertebrae[13]
        heart_axes = rotation("y", -35.0) @ rotation("z", 20.0)
        self.add(
            Ellipsoid(
                self.p(-25, self.spine_y(t7.z) + 95, t7.z + 40),
                (52 * s, 44 * s, 62 * s),
                heart_axes,
            ),
            Tissue.HEART,
        )
        # Descending aorta (left, in front of the spine) and inferior vena cava (right).
        zs = [v.z for v in self.vertebrae[10:23]]
        for dx, dy, r, first in ((-16.0, 24.0, 11.0, 0), (22.0, 30.0, 12.0, 6)):
            self.add(
                Swept(
                    tuple(self.z(v) for v in zs[first:]),
                    tuple(self.spine_x(v) + dx for v in zs[first:]),
                    tuple(self.spine_y(v) + dy for v in zs[first:]),
                    (r,) * (len(zs) - first),
                    (r,) * (len(zs) - first),
                ),
                Tissue.VESSEL,
            )
        self.add(Ellipsoid((60, 10, right_base + 70 * s), (90 * s, 80 * s, 70 * s)), Tissue.LIVER)
        self.add(Ellipsoid((-15, 45, right_base + 55 * s), (55 * s, 40 * s, 35 * s)), Tissue.LIVER)
        self.add(
            Ellipsoid((-88, -35, right_base + 60), (30 * s, 42 * s, 52 * s), rotation("z", 25)),
            Tissue.SPLEEN,
        )
        t12 = self.vertebrae[18]
        for side, drop in ((1, 18.0), (-1, 0.0)):
            self.add(
                Ellipsoid(
                    self.p(
                        side * 62, self.spine_y(t12.z) - 5, t12.z + 45 + drop + self.a.kidney_drop
                    ),
                    (26 * s, 24 * s, 52 * s),
                    rotation("y", side * 12.0) @ rotation("z", side * 25.0),
                ),
                Tissue.KIDNEY,
            )
        f = self.a.bladder_fill
        self.add(Ellipsoid(self.p(0, 28, 858 - 10 * f), (48 * f, 36 * f, 34 * f)), Tissue.BLADDER)

    def head(self) -> None:
        """Skull (unlabelled bone) around the brain."""
        self.add(Ellipsoid(self.p(0, -5, 102), (68, 86, 92)), Tissue.BONE, OTHER_BONE_REGION)
        shell = self.thin(7.0, axis=2)
        self.add(Ellipsoid(self.p(0, -5, 104), (68 - shell, 86 - shell, 92 - shell)), Tissue.BRAIN)

    def ribs(self) -> None:
        """Twelve pairs of ribs from the transverse processes around the chest (unlabelled)."""
        for k in range(1, 13):
            zv, ax, by, cy = self.rib_cage(k)
            v = self.vertebrae[7 + k - 1]
            _, _, drop, theta_end = _RIBS[k - 1]
            x0 = self.spine_x(zv)
            radius = self.thin(6.0 if k <= 2 else 5.5)
            tip_x = v.canal[0] + v.transverse
            theta0 = math.asin(min(0.95, tip_x / ax))
            for side in (1, -1):
                points = [
                    self.p(
                        x0 + side * ax * math.sin(t),
                        cy - by * math.cos(t),
                        zv + drop * ((1 - math.cos(t)) - (1 - math.cos(theta0))) / 2,
                    )
                    for t in np.linspace(theta0, theta_end, 10)
                ]
                self.tube(points, radius, Tissue.BONE, RIB_REGION)

    def shoulder_girdle(self) -> None:
        """Scapulae (plates on the back of the chest with spine and glenoid) and clavicles."""
        scapula, clavicle = SKELETON_CLASSES["scapulae"], SKELETON_CLASSES["clavicles"]
        for side in (1, -1):
            shoulder, _, _ = self.arm_points(side)
            sx = abs(shoulder[0])
            angle = math.radians(25.0)
            axes = _frame((side * math.cos(angle), math.sin(angle), 0.0), (0.0, 0.0, 1.0))
            self.add(
                Ellipsoid(
                    self.p(side * 0.57 * sx, -68, 408), (44, 70, self.thin(5.0, axis=1)), axes
                ),
                Tissue.BONE,
                scapula,
            )
            glenoid = shoulder + np.array([-side * 24.0, -6.0, 0.0])
            self.add(Ellipsoid(tuple(glenoid), (9, 14, 20)), Tissue.BONE, scapula)
            self.add(
                Capsule(
                    self.p(side * 0.4 * sx, -74, 372),
                    _plus(glenoid, 0, -8, -18),
                    self.thin(6),
                    self.thin(8),
                ),
                Tissue.BONE,
                scapula,
            )
            acromion = shoulder + np.array([-side * 10.0, -6.0, -28.0])
            self.add(
                Ellipsoid(tuple(acromion), (18, 12, self.thin(6, axis=2))), Tissue.BONE, scapula
            )
            points = [
                self.p(side * 20, 38, 336),
                self.p(side * 0.33 * sx, 42, 330),
                self.p(side * 0.65 * sx, 18, 322),
                tuple(acromion + np.array([-side * 16.0, 6.0, 2.0])),
            ]
            self.tube(points, self.thin(7.0), Tissue.BONE, clavicle)

    def sternum(self) -> None:
        sternum = SKELETON_CLASSES["sternum"]
        thick = self.thin(7.0, axis=1)
        self.add(Ellipsoid(self.p(0, 42, 350), (24, thick, 22)), Tissue.BONE, sternum)
        top, bottom = np.array(self.p(0, 48, 372)), np.array(self.p(0, 84, 492))
        axes = _frame((1.0, 0.0, 0.0), (0.0, *(bottom - top)[1:]))
        # Local axes: x (width), thickness, long axis along the sternal body.
        axes = np.stack([axes[:, 0], axes[:, 2], axes[:, 1]], axis=1)
        self.add(
            Cylinder(
                tuple((top + bottom) / 2),
                (17.0, self.thin(6.0, axis=1)),
                float(np.linalg.norm(bottom - top) / 2),
                axes,
            ),
            Tissue.BONE,
            sternum,
        )
        self.add(Ellipsoid(self.p(0, 88, 506), (9, self.thin(5, axis=1), 14)), Tissue.BONE, sternum)

    def pelvis(self) -> None:
        """Sacrum, iliac wings, acetabula, pubic and ischial rami (one label); hip sockets."""
        pelvis = SKELETON_CLASSES["pelvis"]
        x0 = self.spine_x(800)
        sacrum = (
            (762, 25, 18, 12),
            (784, 22, 15, 11),
            (804, 18, 12, 10),
            (822, 14, 10, 9),
            (838, 10, 8, 8),
        )
        for zv, rx, ry, rz in sacrum:
            self.add(Ellipsoid(self.p(x0, self.spine_y(zv), zv), (rx, ry, rz)), Tissue.BONE, pelvis)
        self.add(
            Capsule(
                self.p(x0, self.spine_y(845), 845),
                self.p(x0, self.spine_y(875) + 8, 872),
                self.thin(5),
                self.thin(4),
            ),
            Tissue.BONE,
            pelvis,
        )
        for side in (1, -1):
            hip = self.leg_points(side)["hip"]
            self.add(
                Ellipsoid(self.p(x0 + side * 36, self.spine_y(770) - 2, 772), (28, 20, 26)),
                Tissue.BONE,
                pelvis,
            )
            wing_axes = _frame((side * 0.57, 0.82, 0.0), (side * 0.3, 0.0, -0.95))
            self.add(
                Ellipsoid(self.p(side * 88, -12, 758), (55, 48, self.thin(7, axis=0)), wing_axes),
                Tissue.BONE,
                pelvis,
            )
            self.add(
                Capsule(self.p(side * 72, -30, 790), _plus(hip, 0, -4, -20), 20, 22),
                Tissue.BONE,
                pelvis,
            )
            self.add(Ellipsoid(tuple(hip), (33, 33, 33)), Tissue.BONE, pelvis)
            self.add(
                Capsule(
                    _plus(hip, -side * 15, 18, 10),
                    self.p(side * 12, 52, 872),
                    self.thin(11),
                    self.thin(11),
                ),
                Tissue.BONE,
                pelvis,
            )
            self.add(Ellipsoid(self.p(side * 16, 52, 880), (11, 12, 20)), Tissue.BONE, pelvis)
            tuberosity = self.p(side * 60, -22, 920)
            self.add(Capsule(_plus(hip, 0, -18, 14), tuberosity, 15, 14), Tissue.BONE, pelvis)
            self.add(
                Capsule(tuberosity, self.p(side * 14, 45, 895), self.thin(9), self.thin(9)),
                Tissue.BONE,
                pelvis,
            )
            # Hip joint space, so the femoral head sits in its socket without merging into it.
            self.add(Ellipsoid(tuple(hip), (26, 26, 26)), Tissue.MUSCLE)

    def legs_bones(self) -> None:
        femur = SKELETON_CLASSES["femurs"]
        for side in (1, -1):
            leg = self.leg_points(side)
            hip = leg["hip"]
            neck_end = np.array(self.p(side * 128, -3, 880))
            self.add(Ellipsoid(tuple(hip), (23, 23, 23)), Tissue.BONE, femur)
            self.add(Capsule(tuple(hip), tuple(neck_end), 15, 16), Tissue.BONE, femur)
            self.add(Ellipsoid(self.p(side * 143, -10, 872), (17, 20, 26)), Tissue.BONE, femur)
            self.add(Ellipsoid(self.p(side * 115, -15, 910), (10, 10, 12)), Tissue.BONE, femur)
            knee = leg["knee"]
            shaft_end = knee + np.array([0.0, 3.0, -20.0])
            self.add(
                Capsule(self.p(side * 134, -2, 890), tuple(shaft_end), 15, 13), Tissue.BONE, femur
            )
            self.add(Ellipsoid(_plus(knee, 0, 0, -12), (40, 30, 22)), Tissue.BONE, femur)
            # Below the knee: patella, tibia, fibula and foot (bone, unlabelled).
            other = OTHER_BONE_REGION
            ankle = leg["ankle"]
            self.add(Ellipsoid(_plus(knee, 0, 45, -20), (20, 9, 22)), Tissue.BONE, other)
            self.add(Ellipsoid(_plus(knee, 0, 5, 16), (38, 28, 16)), Tissue.BONE, other)
            self.add(
                Capsule(_plus(knee, -side * 3, 7, 20), _plus(ankle, 0, 10, -5), 16, 11),
                Tissue.BONE,
                other,
            )
            self.add(
                Capsule(
                    _plus(knee, side * 25, -10, 30),
                    _plus(ankle, side * 14, -5, -10),
                    self.thin(7),
                    self.thin(7),
                ),
                Tissue.BONE,
                other,
            )
            self.add(Ellipsoid(self.p(side * 80, 45, 1712), (22, 75, 16)), Tissue.BONE, other)

    def arm_bones(self) -> None:
        humerus = SKELETON_CLASSES["humeri"]
        for side in (1, -1):
            shoulder, elbow, wrist = self.arm_points(side)
            down = (elbow - shoulder) / np.linalg.norm(elbow - shoulder)
            self.add(Ellipsoid(tuple(shoulder), (23, 23, 23)), Tissue.BONE, humerus)
            self.add(
                Capsule(tuple(shoulder), tuple(elbow - 15 * down), 11, 10), Tissue.BONE, humerus
            )
            self.add(Ellipsoid(tuple(elbow - 12 * down), (28, 14, 14)), Tissue.BONE, humerus)
            for dy in (9.0, -9.0):  # radius (front) and ulna (back)
                offset = np.array([0.0, dy, 0.0])
                self.add(
                    Capsule(
                        tuple(elbow + 6 * down + offset),
                        tuple(wrist + offset),
                        self.thin(7),
                        self.thin(7),
                    ),
                    Tissue.BONE,
                    OTHER_BONE_REGION,
                )
            hand = wrist + 0.3 * (wrist - elbow)
            self.add(Ellipsoid(tuple(hand), (8, 26, 40)), Tissue.BONE, OTHER_BONE_REGION)

    def spine(self) -> None:
        """Vertebral bodies with discs, neural arches and processes; canal, CSF and cord."""
        for i, v in enumerate(self.vertebrae):
            x, y = self.spine_x(v.z), self.spine_y(v.z)
            if i + 1 < len(self.vertebrae):
                z_disc = v.z + v.half_height + v.disc_below / 2
                self.add(
                    Cylinder(
                        self.p(x, self.spine_y(z_disc), z_disc), v.radii, v.disc_below / 2 + 0.5
                    ),
                    Tissue.DISC,
                )
            self.add(Cylinder(self.p(x, y, v.z), v.radii, v.half_height), Tissue.BONE, v.region)
            cy = self.canal_y(v)
            arch = (v.canal[0] + self.thin(5.0, 0), v.canal[1] + self.thin(5.0, 1))
            self.add(Cylinder(self.p(x, cy, v.z), arch, 0.8 * v.half_height), Tissue.BONE, v.region)
            length, angle = v.spinous
            back = cy - v.canal[1] - 3
            tip = (
                x,
                back - length * math.cos(math.radians(angle)),
                v.z + length * math.sin(math.radians(angle)),
            )
            self.add(
                Capsule(self.p(x, back, v.z), self.p(*tip), self.thin(5), self.thin(4)),
                Tissue.BONE,
                v.region,
            )
            for side in (1, -1):
                self.add(
                    Capsule(
                        self.p(x + side * (v.canal[0] + 3), cy, v.z),
                        self.p(x + side * (v.canal[0] + v.transverse), cy - 3, v.z),
                        self.thin(5),
                        self.thin(4.5),
                    ),
                    Tissue.BONE,
                    v.region,
                )
        # Canal from the foramen magnum to the sacrum; cord from the brainstem to the conus.
        top, spine = self.vertebrae[0], self.vertebrae
        zs = [150.0] + [v.z for v in spine] + [790.0, 815.0]
        cxs = [self.spine_x(z) for z in zs]
        cys = [self.canal_y(v) for v in [top, *spine]]
        cys += [self.spine_y(790) - 25.0, self.spine_y(815) - 20.0]
        canal = [(top.canal[0] + 1, top.canal[1] + 4)] + [v.canal for v in spine]
        canal += [(9.0, 6.0), (5.0, 4.0)]
        self.add(
            Swept(
                tuple(self.z(z) for z in zs),
                tuple(cxs),
                tuple(cys),
                tuple(a for a, _ in canal),
                tuple(b for _, b in canal),
            ),
            Tissue.CSF,
        )
        cord = [spine[0].cord] + [v.cord for v in spine if v.cord] + [(2.0, 2.0)]
        n = len(cord)  # ends (tapered) at the vertebra below the conus
        self.add(
            Swept(
                tuple(self.z(z) for z in zs[:n]),
                tuple(cxs[:n]),
                tuple(cys[:n]),
                tuple(a for a, _ in cord),
                tuple(b for _, b in cord),
            ),
            Tissue.CORD,
        )

    def lymph_nodes(self) -> None:
        for center, radii in self.a.lymph_nodes:
            x, y, zv = center
            self.add(
                Ellipsoid(self.p(x, y, zv), radii),
                Tissue.LYMPH_NODE,
                over=_SOFT_TISSUES,
                clear_of_bone=True,
            )


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


def _grow(box: tuple[slice, ...], grid: Sequence[int], margin: int = 1) -> tuple[slice, ...]:
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
    for step in _BodyBuilder(anatomy, pose, spacing).build():
        found = _voxel_box(step.shape, to_world, to_design, grid, spacing_arr)
        if found is None:
            continue
        box, design = found
        mask = step.shape.contains(*design)
        if step.over is not None:
            mask &= np.isin(tissue[box], step.over)
        if step.clear_of_bone:
            wide = _grow(box, grid)
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
    return np.minimum(_lognormal_volumes(rng, n), LESION_MAX_ML)


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
        near = _grow(box, grid)
        blocked[near] |= ndimage.binary_dilation(ids[near] == index, np.ones((3, 3, 3), bool))
        lesions.append(Lesion(index, site, float(intended), float(blob.sum()) * voxel_ml))
    _check_lesions_separate(ids, len(lesions))
    maps.tissue[ids > 0] = Tissue.LESION
    return ids, lesions


def _check_lesions_separate(ids: np.ndarray, n: int) -> None:
    """Each lesion must be exactly one 6-connected component of the binary mask."""
    components, count = cc3d.connected_components(ids > 0, connectivity=6, return_N=True)
    if count != n:
        raise RuntimeError(f"phantom lesions merged or split: {n} lesions, {count} components")
    for index in range(1, n + 1):
        if np.unique(components[ids == index]).size != 1:
            raise RuntimeError(f"phantom lesion {index} is not one connected component")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _smooth_curve(rng: np.random.Generator, n: int, amplitude: float, terms: int = 3) -> np.ndarray:
    """A random low-frequency 1-D profile (a few cosines), for the separable bias field."""
    t = np.linspace(0.0, 1.0, n)
    curve = sum(
        rng.normal(0, amplitude / k) * np.cos(math.pi * k * t + rng.uniform(0, 2 * math.pi))
        for k in range(1, terms + 1)
    )
    return np.asarray(curve, np.float32)


def _station_gains(rng: np.random.Generator, n: int, spacing_z: float) -> np.ndarray:
    """Log-gain steps between the 4-6 stations a whole-body DWI is stitched from."""
    stations = int(rng.integers(4, 7))
    gains = rng.normal(0.0, 0.08, stations)
    profile = gains[np.minimum((np.arange(n) * stations) // n, stations - 1)]
    return ndimage.gaussian_filter1d(profile, 12.0 / spacing_z).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: float = 4.0) -> np.ndarray:
    """Smooth unit-variance random field with a correlation length of about ``cell`` voxels.

    Random values on a coarse lattice are interpolated with separable Gaussian weights (three
    small matrix products), much cheaper than filtering a full-resolution noise volume.
    """
    coarse = [math.ceil(n / cell) + 3 for n in shape]
    field = rng.standard_normal(coarse, dtype=np.float32)
    for axis, n in enumerate(shape):
        centres = (np.arange(coarse[axis]) - 1.5) * cell
        weights = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / cell) ** 2)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=1), 0, axis)
    return field / max(float(field.std()), 1e-6)


def render_images(
    rng: np.random.Generator,
    anatomy: SubjectAnatomy,
    maps: AnatomyMaps,
    lesion_ids: np.ndarray,
    spacing: Sequence[float],
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """T1 and b1000 images (float32, scanner units) of one scan.

    Signal by tissue (with the subject's jitter), yellow marrow in long bones, per-lesion
    contrast, bowel/fat texture, a Gaussian point-spread, a smooth multiplicative bias field
    (plus station steps on b1000), Rician noise, and integer scanner units. ``noise=False``
    returns the blurred noise- and bias-free signal instead, for checks.
    """
    shape = maps.tissue.shape
    n_lesions = int(lesion_ids.max())
    lesion_signal = np.stack(
        [rng.uniform(*LESION_T1_RANGE, n_lesions), rng.uniform(*LESION_B1000_RANGE, n_lesions)]
    )
    texture = smooth_noise(rng, shape)
    shading = 1.0 + 0.05 * texture
    yellow = maps.marrow & np.isin(maps.region, _YELLOW_MARROW_REGIONS)
    in_lesion = lesion_ids > 0
    bowel = maps.tissue == Tissue.BOWEL
    fat_share = 1.0 / (1.0 + np.exp(-3.0 * (texture[bowel] - 0.6)))
    clean = []
    for c in range(2):
        table = np.array(
            [SIGNAL[t][c] * anatomy.intensity_jitter[t][c] for t in Tissue], np.float32
        )
        image = table[maps.tissue]
        image[yellow] = YELLOW_MARROW_SIGNAL[c]
        image[in_lesion] = lesion_signal[c][lesion_ids[in_lesion] - 1]
        image[bowel] = (1 - fat_share) * image[bowel] + fat_share * SIGNAL[Tissue.FAT][c]
        image *= shading
        clean.append(ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0.35)))
    if not noise:
        return clean[0] * CHANNEL_SCALE[0], clean[1] * CHANNEL_SCALE[1]

    shared = [_smooth_curve(rng, n, 0.15) for n in shape]
    stations = _station_gains(rng, shape[2], float(spacing[2]))
    out = []
    for c, image in enumerate(clean):
        own = [_smooth_curve(rng, n, 0.05) for n in shape]
        profiles = [np.exp(shared[i] + own[i]) for i in range(3)]
        if c == 1:
            profiles[2] = profiles[2] * np.exp(stations)
        gain = CHANNEL_SCALE[c] * rng.uniform(0.85, 1.15)
        sigma = (0.015 if c == 0 else 0.018) * rng.uniform(0.8, 1.25)
        image *= profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2]
        image += sigma * rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
        magnitude = np.sqrt(image * image + imaginary * imaginary)
        out.append(np.rint(magnitude * gain).astype(np.float32))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Cases and the cohort
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomCase:
    """One rendered scan with its ground truth and the anatomy maps behind it."""

    case_id: str
    subject_id: str
    t1: np.ndarray
    b1000: np.ndarray
    maps: AnatomyMaps
    lesion_ids: np.ndarray
    lesions: list[Lesion]
    anatomy: SubjectAnatomy
    pose: ScanPose

    @property
    def skeleton(self) -> np.ndarray:
        return self.maps.skeleton

    @property
    def lesion_mask(self) -> np.ndarray:
        return (self.lesion_ids > 0).astype(np.uint8)


def fov_of(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """Field of view (mm): the extent of the voxel grid along each axis."""
    x, y, z = (n * s for n, s in zip(shape, spacing))
    return float(x), float(y), float(z)


def volunteer_of_scan(seed: int, index: int) -> tuple[int, int]:
    """(volunteer, scan number) of healthy case ``index``: volunteers have 1-3 scans each.

    Scan counts come from each volunteer's own generator, so the mapping of case ``index``
    does not depend on how many healthy cases are generated.
    """
    volunteer, first = 0, 0
    while True:
        n_scans = int(
            np.random.default_rng([seed, _STREAM_VOLUNTEER_SCANS, volunteer]).integers(1, 4)
        )
        if index < first + n_scans:
            return volunteer, index - first
        first += n_scans
        volunteer += 1


def check_skeleton_map(
    case_id: str, skeleton: np.ndarray, shape: Sequence[int], spacing: Sequence[float]
) -> None:
    """Every skeletal class must be present and nothing cut off by the field of view."""
    grid = f"a {tuple(shape)} grid at {tuple(spacing)} mm"
    present = set(np.unique(skeleton).tolist())
    missing = [name for name, value in SKELETON_CLASSES.items() if value not in present]
    if missing:
        raise DatasetError(
            f"phantom case {case_id}: skeletal region(s) {', '.join(missing)} have no voxel on "
            f"{grid}; use a finer --spacing or a preset --size"
        )
    border = np.zeros(skeleton.shape, bool)
    border[[0, -1], :, :] = border[:, [0, -1], :] = border[:, :, [0, -1]] = True
    if np.any(skeleton[border] > 0):
        raise DatasetError(
            f"phantom case {case_id}: the skeleton reaches the image border on {grid}; use a "
            "finer --spacing or a preset --size"
        )


def volunteer_anatomy(seed: int, volunteer: int, fov_mm: Sequence[float]) -> SubjectAnatomy:
    """The body of healthy volunteer ``volunteer`` (the same in all of their scans)."""
    rng = np.random.default_rng([seed, _STREAM_VOLUNTEER, volunteer])
    return make_subject_anatomy(rng, fov_mm)


def patient_anatomy(seed: int, index: int, fov_mm: Sequence[float]) -> SubjectAnatomy:
    """The body of patient ``index``."""
    return make_subject_anatomy(np.random.default_rng([seed, _STREAM_PATIENT, index]), fov_mm)


def render_case(
    case_id: str,
    subject_id: str,
    anatomy: SubjectAnatomy,
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: Sequence[float],
    with_lesions: bool,
) -> PhantomCase:
    """One scan of ``anatomy``: pose, anatomy maps, metastases (patients only) and images."""
    pose = sample_scan_pose(rng, anatomy)
    maps = render_anatomy(anatomy, pose, shape, spacing)
    check_skeleton_map(case_id, maps.skeleton, shape, spacing)
    if with_lesions:
        volumes = sample_lesion_volumes_ml(rng, sample_lesion_count(rng))
        ids, lesions = place_lesions(rng, maps, spacing, volumes)
    else:
        ids, lesions = np.zeros(maps.tissue.shape, np.int16), []
    t1, b1000 = render_images(rng, anatomy, maps, ids, spacing)
    return PhantomCase(case_id, subject_id, t1, b1000, maps, ids, lesions, anatomy, pose)


def generate_healthy_case(
    seed: int, index: int, shape: Sequence[int], spacing: Sequence[float]
) -> PhantomCase:
    """Healthy scan ``index`` (``healthy_XXX``) of volunteer ``volunteer_YY``."""
    volunteer, _ = volunteer_of_scan(seed, index)
    anatomy = volunteer_anatomy(seed, volunteer, fov_of(shape, spacing))
    rng = np.random.default_rng([seed, _STREAM_HEALTHY_SCAN, index])
    return render_case(
        f"healthy_{index:03d}", f"volunteer_{volunteer:02d}", anatomy, rng, shape, spacing, False
    )


def generate_patient_case(
    seed: int, index: int, shape: Sequence[int], spacing: Sequence[float]
) -> PhantomCase:
    """Patient ``index`` (``patient_XXX``, one scan, subject = case) with 0-12 metastases."""
    anatomy = patient_anatomy(seed, index, fov_of(shape, spacing))
    rng = np.random.default_rng([seed, _STREAM_PATIENT_SCAN, index])
    case_id = f"patient_{index:03d}"
    return render_case(case_id, case_id, anatomy, rng, shape, spacing, True)


@dataclass(frozen=True)
class CohortPaths:
    """The two datasets a cohort is written as."""

    root: Path
    skeleton: Path
    lesion: Path


def resolve_grid(
    size: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Pick the grid from a preset name or an explicit shape and spacing (given together)."""
    if size is not None and (shape is not None or spacing is not None):
        raise ConfigError("give either a size preset or --shape and --spacing, not both")
    if (shape is None) != (spacing is None):
        raise ConfigError("--shape and --spacing must be given together")
    if shape is None:
        name = size or DEFAULT_SIZE
        if name not in SIZES:
            raise ConfigError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}")
        return SIZES[name]
    if len(shape) != 3 or len(spacing) != 3:
        raise ConfigError(f"shape and spacing need 3 values each, got {shape} and {spacing}")
    if any(int(n) != n or n < 16 for n in shape):
        raise ConfigError(f"shape {tuple(shape)}: each axis must be an integer >= 16 voxels")
    if any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ConfigError(f"spacing {tuple(spacing)}: each value must be a positive number (mm)")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _write_case(case: PhantomCase, root: Path, affine: np.ndarray, task: str) -> None:
    layout.save_nifti(layout.image_path(root, case.case_id, 0), case.t1, affine)
    layout.save_nifti(layout.image_path(root, case.case_id, 1), case.b1000, affine)
    if task == "skeleton":
        layout.save_nifti(layout.label_path(root, case.case_id), case.skeleton, affine)
    else:
        layout.save_nifti(layout.label_path(root, case.case_id), case.lesion_mask, affine)
        layout.save_nifti(layout.skeleton_reference_path(root, case.case_id), case.skeleton, affine)


def _make_and_write(job: tuple[str, int, int, tuple, tuple, str]) -> dict:
    """Worker: generate one case and write its files; returns what dataset.json needs."""
    task, seed, index, shape, spacing, root = job
    generate = generate_healthy_case if task == "skeleton" else generate_patient_case
    case = generate(seed, index, shape, spacing)
    _write_case(case, Path(root), layout.affine_from_spacing(spacing), task)
    return {
        "case": case.case_id,
        "subject": case.subject_id,
        "lesion_volumes_ml": [round(les.volume_ml, 4) for les in case.lesions],
    }


def _dataset_json(task: str, records: list[dict], seed: int, shape, spacing) -> dict:
    labels = layout.SKELETON_LABELS if task == "skeleton" else layout.LESION_LABELS
    spec = {
        "name": f"phantom_{task}",
        "description": (
            "Synthetic whole-body MRI (sap_lightning.data.phantom): "
            + (
                "healthy volunteers, skeleton labels (ribs unlabelled)"
                if task == "skeleton"
                else "patients, bone-metastasis masks; skeletonTr holds the skeleton maps"
            )
        ),
        "channel_names": {str(i): name for i, name in enumerate(layout.CHANNEL_NAMES)},
        "labels": dict(labels),
        "numTraining": len(records),
        "file_ending": layout.FILE_ENDING,
        "subjects": {r["case"]: r["subject"] for r in records},
        "phantom": {"seed": seed, "shape": list(shape), "spacing": list(spacing)},
    }
    if task == "lesion":
        spec["phantom"]["lesion_volumes_ml"] = {r["case"]: r["lesion_volumes_ml"] for r in records}
    return spec


def make_phantom_cohort(
    out: str | os.PathLike,
    n_healthy: int = DEFAULT_HEALTHY,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> CohortPaths:
    """Write the synthetic cohort as ``out/skeleton`` (healthy) and ``out/lesion`` (patients).

    ``shape``/``spacing`` default to the ``small`` preset. Existing datasets at those two paths
    are replaced only with ``overwrite=True``; nothing else in ``out`` is touched. Each dataset
    is built in a temporary folder and renamed into place when complete, so an interrupted run
    never leaves a partial dataset (nor destroys the previous one).
    """
    grid, vox = resolve_grid(shape=shape, spacing=spacing)
    if n_healthy < 1 or n_patients < 1:
        raise ConfigError(
            f"need at least one healthy scan and one patient, got {n_healthy}, {n_patients}"
        )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a folder")
    paths = CohortPaths(root, root / "skeleton", root / "lesion")
    existing = [p for p in (paths.skeleton, paths.lesion) if p.exists()]
    if existing and not overwrite:
        raise DatasetError(
            f"{', '.join(map(str, existing))} already exist; pass --overwrite (overwrite=True) to "
            "replace the phantom datasets (other content of the folder is kept)"
        )
    # Both datasets are built in temporary folders and renamed into place only once both are
    # complete: a failure (say a grid too coarse for some patient) leaves nothing behind.
    with atomic_dir(paths.skeleton) as skeleton_tmp, atomic_dir(paths.lesion) as lesion_tmp:
        for task, count, tmp in (
            ("skeleton", n_healthy, skeleton_tmp),
            ("lesion", n_patients, lesion_tmp),
        ):
            jobs = [(task, seed, i, grid, vox, str(tmp)) for i in range(count)]
            if workers > 1:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    records = list(pool.map(_make_and_write, jobs))
            else:
                records = [_make_and_write(job) for job in jobs]
            write_json(tmp / layout.DATASET_JSON, _dataset_json(task, records, seed, grid, vox))
    log.info(
        "wrote %d healthy scans to %s and %d patients to %s",
        n_healthy,
        paths.skeleton,
        n_patients,
        paths.lesion,
    )
    return paths
