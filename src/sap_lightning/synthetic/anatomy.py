"""Per-subject anatomy and per-scan pose, and the map from design space to the field of view."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sap_lightning.synthetic.geometry import rotation
from sap_lightning.synthetic.tissues import Tissue

log = logging.getLogger(__name__)

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
    intensity_jitter: tuple[tuple[float, float], ...]  # per Tissue: (T1, b1000) factors


@dataclass(frozen=True)
class ScanPose:
    """What changes between two scans of one person: arm position and body placement."""

    abduction: tuple[float, float]  # right and left arm, degrees
    angles: tuple[float, float, float]  # rotations about x, y, z, degrees
    shift: tuple[float, float, float]  # world mm


_MAX_ABDUCTION = 8.0
ARM_LENGTHS = (300.0, 250.0)  # upper arm, forearm (design mm)


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
    reach = sum(ARM_LENGTHS) * (proportions[0] + proportions[1]) / 2
    half_width = (
        175.0 * shoulder + reach * math.sin(math.radians(_MAX_ABDUCTION)) + 32.0 + 0.6 * fat
    )
    y_lo, y_hi = -112.0 * depth - fat, 175.0
    kx = min(1.0, 0.92 * fov[0] / (2 * half_width * u))
    ky = min(1.0, 0.92 * fov[1] / ((y_hi - y_lo) * u))
    scale = (u * kx, u * ky, u)
    origin = (fov[0] / 2, fov[1] / 2 - (y_lo + y_hi) / 2 * scale[1], fov[2] - top_margin)

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
